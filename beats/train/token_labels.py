"""Pre-training labels read from ``beats tokenize`` outputs instead of computed on the fly.

``beats tokenize`` writes one (T, 8) int64 array per file (8 tokens per 160 ms step):
``.npy`` files, or ``.safetensors`` shards named ``shard#key`` in ``manifest.jsonl``.
A crop that starts on a step boundary (a multiple of 2560 samples) sees exactly the
file's own patches (`beats.windows`), so its labels are a slice of the file's tokens.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError
from ..fbank import num_frames
from ..manifest import FAILED, Record, latest_by_key, read_manifest
from ..model_output import PATCHES_PER_STEP
from ..windows import STEP_SAMPLES


def num_steps(num_samples: int) -> int:
    """Whole 160 ms time steps of a 16 kHz clip of ``num_samples`` samples (62 for 10 s)."""
    return int(num_frames(num_samples)) // 16


class TokenLabels:
    """The token outputs of one ``beats tokenize`` run, looked up by audio file path.

    Args:
        folder: the run's output folder (holding ``run.json`` and ``manifest.jsonl``).
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        run = self.folder / "run.json"
        if not run.is_file():
            raise InputError(f"{self.folder} is not a `beats tokenize` output folder (no "
                             "run.json): give the folder that beats tokenize wrote")
        settings = json.loads(run.read_text())
        if settings.get("output") != "tokens":
            raise InputError(f"{self.folder} holds embeddings (beats extract), not tokens: "
                             "give a folder written by beats tokenize")
        records = latest_by_key(read_manifest(self.folder / "manifest.jsonl"))
        self.records: dict[str, Record] = {
            os.path.abspath(r.input): r for r in records.values()
        }

    def __len__(self) -> int:
        return len(self.records)

    def tokens(self, path: str | os.PathLike) -> np.ndarray:
        """The whole file's tokens (T, 8) int64."""
        record = self.records.get(os.path.abspath(path))
        if record is None:
            raise InputError(f"{path}: no tokens for this file in {self.folder} (tokenize it "
                             "with the same paths, or leave it out)")
        if record.status == FAILED or record.output is None:
            raise InputError(f"{path}: beats tokenize failed on it ({record.error})")
        if "#" in record.output:
            from safetensors import safe_open

            shard, key = record.output.split("#", 1)
            with safe_open(str(self.folder / shard), framework="np") as f:
                tokens = f.get_tensor(key)
        else:
            tokens = np.load(self.folder / record.output)
        if tokens.dtype != np.int64 or tokens.ndim != 2 or tokens.shape[1] != PATCHES_PER_STEP:
            raise InputError(f"{path}: its output in {self.folder} is not a (T, 8) int64 token "
                             f"array (got {tokens.dtype} {tokens.shape})")
        return tokens

    def crop(self, path: str | os.PathLike, offset: int, num_samples: int,
             total_samples: int) -> torch.Tensor:
        """Labels (8 * steps,) int64 of the crop [offset, offset + num_samples) of a file.

        Args:
            path: the audio file, as given to ``beats tokenize``.
            offset: first sample of the crop at 16 kHz; a multiple of 2560 (one step).
            num_samples: the crop's length; it has ``num_steps(num_samples)`` steps.
            total_samples: the whole file's length at 16 kHz as read now (after padding a
                file below 0.175 s to 2800 samples, as tokenize does): checked against the
                tokens so that outputs of other audio are never used.
        """
        if offset % STEP_SAMPLES or offset < 0:
            raise ValueError(f"crop offset {offset} is not a multiple of {STEP_SAMPLES} samples "
                             "(160 ms): crops must start on a time step to reuse tokens")
        if offset + num_samples > total_samples:
            raise InputError(f"{path}: crop [{offset}, {offset + num_samples}) runs past the "
                             f"end of the file ({total_samples} samples)")
        tokens = self.tokens(path)
        expected = num_steps(total_samples)
        if tokens.shape[0] != expected:
            raise InputError(
                f"{path}: its tokens in {self.folder} cover {tokens.shape[0]} steps but the "
                f"audio has {expected} ({total_samples / 16000:.2f} s): they were made from "
                "other audio; run beats tokenize again"
            )
        start = offset // STEP_SAMPLES
        return torch.from_numpy(np.ascontiguousarray(
            tokens[start : start + num_steps(num_samples)])).reshape(-1)
