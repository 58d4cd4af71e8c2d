"""Embeddings for many audio files: the engine behind ``beats extract``.

Files are read by DataLoader workers while the model runs, batched by similar duration
(little padding), embedded, pooled and written one output per input (``.npy``) or in
sharded ``.safetensors``. Every outcome goes to ``manifest.jsonl``; a rerun with
``resume=True`` skips inputs whose outputs are complete. Under ``torchrun`` each rank
takes every world-size-th input and rank 0 merges the manifests.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import save as save_safetensors
from torch.utils.data import DataLoader, Dataset

from .audio import AudioError, AudioInfo, audio_info, load_audio
from .files import InputFile, atomic_write, discover_inputs, output_path
from .inputs import MIN_SAMPLES, pad_to_minimum
from .manifest import (
    FAILED,
    OK,
    PADDED,
    ManifestWriter,
    Record,
    latest_by_key,
    read_manifest,
)
from .model import PATCHES_PER_STEP, BEATs, BEATsOutput
from .pooling import PoolingSpec, pool, step_centres
from .windows import SAMPLE_RATE, iter_windowed

log = logging.getLogger("beats.extract")

MANIFEST = "manifest.jsonl"
RUN_FILE = "run.json"
FORMATS = ("npy", "safetensors")


@dataclass
class ExtractOptions:
    """How to embed and store.

    Attributes:
        pooling: layers and pooling (`PoolingSpec`; default: last layer, mean over time
            and frequency, one vector per file).
        batch_size: clips per forward pass.
        num_workers: processes reading and resampling audio (0: in the main process).
        prefetch: batches each worker reads ahead.
        output_format: ``npy`` (one file per input, mirroring the input tree: simplest,
            best for a few thousand files or random access) or ``safetensors`` (shards of
            ``shard_size`` inputs: best for millions of files or training pipelines).
        shard_size: inputs per safetensors shard.
        window, hop: seconds. A file longer than ``window`` (default 10 s, the clip
            length BEATs was trained on) is embedded in overlapping windows and stitched
            (see `beats.windows`): memory stays bounded whatever the file's length. Files
            up to ``window`` are embedded whole, exactly as ``extract_features``. ``hop``
            defaults to 80 % of the window; ``window=None`` embeds every file whole.
        resume: skip inputs whose outputs are complete; redo the rest.
        tokens: write acoustic token ids (T, 8) int64 instead of embeddings; the model
            must be a `BEATsTokenizer` and ``pooling`` is ignored.
    """

    pooling: PoolingSpec = field(default_factory=PoolingSpec)
    batch_size: int = 8
    num_workers: int = 2
    prefetch: int = 2
    output_format: str = "npy"
    shard_size: int = 1000
    window: float | None = 10.0
    hop: float | None = None
    resume: bool = False
    tokens: bool = False

    def __post_init__(self) -> None:
        if self.output_format not in FORMATS:
            raise ValueError(f"output format {self.output_format!r}: choose one of {FORMATS}")
        if self.batch_size < 1 or self.shard_size < 1 or self.num_workers < 0:
            raise ValueError("batch_size and shard_size must be >= 1, num_workers >= 0")
        if self.window is not None and self.window * 16000 < MIN_SAMPLES:
            raise ValueError(f"window {self.window} s is shorter than the model's 0.175 s")
        if self.hop is not None and (self.window is None or not 0 < self.hop <= self.window):
            raise ValueError("hop needs a window and must lie in (0, window]")
        if self.window is not None and self.hop is None:
            self.hop = round(0.8 * self.window, 3)

    def fingerprint(self, model_name: str) -> dict[str, Any]:
        """What must match for a resumed run to reuse earlier outputs."""
        p = self.pooling
        if self.tokens:
            return {"model": model_name, "output": "tokens", "output_format": self.output_format,
                    "window": self.window, "hop": self.hop}
        return {
            "model": model_name,
            "layers": p.layers if isinstance(p.layers, str) else list(p.layers),
            "time_pooling": p.time,
            "freq_pooling": p.freq,
            "output_format": self.output_format,
            "window": self.window,
            "hop": self.hop,
        }


@dataclass
class Summary:
    """Counts of a run: inputs ``ok``, ``padded`` (short, zero-padded), ``failed``,
    ``skipped`` (already done), audio seconds embedded and wall seconds."""

    ok: int = 0
    padded: int = 0
    failed: int = 0
    skipped: int = 0
    audio_seconds: float = 0.0
    seconds: float = 0.0
    failures: list[tuple[str, str]] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0

    def __str__(self) -> str:
        speed = self.audio_seconds / self.seconds if self.seconds else 0.0
        return (
            f"{self.ok} ok, {self.padded} padded, {self.failed} failed, {self.skipped} "
            f"skipped (already done); {self.audio_seconds:.1f} s of audio in "
            f"{self.seconds:.1f} s ({speed:.1f} audio s/s)"
        )


# --------------------------------------------------------------------------- loading
@dataclass
class _Loaded:
    item: InputFile
    wav: np.ndarray | None
    info: AudioInfo | None
    error: str | None


class _BatchReader(Dataset):
    """Dataset whose items are whole batches of files, read in worker processes."""

    def __init__(self, batches: list[list[InputFile]]) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> list[_Loaded]:
        out = []
        for item in self.batches[index]:
            try:
                wav, info = load_audio(item.path)
                out.append(_Loaded(item, wav, info, None))
            except (AudioError, OSError, ValueError) as e:
                out.append(_Loaded(item, None, None, str(e)))
        return out


def _abs(path: Path) -> str:
    """The absolute path recorded in the manifest (so it can be matched from anywhere)."""
    return str(Path(os.path.abspath(path)))


def _as_is(batch: list[_Loaded]) -> list[_Loaded]:
    return batch


def _by_duration(items: list[InputFile], batch_size: int) -> list[list[InputFile]]:
    """Batches of similar duration (header reads only), longest first."""
    def duration(item: InputFile) -> float:
        try:
            return audio_info(item.path).duration
        except (AudioError, OSError, ValueError):
            return 0.0  # unreadable: fails when loaded, in a batch of its own kind

    ordered = sorted(items, key=lambda it: (-duration(it), it.key))
    return [ordered[i : i + batch_size] for i in range(0, len(ordered), batch_size)]


# --------------------------------------------------------------------------- writing
class _NpyWriter:
    suffix = ".npy"

    def __init__(self, output_dir: Path, manifest: ManifestWriter) -> None:
        self.output_dir = output_dir
        self.manifest = manifest

    def write(self, record: Record, embedding: np.ndarray, times: np.ndarray | None) -> None:
        path = output_path(self.output_dir, record.key, self.suffix)
        if times is not None:
            with atomic_write(path.with_name(path.name[: -len(".npy")] + ".times.npy")) as f:
                np.save(f, times)
        with atomic_write(path) as f:
            np.save(f, embedding)
        record.output = path.relative_to(self.output_dir.resolve()).as_posix()
        self.manifest.append(record)

    def close(self) -> None:
        pass


class _ShardWriter:
    """Collects embeddings and writes ``shard-R-NNNNN.safetensors`` of ``size`` inputs;
    their manifest records are appended only once the shard is on disk."""

    def __init__(self, output_dir: Path, manifest: ManifestWriter, size: int, rank: int) -> None:
        self.output_dir = output_dir
        self.manifest = manifest
        self.size = size
        self.rank = rank
        self.number = len(list(output_dir.glob(f"shard-{rank:02d}-*.safetensors")))
        self.tensors: dict[str, np.ndarray] = {}
        self.records: list[Record] = []

    def write(self, record: Record, embedding: np.ndarray, times: np.ndarray | None) -> None:
        self.tensors[record.key] = np.ascontiguousarray(embedding)
        if times is not None:
            self.tensors[record.key + "#times"] = times
        self.records.append(record)
        if len(self.records) >= self.size:
            self.flush()

    def flush(self) -> None:
        if not self.records:
            return
        name = f"shard-{self.rank:02d}-{self.number:05d}.safetensors"
        with atomic_write(self.output_dir / name) as f:
            f.write(save_safetensors(self.tensors, metadata={"format": "beats-embeddings"}))
        for record in self.records:
            record.output = f"{name}#{record.key}"
            self.manifest.append(record)
        self.number += 1
        self.tensors, self.records = {}, []

    def close(self) -> None:
        self.flush()


# --------------------------------------------------------------------------- resume
def _completed(output_dir: Path, previous: dict[str, Record], options: ExtractOptions) -> set[str]:
    """Keys whose outputs exist, whole, with the shape their record states."""
    done = set()
    for key, record in previous.items():
        if record.status not in (OK, PADDED) or record.output is None:
            continue
        if options.output_format == "npy":
            path = output_dir / record.output
            try:
                shape = np.load(path, mmap_mode="r").shape
            except (OSError, ValueError):
                continue
            if list(shape) == record.shape:
                done.add(key)
        elif (output_dir / record.output.split("#", 1)[0]).exists():
            done.add(key)
    return done


def _adopt_unrecorded(
    output_dir: Path, items: list[InputFile], manifest: ManifestWriter
) -> set[str]:
    """npy outputs written by a run killed before it could record them: writes are atomic,
    so an existing file is complete. Record them (``recovered``) instead of recomputing."""
    adopted = set()
    for item in items:
        path = output_path(output_dir, item.key, _NpyWriter.suffix)
        if not path.exists():
            continue
        try:
            shape = np.load(path, mmap_mode="r").shape
            info = audio_info(item.path)
        except (OSError, ValueError):
            continue
        status = PADDED if info.duration * 16000 < MIN_SAMPLES else OK
        manifest.append(Record(
            _abs(item.path), item.key, status, info.duration, info.sample_rate,
            path.relative_to(output_dir.resolve()).as_posix(), list(shape),
            extra={"recovered": True},
        ))
        adopted.add(item.key)
    return adopted


def _check_run_file(output_dir: Path, fingerprint: dict[str, Any], resume: bool) -> None:
    path = output_dir / RUN_FILE
    if resume and path.exists():
        before = json.loads(path.read_text())
        changed = {k: (before.get(k), v) for k, v in fingerprint.items() if before.get(k) != v}
        if changed:
            details = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
            raise ValueError(
                f"cannot resume in {output_dir}: the earlier run used other settings "
                f"({details}); use a new output folder or the same settings"
            )
    elif not resume and (output_dir / MANIFEST).exists():
        raise FileExistsError(
            f"{output_dir} already holds a run ({MANIFEST}); pass --resume to continue it "
            "or choose an empty output folder"
        )
    with atomic_write(path, "w") as f:
        json.dump(fingerprint, f, indent=2)


# --------------------------------------------------------------------------- the run
def _distributed() -> tuple[int, int]:
    """(rank, world size): from an initialised process group, or (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _embed_batch(
    model: BEATs, loaded: list[_Loaded], options: ExtractOptions
) -> Iterator[tuple[_Loaded, np.ndarray, np.ndarray | None, bool]]:
    """Yield (loaded, embedding or tokens, centre times or None, padded?) for a batch.

    Files longer than the window go one at a time through `_embed_long`; the rest run as
    one padded batch.
    """
    limit = None if options.window is None else round(options.window * SAMPLE_RATE)
    batch = []
    for item in loaded:
        if limit is not None and len(item.wav) > limit:
            yield item, *_embed_long(model, item.wav, options), False
        else:
            batch.append(item)
    if not batch:
        return
    clips, padded = [], []
    for item in batch:
        clips.append(torch.from_numpy(pad_to_minimum(item.wav)))
        padded.append(len(item.wav) < MIN_SAMPLES)
    with torch.inference_mode():
        if options.tokens:
            labels, mask = model.extract_labels(clips)
            steps = (~mask).sum(dim=1) // PATCHES_PER_STEP
            arrays = [labels[b, : PATCHES_PER_STEP * int(n)].view(int(n), PATCHES_PER_STEP)
                      for b, n in enumerate(steps)]
        else:
            out = model.extract_features(
                clips, output_hidden_states=options.pooling.needs_hidden_states
            )
            arrays = pool(out, options.pooling, model.cfg.encoder_layers)
    for item, result, short in zip(batch, arrays, padded, strict=True):
        array = result.cpu().numpy()
        yield item, array, _times(array, options), short


def _times(array: np.ndarray, options: ExtractOptions) -> np.ndarray | None:
    """Step centre times of a time-resolved output, else None."""
    spec = options.pooling
    if options.tokens or (spec.time_resolved and spec.layers == "last"):
        return step_centres(array.shape[0])
    if spec.time_resolved:  # (layers, T, ...)
        return step_centres(array.shape[1])
    return None


def _embed_long(
    model: BEATs, wav: np.ndarray, options: ExtractOptions
) -> tuple[np.ndarray, np.ndarray | None]:
    """One long file in windows (`beats.windows`), stitched, then pooled or tokenized."""
    assert options.window is not None and options.hop is not None
    spec = options.pooling
    layers = None if options.tokens else spec.layer_indices(model.cfg.encoder_layers)
    pieces = [
        piece for _, piece in iter_windowed(
            model, wav, window_s=options.window, hop_s=options.hop,
            batch_size=options.batch_size,
            output_layer=None if layers is None else max(layers),
            output_hidden_states=layers is not None,
        )
    ]
    with torch.inference_mode():
        if options.tokens:
            ids = model.tokens_from_features(torch.cat(pieces).unsqueeze(0))[0]
            array = ids.view(-1, PATCHES_PER_STEP).cpu().numpy()
            return array, _times(array, options)
        if layers is None:
            features = torch.cat(pieces).unsqueeze(0)  # (1, S, C)
            hidden = None
        else:
            states = torch.cat(pieces, dim=1)  # (k + 1, S, C)
            features = states[-1].unsqueeze(0)
            hidden = tuple(h.unsqueeze(0) for h in states)
        mask = torch.zeros(features.shape[:2], dtype=torch.bool, device=features.device)
        out = BEATsOutput(features=features, padding_mask=mask, hidden_states=hidden)
        array = pool(out, spec, model.cfg.encoder_layers)[0].cpu().numpy()
    return array, _times(array, options)


def _embed_isolating_failures(
    model: BEATs, loaded: list[_Loaded], options: ExtractOptions
) -> Iterator[tuple[_Loaded, tuple[np.ndarray, np.ndarray | None, bool] | str]]:
    """Embed a batch; if it fails (say, out of memory), retry each clip alone so that one
    bad input fails by itself. Yields (loaded, (embedding, times, padded) or error text)."""
    if not loaded:
        return
    try:
        results = list(_embed_batch(model, loaded, options))
    except (RuntimeError, ValueError) as e:
        if len(loaded) == 1:
            yield loaded[0], f"{type(e).__name__}: {e}"
            return
        for x in loaded:
            yield from _embed_isolating_failures(model, [x], options)
        return
    for x, emb, times, short in results:
        yield x, (emb, times, short)


def extract(
    model: BEATs,
    inputs: Sequence[str | os.PathLike] | list[InputFile],
    output_dir: str | os.PathLike,
    options: ExtractOptions | None = None,
    *,
    model_name: str = "model",
    progress: bool = True,
) -> Summary:
    """Embed every input into ``output_dir``; returns the run's `Summary`.

    ``inputs`` are files, folders or list files (see `beats.files.discover_inputs`).
    Failures are recorded in the manifest and never stop the run.
    """
    options = options or ExtractOptions()
    if options.tokens and not hasattr(model, "extract_labels"):
        raise ValueError("token output needs a tokenizer model (BEATsTokenizer)")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    rank, world = _distributed()
    items = inputs if inputs and isinstance(inputs[0], InputFile) else discover_inputs(inputs)
    items = sorted(items, key=lambda it: it.key)  # type: ignore[union-attr]
    if rank == 0:
        _check_run_file(output_dir, options.fingerprint(model_name), options.resume)
        _fold_rank_manifests(output_dir)  # left by a killed distributed run
    if world > 1:
        torch.distributed.barrier()

    previous = latest_by_key(read_manifest(output_dir / MANIFEST)) if options.resume else {}
    done = _completed(output_dir, previous, options)
    mine = [it for i, it in enumerate(items) if i % world == rank]
    todo = [it for it in mine if it.key not in done]
    start = time.perf_counter()

    part = output_dir / (MANIFEST if world == 1 else f"manifest.rank{rank:03d}.jsonl")
    with ManifestWriter(part) as manifest:
        if options.resume and options.output_format == "npy":
            adopted = _adopt_unrecorded(output_dir, todo, manifest)
            todo = [it for it in todo if it.key not in adopted]
        summary = Summary(skipped=len(mine) - len(todo))
        log.info("rank %d/%d: %d inputs, %d already done, %d to embed into %s",
                 rank, world, len(mine), summary.skipped, len(todo), output_dir)
        writer: _NpyWriter | _ShardWriter = (
            _NpyWriter(output_dir, manifest) if options.output_format == "npy"
            else _ShardWriter(output_dir, manifest, options.shard_size, rank)
        )
        batches = _by_duration(todo, options.batch_size)
        loader = DataLoader(
            _BatchReader(batches), batch_size=None, shuffle=False,
            num_workers=options.num_workers,
            prefetch_factor=options.prefetch if options.num_workers > 0 else None,
            collate_fn=_as_is,
        )
        bar = _progress(len(todo), progress and rank == 0)

        def failed(x: _Loaded, error: str) -> None:
            log.warning("failed: %s", error)
            manifest.append(Record(_abs(x.item.path), x.item.key, FAILED, error=error))
            summary.failed += 1
            summary.failures.append((str(x.item.path), error))

        for loaded in loader:
            good = [x for x in loaded if x.error is None]
            for x in loaded:
                if x.error is not None:
                    failed(x, x.error)
            for x, result in _embed_isolating_failures(model, good, options):
                if isinstance(result, str):
                    failed(x, result)
                    continue
                emb, times, short = result
                record = Record(
                    _abs(x.item.path), x.item.key, PADDED if short else OK,
                    duration=x.info.duration, sample_rate=x.info.sample_rate,
                    shape=list(emb.shape),
                )
                writer.write(record, emb if options.tokens else emb.astype(np.float32), times)
                summary.padded += short
                summary.ok += not short
                summary.audio_seconds += x.info.duration
            bar.update(len(loaded))
            bar.set_postfix_str(
                f"{summary.audio_seconds / max(time.perf_counter() - start, 1e-9):.1f} audio s/s"
            )
        writer.close()
        bar.close()
    summary.seconds = time.perf_counter() - start
    log.info("rank %d: %s", rank, summary)
    if world > 1:
        _merge_manifests(output_dir, rank, world)
    return summary


def _fold_rank_manifests(output_dir: Path) -> None:
    """Append every ``manifest.rankNNN.jsonl`` to manifest.jsonl in key order, then delete
    the parts."""
    parts = sorted(output_dir.glob("manifest.rank*.jsonl"))
    if not parts:
        return
    records = [r for p in parts for r in read_manifest(p)]
    with ManifestWriter(output_dir / MANIFEST) as manifest:
        for record in sorted(records, key=lambda r: r.key):
            manifest.append(record)
    for p in parts:
        p.unlink()


def _merge_manifests(output_dir: Path, rank: int, world: int) -> None:
    """All ranks wait for each other; rank 0 folds the per-rank manifests together."""
    torch.distributed.barrier()
    if rank == 0:
        _fold_rank_manifests(output_dir)
    torch.distributed.barrier()


def _progress(total: int, enabled: bool):  # tqdm, or a no-op stand-in
    if enabled:
        from tqdm import tqdm

        return tqdm(total=total, unit="file", dynamic_ncols=True)

    class _Quiet:
        def update(self, n: int) -> None: ...
        def set_postfix_str(self, s: str) -> None: ...
        def close(self) -> None: ...

    return _Quiet()
