"""Long audio in windows: memory bounded by the window batch, not by the file's length.

A file is cut into windows of ``window_s`` seconds every ``hop_s`` seconds, aligned on
the 160 ms time steps of the whole file, so each window's patches are the file's own
patches (same samples, same filterbank frames). The windows run through the model a
batch at a time and are stitched into one sequence:

- Time step t (8 positions, s = 8 t + f) covers samples [2560 t, 2560 t + 2800), that is
  0.16 t to 0.16 t + 0.175 s; its centre is at ``0.16 t + 0.0875`` s (`step_times`).
- Window k covers steps [start_k, start_k + w). Windows start every h steps; the last one
  is moved back to end at the file's last step, so every window has the full length
  (a file shorter than one window is one window: exactly `BEATs.embed` on the file).
- Each step is taken from exactly one window: the one whose centre is nearest to the
  step's centre (ties go to the earlier window). So every step but those near the
  file's ends sees at least (w - h) / 2 steps of context on each side: 0.96 s for the
  defaults (10 s windows, 8 s hop).

The file's steps are those of the whole clip: T = 1 + (N - 400) // 160 frames, T // 16
steps, as `BEATs.embed` would give without windows.

A fine-tuned model's frame scores (`frame_scores_windowed`) are stitched the same way,
each window run on its own so that a live stream (`beats.detect.StreamingDetector`)
computes the very same numbers.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from itertools import pairwise
from typing import NamedTuple

import torch

from .errors import InputError
from .fbank import SAMPLE_RATE, num_frames
from .inputs import MIN_SAMPLES, ArrayLike, prepare_batch
from .model import BEATs
from .model_output import PATCHES_PER_STEP
from .pooling import step_centres

STEP_SAMPLES = 2560  # one time step: 16 frames of 10 ms
STEP_SPAN = MIN_SAMPLES  # 2800 samples one step reads: 15 shifts of 160 + a 400 frame


class Window(NamedTuple):
    """One window in time steps of the file: covers [start, stop), keeps [keep_start, keep_stop)."""

    start: int
    stop: int
    keep_start: int
    keep_stop: int


@dataclass
class WindowedOutput:
    """What `extract_windowed` returns.

    Attributes:
        features: (S, C) the stitched sequence, S = 8 * steps, position s = 8 t + f.
        step_times: (steps,) float64 centre of each time step in seconds.
        windows: the windows, in order, with the steps each one contributed.
    """

    features: torch.Tensor
    step_times: torch.Tensor
    windows: list[Window]


def num_steps(num_samples: int) -> int:
    """Time steps (160 ms, 8 positions each) of a clip of ``num_samples`` samples."""
    return num_frames(num_samples) // 16


def step_times(steps: int) -> torch.Tensor:
    """(steps,) float64 centre time in seconds of each step (`pooling.step_centres`)."""
    return torch.from_numpy(step_centres(steps))


def window_steps(window_s: float = 10.0, hop_s: float = 8.0) -> tuple[int, int]:
    """(window, hop) in steps: ``window_s`` converted like a clip of that length (10 s ->
    62 steps), ``hop_s`` rounded to whole steps of 0.16 s (8 s -> 50 steps), in (0, window]."""
    width = num_steps(round(window_s * SAMPLE_RATE))
    hop = round(hop_s * SAMPLE_RATE / STEP_SAMPLES)
    if width < 1:
        raise InputError(f"window_s={window_s} is shorter than one step (0.175 s)")
    if not 1 <= hop <= width:
        raise InputError(
            f"hop_s={hop_s} must lie between one step (0.16 s) and the window "
            f"({width} steps = {width * 0.16:.2f} s)"
        )
    return width, hop


def plan_windows(num_samples: int, window_s: float = 10.0, hop_s: float = 8.0) -> list[Window]:
    """The windows covering a clip of ``num_samples`` samples, and the steps each keeps.

    ``window_s`` and ``hop_s`` are converted to steps by `window_steps`.
    """
    total = num_steps(num_samples)
    if total == 0:
        raise InputError(
            f"audio too short: {num_samples} samples; BEATs needs at least {STEP_SPAN} "
            "samples (0.175 s at 16 kHz)"
        )
    width, hop = window_steps(window_s, hop_s)
    if total <= width:
        return [Window(0, total, 0, total)]
    starts = [*range(0, total - width, hop), total - width]
    # Step t belongs to window k when its centre t + 1/2 is nearest window k's centre
    # start_k + w / 2; between consecutive windows the first step of k + 1 is
    # (start_k + start_k+1 + w + 1) // 2 (a tie, 2 t + 1 equidistant, stays with k).
    edges = [0, *((a + b + width + 1) // 2 for a, b in pairwise(starts)), total]
    return [Window(s, s + width, edges[k], edges[k + 1]) for k, s in enumerate(starts)]


def iter_windowed(
    model: BEATs,
    wav: ArrayLike,
    *,
    window_s: float = 10.0,
    hop_s: float = 8.0,
    batch_size: int = 8,
    output_layer: int | None = None,
    output_hidden_states: bool = False,
) -> Iterator[tuple[Window, torch.Tensor]]:
    """Yield ``(window, features (8 * (keep_stop - keep_start), C))`` in time order.

    With ``output_hidden_states=True`` each piece is the hidden states instead,
    (L + 1, 8 * (keep_stop - keep_start), C) (or k + 1 with ``output_layer=k``).

    The pieces, concatenated, are `extract_windowed`'s features; memory stays that of one
    batch of ``batch_size`` windows whatever the file's length.

    Args:
        model: the model (runs under ``torch.inference_mode``, through `BEATs.embed`).
        wav: (N,) one clip of 16 kHz samples (tensor or numpy, float or int PCM).
        window_s, hop_s: window length and hop in seconds (see `plan_windows`).
        batch_size: windows per forward pass.
        output_layer, output_hidden_states: as in `BEATs.extract_features`.
    """
    if batch_size < 1:
        raise InputError(f"batch_size={batch_size} must be positive")
    audio, _ = prepare_batch(wav)  # checked, float32, on the CPU: windows move one batch
    if audio.shape[0] != 1:
        raise InputError(f"extract_windowed takes one clip (N,), got shape {tuple(audio.shape)}")
    audio = audio[0]
    windows = plan_windows(audio.shape[0], window_s, hop_s)
    for first in range(0, len(windows), batch_size):
        group = windows[first : first + batch_size]
        batch = torch.stack([window_samples(audio, w, len(windows) == 1) for w in group])
        out = model.embed(batch, output_layer=output_layer,
                          output_hidden_states=output_hidden_states)
        for i, w in enumerate(group):
            lo = PATCHES_PER_STEP * (w.keep_start - w.start)
            hi = PATCHES_PER_STEP * (w.keep_stop - w.start)
            if output_hidden_states:
                yield w, torch.stack([h[i, lo:hi] for h in out.hidden_states])
            else:
                yield w, out.features[i, lo:hi]


def extract_windowed(
    model: BEATs,
    wav: ArrayLike,
    *,
    window_s: float = 10.0,
    hop_s: float = 8.0,
    batch_size: int = 8,
    output_layer: int | None = None,
) -> WindowedOutput:
    """Embed a long clip in overlapping windows and stitch one sequence (see module doc).

    Args and memory as `iter_windowed`; the result holds all the file's positions:
    features (8 * steps, C) on the model's device and in its dtype, and the step times.
    """
    windows = plan_windows(_num_samples(wav), window_s, hop_s)
    out: torch.Tensor | None = None
    for w, piece in iter_windowed(model, wav, window_s=window_s, hop_s=hop_s,
                                  batch_size=batch_size, output_layer=output_layer):
        if out is None:  # filled in place: only one batch's outputs are alive besides it
            out = piece.new_empty(PATCHES_PER_STEP * windows[-1].keep_stop, piece.shape[-1])
        out[PATCHES_PER_STEP * w.keep_start : PATCHES_PER_STEP * w.keep_stop] = piece
    assert out is not None
    return WindowedOutput(out, step_times(windows[-1].keep_stop), windows)


def window_samples(audio: torch.Tensor, window: Window, whole: bool) -> torch.Tensor:
    """The samples (span,) that ``window`` reads from a clip's 16 kHz ``audio`` (N,): its
    steps' 2560 (w - 1) + 2800 samples, or the whole clip when it is the only window
    (identical to running the model on the clip directly)."""
    if whole:
        return audio
    span = STEP_SAMPLES * (window.stop - window.start - 1) + STEP_SPAN
    return audio[STEP_SAMPLES * window.start :][:span]


def score_window(model: BEATs, samples: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Frame logits and frame probabilities, each (steps, classes) float32, of one window
    (or clip) run alone through a fine-tuned model.

    Windows are always run one at a time here, so that a window gives the same numbers
    to the bit whichever code path asks for it (a whole file, or a live stream).
    """
    out = model.embed(samples.unsqueeze(0))
    if out.frame_logits is None:
        raise InputError("frame scores need a fine-tuned model (one with a class head)")
    return out.frame_logits[0], model.activate(out.frame_logits)[0]


@dataclass
class WindowedScores:
    """What `frame_scores_windowed` returns.

    Attributes:
        logits: (steps, classes) float32 frame logits, on the model's device.
        probs: (steps, classes) float32 frame probabilities (`BEATs.activate`).
        step_times: (steps,) float64 centre of each step in seconds.
        windows: the windows, in order, with the steps each one contributed.
    """

    logits: torch.Tensor
    probs: torch.Tensor
    step_times: torch.Tensor
    windows: list[Window]


def frame_scores_windowed(
    model: BEATs, wav: ArrayLike, *, window_s: float | None = 10.0, hop_s: float = 8.0,
) -> WindowedScores:
    """Frame scores of one clip of any length from a fine-tuned model, window by window.

    The windows and the steps each contributes are those of `extract_windowed`; each
    window runs alone (`score_window`), its probabilities computed over the whole window
    before its kept steps are taken. ``window_s=None`` runs the clip whole.

    Args:
        model: a fine-tuned `BEATs` (runs under ``torch.inference_mode``).
        wav: (N,) one clip of 16 kHz samples (tensor or numpy, float or int PCM).
        window_s, hop_s: window length and hop in seconds (see `plan_windows`).
    """
    audio, _ = prepare_batch(wav)
    if audio.shape[0] != 1:
        raise InputError(f"frame_scores_windowed takes one clip (N,), got shape "
                         f"{tuple(audio.shape)}")
    audio = audio[0]
    if window_s is None:
        windows = [Window(0, num_steps(audio.shape[0]), 0, num_steps(audio.shape[0]))]
    else:
        windows = plan_windows(audio.shape[0], window_s, hop_s)
    logits: torch.Tensor | None = None
    probs: torch.Tensor | None = None
    for w in windows:
        window_logits, window_probs = score_window(
            model, window_samples(audio, w, len(windows) == 1))
        if logits is None or probs is None:
            shape = (windows[-1].keep_stop, window_logits.shape[-1])
            logits, probs = window_logits.new_empty(shape), window_probs.new_empty(shape)
        keep = slice(w.keep_start - w.start, w.keep_stop - w.start)
        logits[w.keep_start : w.keep_stop] = window_logits[keep]
        probs[w.keep_start : w.keep_stop] = window_probs[keep]
    assert logits is not None and probs is not None
    return WindowedScores(logits, probs, step_times(windows[-1].keep_stop), windows)


def _num_samples(wav: ArrayLike) -> int:
    if isinstance(wav, (list, tuple)):
        raise TypeError("extract_windowed takes one clip (N,), not a list of clips")
    return int(wav.shape[-1])
