"""``manifest.jsonl``: one JSON record per processed input, appended as work completes.

Each record: ``input`` (absolute path), ``key`` (its place in the output tree),
``duration`` (seconds, as decoded), ``sample_rate`` (Hz, as stored), ``output`` (path
relative to the output folder, or ``shard#key`` for safetensors shards), ``shape``,
``status`` (``ok``, ``padded``: shorter than the model minimum and zero-padded, or
``failed``), ``error`` (null unless failed) and, only when there is one, ``warning``
(say, a damaged file whose decoding stopped early). Records are appended and fsynced one
at a time, so a run killed at any moment leaves every finished record readable.

The file is UTF-8. File names that are not valid UTF-8 (Python holds their bytes as
lone surrogates, ``\\udcXX``) are written as JSON escapes of those surrogates, so
`read_manifest` gives back the very same names. Reading skips every line that is not a
whole record: torn, invalid UTF-8, not JSON, JSON that is not a record.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

OK, PADDED, FAILED = "ok", "padded", "failed"
STATUSES = (OK, PADDED, FAILED)
_SURROGATE = re.compile("[\ud800-\udfff]")


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
        """One line of JSON (no newline); lone surrogates become ``\\udcXX`` escapes."""
        data = asdict(self)
        data.update(data.pop("extra"))
        text = json.dumps(data, ensure_ascii=False)
        return _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Record:
        names = {f for f in cls.__dataclass_fields__ if f != "extra"}
        known = {k: v for k, v in data.items() if k in names}
        extra = {k: v for k, v in data.items() if k not in names}
        return cls(**known, extra=extra)


def _is_path(value: Any) -> bool:
    """A str the file system can take (lone surrogates only as surrogateescape bytes)."""
    if not isinstance(value, str) or not value:
        return False
    try:
        os.fsencode(value)
    except UnicodeEncodeError:
        return False
    return True


def _number(value: Any) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def _shape(value: Any) -> bool:
    return value is None or (isinstance(value, list) and all(
        isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in value))


def parse_record(line: bytes) -> Record | None:
    """The record on one manifest line, or None when the line is not a whole record."""
    try:
        data = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    if not isinstance(data, dict):
        return None
    checks = (
        _is_path(data.get("input")),
        _is_path(data.get("key")),
        data.get("status") in STATUSES,
        _number(data.get("duration")),
        _number(data.get("sample_rate")),
        data.get("output") is None or _is_path(data.get("output")),
        _shape(data.get("shape")),
        data.get("error") is None or isinstance(data.get("error"), str),
    )
    return Record.from_dict(data) if all(checks) else None


def read_manifest(path: Path) -> list[Record]:
    """Every whole record of a manifest, in order; any other line is skipped."""
    if not path.exists():
        return []
    records = []
    with open(path, "rb") as f:
        for line in f:
            record = parse_record(line.strip())
            if record is not None:
                records.append(record)
    return records


def latest_by_key(records: list[Record]) -> dict[str, Record]:
    """The last record of each input key (a resumed run supersedes earlier attempts)."""
    return {r.key: r for r in records}


class ManifestWriter:
    """Appends records durably: one write, flush and fsync per record.

    Each record starts on a fresh line: if the file does not end in a newline (a run was
    killed mid-line), one is written first, so a torn line never swallows a new record.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "ab+") as f:  # start on a fresh line after a torn record
            if f.seek(0, os.SEEK_END) and os.pread(f.fileno(), 1, f.tell() - 1) != b"\n":
                f.write(b"\n")
        self._file = open(path, "ab")  # noqa: SIM115 - closed in close()

    def append(self, record: Record) -> None:
        self._file.write(record.to_json().encode("utf-8") + b"\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> ManifestWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
