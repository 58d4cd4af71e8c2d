"""The HEAR 2021 API, so BEATs plugs into hear-eval-kit.

``load_model`` returns a `BEATs` model carrying ``sample_rate`` (16000),
``scene_embedding_size`` and ``timestamp_embedding_size`` (C, 768 for the base models).
Timestamp embeddings are the last layer averaged over the 8 frequency patches of each
160 ms step, at the step centres (87.5 ms, 247.5 ms, ...); scene embeddings are their
mean over the clip. Clips shorter than 0.175 s are zero-padded to that length.
"""

from __future__ import annotations

import torch

from .inputs import MIN_SAMPLES
from .model import BEATs
from .pooling import PoolingSpec, pool, step_centres

SAMPLE_RATE = 16000
BATCH_SIZE = 8  # clips per forward pass


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


def _steps(audio: torch.Tensor, model: BEATs) -> torch.Tensor:
    """(n_sounds, n_samples) -> (n_sounds, T, C) step embeddings, in batches."""
    if audio.dim() != 2:
        raise ValueError(f"HEAR audio must be (n_sounds, n_samples), got {tuple(audio.shape)}")
    if audio.shape[1] < MIN_SAMPLES:
        audio = torch.nn.functional.pad(audio, (0, MIN_SAMPLES - audio.shape[1]))
    spec = PoolingSpec(time="none", freq="mean")
    chunks = []
    with torch.inference_mode():
        for start in range(0, audio.shape[0], BATCH_SIZE):
            out = model.extract_features(audio[start : start + BATCH_SIZE])
            chunks.append(torch.stack(pool(out, spec, model.cfg.encoder_layers)))
    return torch.cat(chunks)


def get_timestamp_embeddings(
    audio: torch.Tensor, model: BEATs
) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings (n_sounds, T, C) and their centre times (n_sounds, T) in milliseconds."""
    emb = _steps(audio, model)
    times = torch.from_numpy(step_centres(emb.shape[1]) * 1000.0).to(torch.float32)
    return emb, times.to(emb.device).expand(emb.shape[0], -1)


def get_scene_embeddings(audio: torch.Tensor, model: BEATs) -> torch.Tensor:
    """One embedding per clip: (n_sounds, C), the mean of its timestamp embeddings."""
    return _steps(audio, model).mean(dim=1)
