"""``manifest.jsonl``: one JSON record per processed input, appended as work completes.

Each record: ``input`` (absolute path), ``key`` (its place in the output tree),
``duration`` (seconds, as stored), ``sample_rate`` (Hz, as stored), ``output`` (path
relative to the output folder, or ``shard#key`` for safetensors shards), ``shape``,
``status`` (``ok``, ``padded``: shorter than the model minimum and zero-padded, or
``failed``) and ``error`` (null unless failed). Records are appended and fsynced one at a
time, so a run killed at any moment leaves every finished record readable; a torn last
line is ignored when the manifest is read back.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

OK, PADDED, FAILED = "ok", "padded", "failed"


@dataclass
class Record:
    input: str
    key: str
    status: str
    duration: float | None = None
    sample_rate: int | None = None
    output: str | None = None
    shape: list[int] | None = None
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        data = asdict(self)
        data.update(data.pop("extra"))
        return json.dumps(data, ensure_ascii=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Record:
        names = {f for f in cls.__dataclass_fields__ if f != "extra"}
        known = {k: v for k, v in data.items() if k in names}
        extra = {k: v for k, v in data.items() if k not in names}
        return cls(**known, extra=extra)


def read_manifest(path: Path) -> list[Record]:
    """Every complete record of a manifest, in order (a torn or broken line is skipped)."""
    if not path.exists():
        return []
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                records.append(Record.from_dict(json.loads(line)))
            except (json.JSONDecodeError, TypeError):
                continue
    return records


def latest_by_key(records: list[Record]) -> dict[str, Record]:
    """The last record of each input key (a resumed run supersedes earlier attempts)."""
    return {r.key: r for r in records}


class ManifestWriter:
    """Appends records durably: one write, flush and fsync per record."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        if self._file.tell() > 0:
            with open(path, "rb") as f:  # start on a fresh line after a torn record
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    self._file.write("\n")

    def append(self, record: Record) -> None:
        self._file.write(record.to_json() + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> ManifestWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
