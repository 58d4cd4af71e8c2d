"""Command-line options made from config fields (`beats.options.option`).

Each field of a config dataclass becomes one option: its flags, its value's type, its
``--help`` line ending in ``(default: X)`` (or, for a default of None, what None means)
and its ``--help`` section all come from the field. `Option` rows describe what was added.

Two ways to check values:

- ``checked=False`` (the training commands, the probe): argparse only parses the value
  (an integer, a finite number, ...); the config's own check judges it when the config
  is built, and `named_error` turns the message's field names into the flags
  (``--lr must be a positive number, got -1.0``). Values from ``--config-file`` are
  judged the same way.
- ``checked=True``: the bounds and choices are checked as argparse parses the value
  (``argument --min-gap: must be 0 or a positive number, got -1``), for configs that do
  not check themselves.

``layered=True`` leaves an option that was not given out of the parsed arguments
(argparse's SUPPRESS), so that `given` tells the options given from the defaults: the
training commands layer the config's defaults < a preset's < ``--config-file`` < the
options given, with one parse of the command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

from ..errors import InputError
from ..options import OptionError, default_of, describe, flag, flags, options_of, value_types


class Option(NamedTuple):
    """One option made from a field: ``kind`` is ``"flag"`` for a switch, else the type."""

    field: str
    flags: tuple[str, ...]
    kind: Any
    help: str


def add_options(
    p: argparse.ArgumentParser | Any, cls: type, names: Sequence[str] | None = None, *,
    layered: bool = False, checked: bool = False, notes: Mapping[str, str] | None = None,
    defaults: Mapping[str, Any] | None = None,
) -> list[Option]:
    """Add an option to ``p`` for each command-line field of ``cls`` (or those ``names``),
    grouped by their ``group``; ``notes[name]`` is added before the shown default and
    ``defaults[name]`` replaces a field's default. Returns what was added, in order."""
    kinds = value_types(cls)
    chosen = [f for f in options_of(cls) if f.metadata.get("cli", True)
              and (names is None or f.name in names)]
    if names is not None:
        order = {n: i for i, n in enumerate(names)}
        chosen.sort(key=lambda f: order[f.name])
    sections: dict[str, Any] = {}
    added = []
    for field in chosen:
        group = field.metadata.get("group")
        target = p
        if group:
            if group not in sections:
                sections[group] = p.add_argument_group(group)
            target = sections[group]
        default = (defaults or {}).get(field.name, default_of(field))
        added.append(_add(target, field, kinds[field.name][0], default, layered, checked,
                          (notes or {}).get(field.name)))
    return added


def _add(p: Any, field: dataclasses.Field, kind: type, default: Any, layered: bool,
         checked: bool, note: str | None) -> Option:
    meta = field.metadata
    names = flags(field)
    text = meta["help"]
    if kind is bool:
        p.add_argument(*names, dest=field.name, action="store_true",
                       default=argparse.SUPPRESS if layered else False,
                       help=_escape(text + (f" ({note})" if note else "")))
        return Option(field.name, names, "flag", text)
    shown = shown_default(field, default)
    help_text = f"{text}{'; ' + note if note else ''} (default: {shown})"
    kwargs: dict[str, Any] = {"dest": field.name, "help": _escape(help_text),
                              "type": value_parser(field, kind, checked),
                              "default": argparse.SUPPRESS if layered else default}
    metavar = meta.get("metavar")
    if kind is tuple:
        kwargs["nargs"] = len(default)
    if metavar is None and meta.get("choices") is not None:
        metavar = "{" + ",".join(map(str, meta["choices"])) + "}"
    if metavar is not None:
        kwargs["metavar"] = metavar
    p.add_argument(*names, **kwargs)
    return Option(field.name, names, kwargs["type"], help_text)


def shown_default(field: dataclasses.Field, default: Any) -> str:
    """A default as ``--help`` shows it: None as what it means, a pair as typed."""
    if default is None:
        return field.metadata.get("unset") or "none"
    if isinstance(default, (tuple, list)):
        return " ".join(map(str, default))
    return str(default)


def _escape(text: str) -> str:
    return text.replace("%", "%%")  # argparse fills %(...)s in help


def value_parser(field: dataclasses.Field, kind: type, checked: bool) -> Callable[[str], Any]:
    """The argparse ``type`` of a field's option: parses (and, ``checked``, judges) one
    value; a bad one is an `argparse.ArgumentTypeError` naming what was expected."""
    meta = field.metadata
    number = float if kind is tuple else kind

    def parse(text: str) -> Any:
        if number is int:
            try:
                value: Any = int(text)
            except ValueError:
                raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        elif number is float:
            try:
                value = float(text)
            except ValueError:
                raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
            if not math.isfinite(value):
                raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        else:
            value = text
        if checked:
            choices = meta.get("choices")
            if choices is not None and value not in choices:
                raise argparse.ArgumentTypeError(
                    f"must be one of {', '.join(map(str, choices))}, got {text!r}")
            if number in (int, float) and not _within(value, meta):
                raise argparse.ArgumentTypeError(f"must be {describe(number, meta)}, got "
                                                 f"{text}")
        return value

    parse.__name__ = field.name  # argparse names the type in some messages
    return parse


def _within(value: float, meta: Mapping[str, Any]) -> bool:
    ge, gt, le, lt = (meta.get(k) for k in ("ge", "gt", "le", "lt"))
    return ((ge is None or value >= ge) and (gt is None or value > gt)
            and (le is None or value <= le) and (lt is None or value < lt))


# --------------------------------------------------------------------------- reading
def given(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The fields of ``cls`` whose options were given (options added ``layered``)."""
    values = {}
    for field in options_of(cls):
        if hasattr(args, field.name):
            value = getattr(args, field.name)
            values[field.name] = tuple(value) if isinstance(value, list) else value
    return values


def named_error(error: OptionError, cls: type) -> InputError:
    """``error`` with each field that is an option named by its flag (``--lr``)."""
    fields = {f.name: f for f in options_of(cls) if f.metadata.get("cli", True)}
    return InputError(error.named(lambda n: flag(fields[n]) if n in fields else n))


def build_config(cls: type, values: Mapping[str, Any], make: Callable[..., Any] | None = None
                 ) -> Any:
    """``make(values)`` (default: ``cls(**values)``), its `OptionError` naming flags."""
    try:
        return make(dict(values)) if make is not None else cls(**values)
    except OptionError as e:
        raise named_error(e, cls) from None
