"""Waveform-in, features-out graphs: `torch.export` and ONNX with the filterbank inside.

The exported graph is `BEATs.forward_waveform` with the key padding mask always on (it
gives the same values when nothing is padded), so one graph serves every batch. The
filterbank's power spectrum is a float64 matrix product (no complex numbers, see
`beats.fbank`), which ONNX Runtime runs as is.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .fbank import SAMPLE_RATE
from .model import BEATs
from .windows import STEP_SAMPLES


class WaveformEncoder(nn.Module):
    """A `BEATs` as a pure tensor function, for tracing.

    ``forward(wav (B, N) float32 in [-1, 1], lengths (B,) int64)`` returns
    ``(features (B, S, C), padding_mask (B, S) bool)`` and, for fine-tuned models,
    ``probs (B, classes)`` as a third output. Samples past a clip's length must be zero
    and every length must be at least 2800 (0.175 s); nothing is checked here.
    """

    def __init__(self, model: BEATs) -> None:
        super().__init__()
        self.model = model

    @property
    def output_names(self) -> list[str]:
        names = ["features", "padding_mask"]
        return [*names, "probs"] if self.model.predictor is not None else names

    def forward(self, wav: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model.forward_waveform(wav, lengths, mask_keys=True)
        if out.probs is not None:
            return out.features, out.padding_mask, out.probs
        return out.features, out.padding_mask


def example_inputs(batch: int = 2, seconds: float = 10.0) -> tuple[torch.Tensor, torch.Tensor]:
    """A (wav (B, N), lengths (B,)) pair to trace with, N = `pad_width` of ``seconds``."""
    n = pad_width(round(seconds * SAMPLE_RATE))
    wav = torch.sin(torch.arange(n, dtype=torch.float32) * 0.05).mul(0.5).repeat(batch, 1)
    return wav, torch.full((batch,), n, dtype=torch.long)


def _dynamic_shapes(dynamic: bool) -> dict | None:
    if not dynamic:
        return None
    batch = torch.export.Dim("batch", min=1, max=1024)
    # The padded width is tied to whole 160 ms steps, N = 2560 k + 240 samples (k >= 2):
    # then the frame and patch counts are exact multiples (16 k frames, 8 k positions)
    # and the graph needs no floor divisions of a symbol. `pad_width` gives such an N.
    steps = torch.export.Dim("steps", min=2, max=22500)  # up to one hour
    return {"wav": {0: batch, 1: STEP_SAMPLES * steps + 240}, "lengths": {0: batch}}


def pad_width(num_samples: int) -> int:
    """The padded width a dynamic export takes for clips of up to ``num_samples`` samples.

    The smallest N >= ``num_samples`` of the form 2560 k + 240 with k >= 2; zero-pad the
    batch to it and pass the true lengths. The padding changes no output.
    """
    k = max(2, -(-(num_samples - 240) // STEP_SAMPLES))
    return STEP_SAMPLES * k + 240


def export_program(
    model: BEATs,
    *,
    batch: int = 2,
    seconds: float = 10.0,
    dynamic: bool = True,
) -> torch.export.ExportedProgram:
    """`torch.export` the waveform-to-features graph of an eval-mode ``model``.

    Args:
        model: the model (its device and dtype are kept; put it in eval mode first).
        batch, seconds: the example input's size.
        dynamic: let batch size and number of samples vary in the exported program.

    Returns:
        The exported program: ``program.module()(wav, lengths)`` runs it.
    """
    wrapper = WaveformEncoder(model).eval()
    wav, lengths = example_inputs(batch, seconds)
    wav, lengths = wav.to(model.device), lengths.to(model.device)
    return torch.export.export(
        wrapper, (wav, lengths), dynamic_shapes=_dynamic_shapes(dynamic), strict=False
    )


def export_onnx(
    model: BEATs,
    path: str | Path,
    *,
    batch: int = 2,
    seconds: float = 10.0,
    dynamic: bool = True,
    opset_version: int = 18,
) -> Path:
    """Write the waveform-to-features graph of an eval-mode ``model`` as an ONNX file.

    Inputs ``wav`` (B, N) float32 and ``lengths`` (B,) int64; outputs ``features``,
    ``padding_mask`` (and ``probs`` for fine-tuned models), as `WaveformEncoder`.
    Uses the ``torch.export``-based exporter (needs ``onnx`` and ``onnxscript``).
    """
    path = Path(path)
    program = export_program(model, batch=batch, seconds=seconds, dynamic=dynamic)
    torch.onnx.export(
        program,
        example_inputs(batch, seconds),
        str(path),
        input_names=["wav", "lengths"],
        output_names=WaveformEncoder(model).output_names,
        opset_version=opset_version,
        dynamo=True,
        external_data=False,
    )
    return path
