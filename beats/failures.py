"""What went wrong, and whether it was expected: the one error policy of every command.

Expected errors are what a user, the data or the machine causes: `beats.errors.BeatsError`
and its subclasses (bad arguments, input or setup), ``OSError`` raised by the system with
an errno (a missing file, a full or read-only disk, permissions), and running out of
memory. Anything else is a bug in beats.

- A run stops on an expected error with one line (exit code 2), and on any other with
  one line saying it is a bug and naming the file that holds its traceback (exit code 3):
  `bug_report` writes it.
- One input's failure never stops a run. Its record's ``error`` starts with the
  exception's type (`Failure`, ``AudioError: a.wav: ...``); an unexpected type also
  gets its traceback in ``OUT/errors.log`` (`ErrorLog`), and the command's summary says so.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from .errors import BeatsError

ERRORS_LOG = "errors.log"  # tracebacks of unexpected errors, in the output folder
BUG_FOLDER = "beats-errors"  # under the temporary folder, for runs without an output folder


def out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is running out of (host or GPU) memory."""
    if isinstance(error, MemoryError):
        return True
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(error, torch.cuda.OutOfMemoryError):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and (
        "can't allocate memory" in text or "not enough memory" in text
        or "CUDA out of memory" in text)


def expected(error: BaseException) -> bool:
    """Whether ``error`` is caused by the user, the data or the machine (not a bug)."""
    if isinstance(error, BeatsError) or out_of_memory(error):
        return True
    return isinstance(error, OSError) and error.errno is not None


def one_line(text: str) -> str:
    """``text`` with its lines joined: an error is one line on the terminal."""
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


def describe(error: BaseException) -> str:
    """``Type: message`` on one line (the type alone for an empty message)."""
    message = one_line(str(error))
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


@dataclass(frozen=True)
class Failure:
    """Why one input failed: ``text`` (``Type: file: message``, its record's ``error``)
    and, for an unexpected error type, ``trace`` (its traceback)."""

    text: str
    trace: str | None = None

    @classmethod
    def of(cls, error: BaseException, where: str | os.PathLike | None = None,
           doing: str = "") -> Failure:
        """The failure of ``error`` met reading or computing ``where`` (a file name the
        text names unless the message does already); ``doing`` prefixes the message."""
        message = one_line(str(error))
        if doing:
            message = f"{doing}: {message}" if message else doing
        if where is not None:
            from .files import printable

            name = printable(os.fsdecode(where))
            if not message.startswith(name):
                message = f"{name}: {message}" if message else name
        text = f"{type(error).__name__}: {message}" if message else type(error).__name__
        trace = None if expected(error) else "".join(traceback.format_exception(error))
        return cls(text, trace)


class ErrorLog:
    """Appends the tracebacks of unexpected per-input errors to ``folder/errors.log`` (no
    folder: a new file in the temporary folder's ``beats-errors/``, for a command without
    an output folder); ``count`` of them this run. The file is only created when there is
    one."""

    def __init__(self, folder: str | os.PathLike | None, command: str = "beats") -> None:
        self.path = Path(folder) / ERRORS_LOG if folder is not None else _temporary(command)
        self.count = 0

    def add(self, source: str, failure: Failure) -> None:
        if failure.trace is None:
            return
        self.count += 1
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        entry = f"--- {stamp} pid {os.getpid()} {source}\n{failure.trace}\n"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8", errors="backslashreplace") as f:
            f.write(entry)

    def notice(self, command: str) -> str | None:
        """The summary line saying unexpected errors happened (None when none did)."""
        return unexpected_notice(command, self.count, self.path)


def unexpected_notice(command: str, count: int, log: str | os.PathLike | None) -> str | None:
    """``beats COMMAND: N input(s) failed with an unexpected error ...: the tracebacks are
    in LOG ...``; None when ``count`` is 0."""
    if not count:
        return None
    return (f"beats {command}: {count} input(s) failed with an unexpected error, probably a "
            f"bug in beats: the tracebacks are in {log}; please report them")


def bug_report(command: str, error: BaseException, output: str | os.PathLike | None) -> Path:
    """Write ``error``'s traceback for a report, return the file: ``OUT/errors.log`` when
    the run's output folder exists (and can be written), else a new file in
    ``TMPDIR/beats-errors/``."""
    from . import __version__

    text = (f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} beats {__version__} "
            f"{command} (pid {os.getpid()}; python {sys.version.split()[0]})\n"
            f"argv: {sys.argv}\n" + "".join(traceback.format_exception(error)) + "\n")
    if output is not None and Path(output).is_dir():
        path = Path(output) / ERRORS_LOG
        try:
            with open(path, "a", encoding="utf-8", errors="backslashreplace") as f:
                f.write(text)
            return path
        except OSError:
            pass  # a read-only or full output folder: the temporary folder then
    path = _temporary(command)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8", errors="backslashreplace")
    return path


def _temporary(command: str) -> Path:
    """``TMPDIR/beats-errors/COMMAND-DATE-TIME-PID.log``."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path(tempfile.gettempdir()) / BUG_FOLDER / f"{command}-{stamp}-{os.getpid()}.log"
