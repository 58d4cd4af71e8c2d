"""The errors beats raises for what a user can fix.

`BeatsError` is the base of every error that means "the request cannot be carried out as
given": bad arguments, bad input data, a setup problem (a missing model, a folder in use).
The command line prints such an error as one line and exits 2; any other exception is a
bug in beats (see `beats.cli` for the whole policy). Raise these types, never a bare
``ValueError`` or ``RuntimeError``, for what a user can fix.

`InputError` is also a ``ValueError``, `NotFoundError` a ``FileNotFoundError`` and
`UnreachableError` a ``ConnectionError``, so that Python callers who catch those keep
working.
"""

from __future__ import annotations


class BeatsError(Exception):
    """An error the user can fix; its message says what was wrong and what to do."""


class InputError(BeatsError, ValueError):
    """Bad arguments, configuration or input data."""


class NotFoundError(BeatsError, FileNotFoundError):
    """A file, folder or model that is not there (also a ``FileNotFoundError``)."""


class UnreachableError(BeatsError, ConnectionError):
    """A server that did not answer, with nothing cached to use instead (also a
    ``ConnectionError``)."""


class NonFiniteError(BeatsError):
    """A model's output holds NaN or Inf although its input is finite: NaN or Inf weights
    in the checkpoint, or a half-precision dtype that overflowed."""


class RunExistsError(BeatsError, FileExistsError):
    """An output folder that holds another run, without ``--resume`` (also a
    ``FileExistsError``)."""
