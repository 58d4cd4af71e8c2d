"""Embeddings for many audio files: the engine behind ``beats extract``.

Files are read by DataLoader workers while the model runs, batched by similar duration
(little padding), embedded, pooled and written one output per input (``.npy``) or in
sharded ``.safetensors``. Every outcome goes to ``manifest.jsonl``: a file that cannot
be read, holds absurd samples, gives a non-finite output or cannot be written is a
``failed`` record with its reason, and the run goes on. A rerun with ``resume=True``
skips inputs whose outputs are complete. The run holds the output folder's lock
(`beats.files.folder_lock`), so a second run into it fails at once. Under ``torchrun``
each rank takes every world-size-th input and rank 0 locks the folder and merges the
manifests. Ctrl-C stops the reading processes at once and keeps everything written.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from .audio import AUDIO_EXTENSIONS
from .errors import InputError, NonFiniteError
from .failures import ErrorLog, Failure, unexpected_notice
from .files import (
    InputFile,
    discover_inputs,
    folder_lock,
    printable,
    remove_stale_temporaries,
)
from .inputs import MIN_SAMPLES, pad_to_minimum
from .manifest import FAILED, OK, PADDED, ManifestWriter, Record, latest_by_key, read_manifest
from .model import BEATs
from .model_output import PATCHES_PER_STEP, BEATsOutput
from .outputs import (
    DISK_ERRORS,
    MANIFEST,
    NpyWriter,
    ShardWriter,
    abs_input,
    adopt_unrecorded,
    check_run_file,
    completed,
    earlier_keys,
    fold_rank_manifests,
    new_run_id,
    split_done,
)
from .pooling import PoolingSpec, pool, step_centres
from .reading import BatchReader, Loaded, as_is, by_duration, stop_workers
from .windows import SAMPLE_RATE, iter_windowed
from .workers import worker_init

log = logging.getLogger("beats.extract")

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
        max_duration: seconds; a longer file fails (its 16 kHz samples are held in memory:
            230 MB per hour). Default 4 hours; None: no limit.
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
    max_duration: float | None = 4 * 3600.0

    def __post_init__(self) -> None:
        if self.output_format not in FORMATS:
            raise InputError(f"output format {self.output_format!r}: choose one of {FORMATS}")
        if self.batch_size < 1 or self.shard_size < 1 or self.num_workers < 0:
            raise InputError("batch_size and shard_size must be >= 1, num_workers >= 0")
        if self.window is not None and self.window * 16000 < MIN_SAMPLES:
            raise InputError(f"window {self.window} s is shorter than the model's 0.175 s")
        if self.hop is not None and (self.window is None or not 0 < self.hop <= self.window):
            raise InputError("hop needs a window and must lie in (0, window]")
        if self.window is not None and self.hop is None:
            self.hop = round(0.8 * self.window, 3)
        if self.max_duration is not None and not self.max_duration > 0:
            raise InputError(f"max_duration must be > 0 seconds (or None), got "
                             f"{self.max_duration}")

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
    unexpected: int = 0  # failures of an unexpected type: their tracebacks are in errors_log
    errors_log: str | None = None

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0

    def notice(self, command: str) -> str | None:
        """The line that says unexpected errors happened, and where their tracebacks are."""
        return unexpected_notice(command, self.unexpected, self.errors_log)

    def __str__(self) -> str:
        speed = self.audio_seconds / self.seconds if self.seconds else 0.0
        return (
            f"{self.ok} ok, {self.padded} padded, {self.failed} failed, {self.skipped} "
            f"skipped (already done); {self.audio_seconds:.1f} s of audio in "
            f"{self.seconds:.1f} s ({speed:.1f} audio s/s)"
        )


@dataclass
class Job:
    """Another computation on this engine's inputs, manifest, resume, lock and failure
    handling (``beats detect``). ``command`` names the run in a busy folder's error;
    ``fingerprint`` goes to run.json; ``compute`` replaces `_embed_batch`; ``writer(out,
    manifest)`` replaces the npy/shard writers (``write(record, array, times)``,
    ``close()``); ``completed(out, earlier records)`` replaces `completed`."""

    command: str
    fingerprint: dict[str, Any]
    compute: Callable[..., Iterator[tuple[Any, Any]]]
    writer: Callable[[Path, ManifestWriter], Any]
    completed: Callable[[Path, dict[str, Record]], dict[str, Record]]


# --------------------------------------------------------------------------- embedding
_NOT_FINITE = ("the model's output holds NaN or Inf although the audio is finite: the "
               "checkpoint may hold NaN or Inf weights, or a half-precision dtype overflowed "
               "(try --dtype float32)")
_Result = tuple[np.ndarray, np.ndarray | None, bool] | Failure  # (output, times, padded)


def _not_finite(item: Loaded) -> Failure:
    return Failure.of(NonFiniteError(_NOT_FINITE), item.item.path)


def _finite(x: torch.Tensor) -> bool:
    return bool(torch.isfinite(x).all())


def _embed_batch(
    model: BEATs, loaded: list[Loaded], options: ExtractOptions
) -> Iterator[tuple[Loaded, _Result]]:
    """Yield (loaded, (output, centre times or None, padded?) or error) for a batch.

    Files longer than the window go one at a time through `_embed_long`; the rest run as
    one padded batch. An output that is not finite is an error.
    """
    limit = None if options.window is None else round(options.window * SAMPLE_RATE)
    batch = []
    for item in loaded:
        if limit is not None and len(item.wav) > limit:
            array = _embed_long(model, item.wav, options)
            yield item, (_not_finite(item) if array is None
                         else (array, _times(array, options), False))
        else:
            batch.append(item)
    if not batch:
        return
    clips, padded = [], []
    for item in batch:
        clips.append(torch.from_numpy(pad_to_minimum(item.wav)))
        padded.append(len(item.wav) < MIN_SAMPLES)
    arrays: list[torch.Tensor | None]
    with torch.inference_mode():
        if options.tokens:
            out = model.extract_features(clips)
            labels = model.tokens_from_features(out.features, out.padding_mask)
            steps = (~out.padding_mask).sum(dim=1) // PATCHES_PER_STEP
            arrays = [
                labels[b, : PATCHES_PER_STEP * int(n)].view(int(n), PATCHES_PER_STEP)
                if _finite(out.features[b][~out.padding_mask[b]]) else None
                for b, n in enumerate(steps)
            ]
        else:
            out = model.extract_features(
                clips, output_hidden_states=options.pooling.needs_hidden_states
            )
            arrays = [a if _finite(a) else None
                      for a in pool(out, options.pooling, model.cfg.encoder_layers)]
    for item, result, short in zip(batch, arrays, padded, strict=True):
        if result is None:
            yield item, _not_finite(item)
            continue
        array = result.cpu().numpy()
        yield item, (array, _times(array, options), short)


def _times(array: np.ndarray, options: ExtractOptions) -> np.ndarray | None:
    """Step centre times of a time-resolved output, else None."""
    spec = options.pooling
    if options.tokens or (spec.time_resolved and spec.layers == "last"):
        return step_centres(array.shape[0])
    if spec.time_resolved:  # (layers, T, ...)
        return step_centres(array.shape[1])
    return None


def _embed_long(model: BEATs, wav: np.ndarray, options: ExtractOptions) -> np.ndarray | None:
    """One long file in windows (`beats.windows`), stitched, then pooled or tokenized;
    None if the output is not finite."""
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
            features = torch.cat(pieces)
            if not _finite(features):
                return None
            ids = model.tokens_from_features(features.unsqueeze(0))[0]
            return ids.view(-1, PATCHES_PER_STEP).cpu().numpy()
        if layers is None:
            features = torch.cat(pieces).unsqueeze(0)  # (1, S, C)
            hidden = None
        else:
            states = torch.cat(pieces, dim=1)  # (k + 1, S, C)
            features = states[-1].unsqueeze(0)
            hidden = tuple(h.unsqueeze(0) for h in states)
        mask = torch.zeros(features.shape[:2], dtype=torch.bool, device=features.device)
        out = BEATsOutput(features=features, padding_mask=mask, hidden_states=hidden)
        array = pool(out, spec, model.cfg.encoder_layers)[0]
    return array.cpu().numpy() if _finite(array) else None


def _embed_isolating_failures(
    model: BEATs, loaded: list[Loaded], options: ExtractOptions,
    compute: Callable[..., Iterator[tuple[Any, Any]]] = _embed_batch,
) -> Iterator[tuple[Loaded, _Result]]:
    """Embed a batch (or ``compute`` it); if it fails (say, out of memory), retry each clip
    alone so that one bad input fails by itself. Yields (loaded, (output, times, padded)
    or its `Failure`)."""
    if not loaded:
        return
    try:
        with warnings.catch_warnings():  # peaks beyond [-1, 1] are in the records already
            warnings.filterwarnings("ignore", "audio in batch item", UserWarning)
            results = list(compute(model, loaded, options))
    except Exception as e:  # one file never stops a run
        if len(loaded) == 1:
            yield loaded[0], Failure.of(e, loaded[0].item.path)
            return
        for x in loaded:
            yield from _embed_isolating_failures(model, [x], options, compute)
        return
    yield from results


# --------------------------------------------------------------------------- the run
def _distributed() -> tuple[int, int]:
    """(rank, world size): from an initialised process group, or (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _no_audio(inputs: Sequence[Any]) -> InputError:
    named = ", ".join(printable(os.fsdecode(p)) for p in list(inputs)[:3])
    more = f" and {len(inputs) - 3} more" if len(inputs) > 3 else ""
    return InputError(
        f"no audio files found in {named or 'the inputs'}{more} (looked for files ending in "
        f"{' '.join(AUDIO_EXTENSIONS)}, in any case); give audio files, folders holding "
        "them, or .txt/.lst lists of paths"
    )


def _open_run(
    output_dir: Path, options: ExtractOptions, model_name: str, rank: int, world: int,
    stack: contextlib.ExitStack, device: torch.device, job: Job | None = None,
) -> str:
    """Rank 0 locks the folder (held until ``stack`` closes), checks and writes run.json
    and folds manifests a killed distributed run left. Every rank gets the run id, or
    raises rank 0's error."""
    outcome: str | Exception
    if rank == 0:
        command = "beats tokenize" if options.tokens else "beats extract"
        fingerprint = options.fingerprint(model_name)
        if job is not None:
            command, fingerprint = job.command, job.fingerprint
        try:
            stack.enter_context(folder_lock(output_dir, command))
            check_run_file(output_dir, fingerprint, options.resume)
            remove_stale_temporaries(output_dir)  # a killed run's half-written files
            fold_rank_manifests(output_dir)
            outcome = new_run_id()
        except Exception as e:
            if world == 1:
                raise
            outcome = e
    if world > 1:
        box: list[Any] = [outcome if rank == 0 else None]
        torch.distributed.broadcast_object_list(
            box, src=0, device=device if device.type == "cuda" else None)
        outcome = box[0]
    if isinstance(outcome, Exception):
        raise outcome
    return outcome


def extract(
    model: BEATs,
    inputs: Sequence[str | os.PathLike] | list[InputFile],
    output_dir: str | os.PathLike,
    options: ExtractOptions | None = None,
    *,
    model_name: str = "model",
    progress: bool = True,
    job: Job | None = None,
) -> Summary:
    """Embed every input into ``output_dir`` (or run ``job`` on it); returns the run's
    `Summary`.

    ``inputs`` are files, folders or list files (see `beats.files.discover_inputs`).
    Failures are recorded in the manifest and never stop the run. Raises `InputError`
    when the inputs hold no audio file or a resume cannot continue, `RunExistsError`
    (a ``FileExistsError``) for a folder holding another run,
    `beats.files.FolderBusyError` while another run writes into it, and
    ``KeyboardInterrupt`` after Ctrl-C (everything finished is kept).
    """
    options = options or ExtractOptions()
    if options.tokens and not hasattr(model, "tokens_from_features"):
        raise InputError("token output needs a tokenizer model (BEATsTokenizer)")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    rank, world = _distributed()
    given = list(inputs)
    items = given if given and isinstance(given[0], InputFile) else discover_inputs(given)
    if not items:
        raise _no_audio(given)
    with contextlib.ExitStack() as stack:
        run_id = _open_run(output_dir, options, model_name, rank, world, stack,
                           model.device, job)
        previous = latest_by_key(read_manifest(output_dir / MANIFEST)) if options.resume else {}
        items = sorted(earlier_keys(items, previous), key=lambda it: it.key)  # type: ignore[arg-type]
        done = (completed(output_dir, previous, options.output_format == "npy") if job is None
                else job.completed(output_dir, previous))
        mine = [it for i, it in enumerate(items) if i % world == rank]
        todo, skipped = split_done(mine, done)
        summary = _run(model, todo, output_dir, options, rank, world, run_id, progress, job)
        summary.skipped += skipped
        if world > 1:
            _merge_manifests(output_dir, rank)
    return summary


def _run(
    model: BEATs, todo: list[InputFile], output_dir: Path, options: ExtractOptions,
    rank: int, world: int, run_id: str, progress: bool, job: Job | None = None,
) -> Summary:
    """Embed and write ``todo``, recording every outcome in this rank's manifest (and the
    tracebacks of unexpected failures in ``errors.log``)."""
    start = time.perf_counter()
    errors = ErrorLog(output_dir)
    part = output_dir / (MANIFEST if world == 1 else f"manifest.rank{rank:03d}.jsonl")
    with ManifestWriter(part) as manifest:
        summary = Summary()  # ``skipped``: outputs adopted here; the caller adds the rest
        if options.resume and options.output_format == "npy" and job is None:
            adopted = adopt_unrecorded(output_dir, todo, manifest)
            todo = [it for it in todo if it.key not in adopted]
            summary.skipped = len(adopted)
        log.info("rank %d/%d: %d inputs to embed into %s", rank, world, len(todo), output_dir)
        writer: Any = (
            NpyWriter(output_dir, manifest) if options.output_format == "npy"
            else ShardWriter(output_dir, manifest, options.shard_size, rank, run_id)
        ) if job is None else job.writer(output_dir, manifest)
        compute = _embed_batch if job is None else job.compute
        stop = multiprocessing.Event()
        loader = DataLoader(
            BatchReader(by_duration(todo, options.batch_size), options.max_duration, stop),
            batch_size=None, shuffle=False, num_workers=options.num_workers,
            prefetch_factor=options.prefetch if options.num_workers > 0 else None,
            collate_fn=as_is, worker_init_fn=worker_init if options.num_workers else None,
        )
        bar = _progress(len(todo), progress and rank == 0)
        batches = iter(loader)
        try:
            for loaded in batches:
                _consume(model, loaded, options, writer, manifest, summary, errors, compute)
                bar.update(len(loaded))
                speed = summary.audio_seconds / max(time.perf_counter() - start, 1e-9)
                bar.set_postfix_str(f"{speed:.1f} audio s/s")
        except KeyboardInterrupt:
            stop.set()
            stop_workers(batches)
            raise
        finally:
            bar.close()
            writer.close()  # the last shard, also after Ctrl-C: nothing finished is lost
    summary.seconds = time.perf_counter() - start
    summary.unexpected, summary.errors_log = errors.count, str(errors.path)
    log.info("rank %d: %s", rank, summary)
    return summary


def _consume(
    model: BEATs, loaded: list[Loaded], options: ExtractOptions, writer: Any,
    manifest: ManifestWriter, summary: Summary, errors: ErrorLog,
    compute: Callable[..., Iterator[tuple[Any, Any]]] = _embed_batch,
) -> None:
    """Embed one loaded batch, write its outputs and record every outcome."""
    def failed(x: Loaded, failure: Failure) -> None:
        log.warning("failed: %s", failure.text)
        info = x.info
        manifest.append(Record(
            abs_input(x.item.path), x.item.key, FAILED, error=failure.text,
            duration=None if info is None else info.duration,
            sample_rate=None if info is None else info.sample_rate,
        ))
        errors.add(abs_input(x.item.path), failure)
        summary.failed += 1
        summary.failures.append((printable(str(x.item.path)), failure.text))

    good = [x for x in loaded if x.error is None]
    for x in loaded:
        if x.error is not None:
            failed(x, x.error)
    for x, result in _embed_isolating_failures(model, good, options, compute):
        if isinstance(result, Failure):
            failed(x, result)
            continue
        array, times, short = result
        assert x.info is not None
        record = Record(
            abs_input(x.item.path), x.item.key, PADDED if short else OK,
            duration=x.info.duration, sample_rate=x.info.sample_rate, shape=list(array.shape),
            extra={"warning": x.warning} if x.warning else {},
        )
        try:
            writer.write(record, array if options.tokens else array.astype(np.float32), times)
        except Exception as e:
            if isinstance(e, OSError) and e.errno in DISK_ERRORS:
                raise  # the disk, not this file: stop the run
            failed(x, Failure.of(e, x.item.path, "cannot write its output"))
            continue
        summary.padded += short
        summary.ok += not short
        summary.audio_seconds += x.info.duration


def _merge_manifests(output_dir: Path, rank: int) -> None:
    """All ranks wait for each other; rank 0 folds the per-rank manifests together."""
    torch.distributed.barrier()
    if rank == 0:
        fold_rank_manifests(output_dir)
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
