"""Argument types and the help formatter every subcommand shares.

The types make argparse itself refuse a bad value, so the message names the flag and the
value (``argument -b/--batch-size: must be a positive integer, got 0``) and the exit code
is 2, like every other bad argument. `warnings_as_lines` shows the package's warnings as
one line each, as the command line shows errors.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import sys
import textwrap
import warnings
from collections.abc import Iterator
from pathlib import Path

from ..files import printable


class HelpFormatter(argparse.HelpFormatter):
    """Appends ``(default: X)`` to an option's help unless it has no real default (None,
    False for flags) or its help already states one."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (
            default is None
            or default is False
            or default is argparse.SUPPRESS
            or "default" in text
            or not action.option_strings
        ):
            return text
        shown = ",".join(map(str, default)) if isinstance(default, (list, tuple)) else default
        return f"{text} (default: {str(shown).replace('%', '%%')})"

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        """Paragraphs filled one by one; a line starting with spaces is a table row
        (``  CODE  meaning``) whose continuation lines hang under its meaning."""
        out = []
        for line in text.splitlines():
            row = re.match(r"^(\s+\S+\s+)(.*)$", line)
            if row:
                lead = indent + row.group(1)
                out.append(textwrap.fill(row.group(2), width, initial_indent=lead,
                                         subsequent_indent=" " * len(lead)))
            else:
                out.append(super()._fill_text(line, width, indent) if line.strip() else "")
        return "\n".join(out)


def positive_int(text: str) -> int:
    """An int >= 1 (batch sizes, counts)."""
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_int(text: str) -> int:
    """An int >= 0 (worker counts, where 0 means none)."""
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or a positive integer, got {text}")
    return value


def non_negative_float(text: str) -> float:
    """A finite float >= 0 (seconds, where 0 means off)."""
    value = _float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or a positive number, got {text}")
    return value


def positive_float(text: str) -> float:
    """A finite float > 0 (seconds, rates)."""
    value = _float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def fraction(text: str) -> float:
    """A share in [0, 1) (of the files held out for validation or testing)."""
    value = _float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1) (a share of the files), got "
                                         f"{text}")
    return value


def output_folder(text: str) -> str:
    """A folder to write into: absent (it is created) or an existing folder, not a file."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(
            f"{text} is a file: give a folder for the outputs (it is created if needed)"
        )
    return text


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


@contextlib.contextmanager
def warnings_as_lines(command: str) -> Iterator[None]:
    """While the block runs, each warning is one line on stderr, ``beats COMMAND: warning:
    WHAT``, instead of Python's two (file, line and source)."""
    def show(message, category, filename, lineno, file=None, line=None) -> None:
        text = " ".join(str(message).split())
        print(f"beats {command}: warning: {printable(text)}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield
