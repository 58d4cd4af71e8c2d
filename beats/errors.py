"""The errors beats raises for what a user can fix.

`BeatsError` is the base of every error that means "the request cannot be carried out as
given": bad arguments, bad input data, a setup problem (a missing model, a folder in use).
The command line prints such an error as one line and exits 2. Any other exception is a
bug in beats.

`InputError` is also a ``ValueError`` so that Python callers who catch ``ValueError`` for
bad arguments keep working.
"""

from __future__ import annotations


class BeatsError(Exception):
    """An error the user can fix; its message says what was wrong and what to do."""


class InputError(BeatsError, ValueError):
    """Bad arguments, configuration or input data."""
