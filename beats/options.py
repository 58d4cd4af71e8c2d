"""Config fields that describe themselves: help text, bounds, choices and command-line flags.

A config dataclass declares each setting once, with `option`::

    lr: float = option(1e-4, help="peak learning rate (AdamW)", gt=0, group="optimiser")

and calls `check` from ``__post_init__``. The same metadata makes the command line's
options, their ``--help`` (with the default), the checks and the documentation's
configuration reference, so none of them can drift from the others.

A value outside its bounds or choices raises `OptionError`, which names the field in
Python (``lr must be a positive number, got -1.0``) and the option on the command line
(``--lr must be a positive number, got -1.0``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any

from .errors import InputError

# The metadata keys `option` writes; a field carrying "help" is an option.
KEYS = ("help", "flags", "unset", "ge", "gt", "le", "lt", "choices", "group", "metavar", "cli")


class OptionError(InputError):
    """A setting outside its bounds or choices, or settings that exclude each other.

    ``template`` names each setting as ``{field_name}``; ``str(error)`` names them as
    fields, `named` as the command line's options.
    """

    def __init__(self, template: str, *names: str) -> None:
        self.template = template
        self.names = names
        super().__init__(template.format(**{n: n for n in names}))

    def named(self, label: Callable[[str], str]) -> str:
        """The message with each setting called ``label(field_name)``."""
        return self.template.format(**{n: label(n) for n in self.names})


def option(default: Any = dataclasses.MISSING, *, help: str,
           factory: Callable[[], Any] | None = None, flags: Sequence[str] | None = None,
           unset: str | None = None, ge: float | None = None, gt: float | None = None,
           le: float | None = None, lt: float | None = None,
           choices: Sequence[Any] | None = None, group: str | None = None,
           metavar: str | None = None, cli: bool = True) -> Any:
    """A dataclass field that describes itself.

    Args:
        default: the default (or ``factory`` for a mutable one).
        help: what the setting means, one sentence without its default.
        flags: the command-line flags (default: ``--field-name``).
        unset: what None means, for a setting whose default is None (shown as the default).
        ge, gt, le, lt: bounds (>=, >, <=, <); numbers are also checked to be finite.
        choices: the allowed values.
        group: the ``--help`` section of the option (None: the command's own options).
        metavar: the value's name in ``--help``.
        cli: False for a setting the command line sets another way.
    """
    metadata = {"help": help, "flags": tuple(flags) if flags else None, "unset": unset,
                "ge": ge, "gt": gt, "le": le, "lt": lt,
                "choices": tuple(choices) if choices is not None else None, "group": group,
                "metavar": metavar, "cli": cli}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def override(base: type, name: str, default: Any = dataclasses.MISSING, **changes: Any) -> Any:
    """Field ``name`` of the dataclass ``base`` with another default and/or other metadata
    (``help=``, ``flags=``, ...): a subclass's own default or wording of a shared setting."""
    old = next(f for f in dataclasses.fields(base) if f.name == name)
    unknown = set(changes) - set(KEYS)
    if unknown:
        raise TypeError(f"override: unknown metadata {sorted(unknown)}")
    metadata = {**old.metadata, **changes}
    if default is dataclasses.MISSING:
        if old.default_factory is not dataclasses.MISSING:
            return dataclasses.field(default_factory=old.default_factory, metadata=metadata)
        default = old.default
    return dataclasses.field(default=default, metadata=metadata)


# --------------------------------------------------------------------------- reading
def is_option(field: dataclasses.Field) -> bool:
    """Whether ``field`` was declared with `option`."""
    return "help" in field.metadata


def options_of(cls: type) -> list[dataclasses.Field]:
    """The fields of ``cls`` declared with `option`, in declaration order."""
    return [f for f in dataclasses.fields(cls) if is_option(f)]


def flags(field: dataclasses.Field) -> tuple[str, ...]:
    """The command-line flags of ``field`` (``--field-name`` unless it names others)."""
    return field.metadata.get("flags") or ("--" + field.name.replace("_", "-"),)


def flag(field: dataclasses.Field) -> str:
    """The option's long name (its last flag): how messages name it."""
    return flags(field)[-1]


def default_of(field: dataclasses.Field) -> Any:
    """The field's default (made by its factory if it has one)."""
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


@functools.cache
def value_types(cls: type) -> dict[str, tuple[type, bool]]:
    """{field: (value type, None allowed)}: ``int | None`` -> (int, True); tuples -> tuple."""
    out = {}
    for name, hint in typing.get_type_hints(cls).items():
        args = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
        plain = [a for a in args if a is not type(None)]
        kind = (typing.get_origin(plain[0]) or plain[0]) if len(plain) == 1 else object
        out[name] = (kind if isinstance(kind, type) else object, type(None) in args)
    return out


def describe(kind: type, meta: dict[str, Any]) -> str:
    """What a value must be, in words: ``a positive integer``, ``in [0, 1)``, ..."""
    ge, gt, le, lt = (meta.get(k) for k in ("ge", "gt", "le", "lt"))
    number = "an integer" if kind is int else "a number"
    if (ge is not None or gt is not None) and (le is not None or lt is not None):
        low = f"[{ge:g}" if ge is not None else f"({gt:g}"
        high = f"{le:g}]" if le is not None else f"{lt:g})"
        return f"{number} in {low}, {high}"
    if (ge == 1 and kind is int) or (gt == 0 and kind is not int):
        return "a positive integer" if kind is int else "a positive number"
    if ge == 0:
        return f"0 or {'a positive integer' if kind is int else 'a positive number'}"
    of = "an integer of " if kind is int else ""
    for bound, words in ((ge, "at least"), (gt, "more than"), (le, "at most"),
                         (lt, "less than")):
        if bound is not None:
            return f"{of}{words} {bound:g}"
    return number


def _braces(text: str) -> str:
    return text.replace("{", "{{").replace("}", "}}")


def check(obj: Any) -> None:
    """Check every `option` field of the dataclass instance ``obj``: its type, bounds and
    choices; raises `OptionError` naming the first bad one."""
    kinds = value_types(type(obj))
    for field in options_of(type(obj)):
        check_value(field, kinds[field.name], getattr(obj, field.name))


def check_value(field: dataclasses.Field, kind_none: tuple[type, bool], value: Any) -> None:
    """Check one value of ``field`` (see `check`)."""
    kind, none_ok = kind_none
    meta = field.metadata
    name = "{" + field.name + "}"

    def fail(what: str) -> None:
        raise OptionError(f"{name} must be {_braces(what)}, got {_braces(repr(value))}",
                          field.name)

    if value is None:
        if not none_ok:
            fail(describe(kind, meta) if kind in (int, float) else f"a {kind.__name__}")
        return
    choices = meta.get("choices")
    if choices is not None:
        if value not in choices:
            fail("one of " + ", ".join(map(str, choices)))
        return
    if kind is bool and not isinstance(value, bool):
        fail("true or false")
    if kind is str and not isinstance(value, str):
        fail("a string")
    items = list(value) if kind is tuple and isinstance(value, (list, tuple)) else [value]
    if kind in (int, float, tuple):
        for item in items:
            if not _in_bounds(item, int if kind is int else float, meta):
                fail(describe(int if kind is int else float, meta))


def _in_bounds(value: Any, kind: type, meta: dict[str, Any]) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if kind is int and not isinstance(value, int):
        return False
    if not math.isfinite(value):
        return False
    ge, gt, le, lt = (meta.get(k) for k in ("ge", "gt", "le", "lt"))
    return ((ge is None or value >= ge) and (gt is None or value > gt)
            and (le is None or value <= le) and (lt is None or value < lt))


def coerce(cls: type, name: str, value: Any) -> Any:
    """A JSON value as field ``name`` of ``cls`` holds it: floats from ints, tuples from
    lists; anything else is returned as is (`check` judges it)."""
    kind, _ = value_types(cls)[name]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is tuple and isinstance(value, list):
        return tuple(value)
    return value
