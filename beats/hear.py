"""The HEAR 2021 API, so BEATs plugs into hear-eval-kit.

``load_model`` returns a `BEATs` model carrying ``sample_rate`` (16000),
``scene_embedding_size`` and ``timestamp_embedding_size`` (C, 768 for the base models).
Timestamp embeddings are the last layer averaged over the 8 frequency patches of each
160 ms step, at the step centres (87.5 ms, 247.5 ms, ...); scene embeddings are their
mean over the clip.

Clips longer than `WINDOW_S` are embedded in windows exactly as ``beats extract`` does
(`beats.windows`): memory stays that of one batch of windows, so HEAR's 20-minute clips
work, and the steps still cover the whole clip. A clip shorter than one step (0.175 s) is
zero-padded to it; its one timestamp is then the middle of its audio, so that every
timestamp lies within the clip.
"""

from __future__ import annotations

import numpy as np
import torch

from .errors import InputError
from .inputs import MIN_SAMPLES
from .model import BEATs
from .model_output import PATCHES_PER_STEP
from .pooling import PoolingSpec, pool, step_centres
from .windows import iter_windowed, num_steps

SAMPLE_RATE = 16000
BATCH_SIZE = 8  # clips (or windows of a long clip) per forward pass
WINDOW_S = 10.0  # longer clips are embedded in windows of this length...
HOP_S = 8.0  # ...every this many seconds, as `beats extract` does by default


def load_model(model_file_path: str = "", *, device: str | torch.device | None = None) -> BEATs:
    """A BEATs model from a registry name, hub repo, folder or ``.pt`` file (default: the
    registry's default model), in eval mode on ``device`` (default: CUDA if available)."""
    from .commands.extract import default_model_name

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model = BEATs.from_pretrained(model_file_path or default_model_name(), device=device)
    model.sample_rate = SAMPLE_RATE
    model.scene_embedding_size = model.cfg.encoder_embed_dim
    model.timestamp_embedding_size = model.cfg.encoder_embed_dim
    return model


def _audio(audio: torch.Tensor | np.ndarray) -> torch.Tensor:
    """HEAR audio (n_sounds, n_samples) as a tensor (numpy arrays are accepted too)."""
    if isinstance(audio, np.ndarray):
        audio = torch.from_numpy(np.ascontiguousarray(audio))
    if not isinstance(audio, torch.Tensor):
        raise TypeError(f"HEAR audio must be a tensor or numpy array, got {type(audio).__name__}")
    if audio.dim() != 2:
        raise InputError(f"HEAR audio must be (n_sounds, n_samples), got {tuple(audio.shape)}")
    return audio


def _steps(audio: torch.Tensor, model: BEATs) -> torch.Tensor:
    """(n_sounds, n_samples) -> (n_sounds, T, C) float32 step embeddings, in batches."""
    if audio.shape[1] < MIN_SAMPLES:
        audio = torch.nn.functional.pad(audio, (0, MIN_SAMPLES - audio.shape[1]))
    steps, dim = num_steps(audio.shape[1]), model.cfg.encoder_embed_dim
    out = torch.zeros(audio.shape[0], steps, dim, device=model.device)
    if steps <= num_steps(round(WINDOW_S * SAMPLE_RATE)):  # whole clips, several at a time
        spec = PoolingSpec(time="none", freq="mean")
        for start in range(0, audio.shape[0], BATCH_SIZE):
            result = model.embed(audio[start : start + BATCH_SIZE])
            out[start : start + BATCH_SIZE] = torch.stack(pool(result, spec,
                                                               model.cfg.encoder_layers))
        return out
    for i, clip in enumerate(audio):  # long clips: windows, a batch of them at a time
        for w, piece in iter_windowed(model, clip, window_s=WINDOW_S, hop_s=HOP_S,
                                      batch_size=BATCH_SIZE):
            rows = piece.float().view(-1, PATCHES_PER_STEP, dim).mean(dim=1)
            out[i, w.keep_start : w.keep_stop] = rows
    return out


def timestamps(num_samples: int) -> np.ndarray:
    """(T,) float64 timestamps in milliseconds of a clip of ``num_samples`` samples.

    The centres of its 160 ms steps (``87.5 + 160 t``), which all lie within the clip; a
    clip shorter than one step (2800 samples) has one step, stamped at its audio's middle.
    """
    if num_samples < MIN_SAMPLES:
        return np.array([500.0 * num_samples / SAMPLE_RATE])
    return step_centres(num_steps(num_samples)) * 1000.0


def get_timestamp_embeddings(
    audio: torch.Tensor | np.ndarray, model: BEATs
) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings (n_sounds, T, C) and their centre times (n_sounds, T) in milliseconds."""
    audio = _audio(audio)
    emb = _steps(audio, model)
    times = torch.from_numpy(timestamps(audio.shape[1])).to(torch.float32)
    return emb, times.to(emb.device).expand(emb.shape[0], -1)


def get_scene_embeddings(audio: torch.Tensor | np.ndarray, model: BEATs) -> torch.Tensor:
    """One embedding per clip: (n_sounds, C), the mean of its timestamp embeddings."""
    return _steps(_audio(audio), model).mean(dim=1)
