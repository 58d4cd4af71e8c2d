"""Reference pages written at build time from the code (mkdocs.yml ``hooks:``).

A page holds a marker line ``<!-- generated: NAME -->``; `on_page_markdown` replaces it
with ``GENERATORS[NAME]()``, Markdown made from the code itself: the command line from
``beats.cli.build_parser()``, config fields from the config dataclasses, exit codes from
``beats.cli`` (the codes and the error policy in its docstring) and the error types from
``beats.errors`` and its subclasses. Nothing here is
kept by hand, so the pages cannot drift from the code.

The tests import this file to check that every config field and option appears.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import re
import typing
from collections.abc import Callable, Iterator
from typing import Any

MARKER = re.compile(r"^<!-- generated: ([a-z-]+) -->$", flags=re.M)

# The config dataclasses shown on the configuration page, in order: "module:Class".
CONFIGS = [
    "beats.extract:ExtractOptions",
    "beats.pooling:PoolingSpec",
    "beats.train.config:TrainConfig",
    "beats.train.finetune:FinetuneConfig",
    "beats.train.pretrain:PretrainConfig",
    "beats.train.distill:DistillConfig",
    "beats.train.iterate:IterateConfig",
    "beats.train.ssl:SSLConfig",
    "beats.probe:TrainConfig",
    "beats.detect:DetectConfig",
    "beats.config:BEATsConfig",
]


# --------------------------------------------------------------------------- mkdocs
def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """mkdocs hook: fill every ``<!-- generated: NAME -->`` line of a page."""
    def fill(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in GENERATORS:
            raise KeyError(f"{page.file.src_path}: no generator {name!r} "
                           f"(known: {sorted(GENERATORS)})")
        return GENERATORS[name]()

    return MARKER.sub(fill, markdown)


# --------------------------------------------------------------------------- helpers
def _cell(text: Any) -> str:
    """``text`` fit for one Markdown table cell."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _code(text: Any) -> str:
    text = str(text)
    return f"``{text}``" if "`" in text else f"`{text}`"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _summary(obj: Any) -> str:
    """The first paragraph of ``obj``'s docstring, on one line."""
    doc = inspect.getdoc(obj) or ""
    return " ".join(doc.split("\n\n")[0].split())


# --------------------------------------------------------------------------- CLI
def _parsers() -> list[tuple[str, argparse.ArgumentParser]]:
    from beats.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return [("beats", parser), *((f"beats {n}", p) for n, p in sub.choices.items())]


def _help_text(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    """The help of ``action`` as ``--help`` prints it (defaults and ``%(...)s`` filled)."""
    formatter = parser._get_formatter()
    text = formatter._get_help_string(action) or ""
    params = {**vars(action), "prog": parser.prog}
    params = {k: v for k, v in params.items() if v is not argparse.SUPPRESS}
    if params.get("choices") is not None:
        params["choices"] = ", ".join(map(str, params["choices"]))
    return text % params if "%" in text else text


def _flags(action: argparse.Action) -> str:
    if not action.option_strings:
        return _code(action.metavar or action.dest)
    metavar = ""
    if action.nargs != 0:
        name = action.metavar or action.dest.upper()
        metavar = " " + (" ".join(name) if isinstance(name, tuple) else name)
        if action.choices is not None and action.metavar is None:
            metavar = " {" + ",".join(map(str, action.choices)) + "}"
    return ", ".join(_code(flag + metavar) for flag in action.option_strings)


def cli_actions(parser: argparse.ArgumentParser) -> Iterator[argparse.Action]:
    """The documented arguments of ``parser`` (not ``--help``, not the subcommand list)."""
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        if action.help is argparse.SUPPRESS:
            continue
        yield action


def cli_reference() -> str:
    """Every command: what it does, its usage line, and a table of its arguments."""
    out = []
    for prog, parser in _parsers():
        out.append(f"## `{prog}`\n")
        if parser.description:
            out.append(" ".join(parser.description.split()) + "\n")
        usage = parser.format_usage().removeprefix("usage: ").strip()
        out.append(f"```text\n{usage}\n```\n")
        rows = [[_flags(a), _cell(_help_text(parser, a))] for a in cli_actions(parser)]
        if rows:
            out.append(_table(["argument", "meaning (default)"], rows))
        if prog == "beats":
            sub = next(a for a in parser._actions
                       if isinstance(a, argparse._SubParsersAction))
            out.append(_table(["command", "does"], [
                [f"[`{c.dest}`](#beats-{c.dest})", _cell(c.help)]
                for c in sub._choices_actions]))
        if parser.epilog:
            out.append(" ".join(parser.epilog.split()) + "\n")
    return "\n".join(out)


# --------------------------------------------------------------------------- configs
_ATTRIBUTE = re.compile(r"^(\w+(?:, \w+)*): (.*)$")


def docstring_attributes(cls: type) -> dict[str, str]:
    """``{field: text}`` from the ``Attributes:`` section of ``cls``'s docstring. A line
    may name several fields (``weight_decay, betas, eps: AdamW's``): each gets the text."""
    doc = inspect.cleandoc(cls.__doc__ or "")
    if "Attributes:" not in doc:
        return {}
    section = doc.split("Attributes:", 1)[1].split("\n\n")[0]
    found: dict[str, str] = {}
    names: list[str] = []
    for line in section.splitlines():
        stripped = line.strip()
        match = _ATTRIBUTE.match(stripped) if line.startswith("    ") and not \
            line.startswith("     ") else None
        if match:
            names = match.group(1).split(", ")
            for name in names:
                found[name] = match.group(2)
        elif names and stripped:
            for name in names:
                found[name] += " " + stripped
    return found


def field_help(cls: type, field: dataclasses.Field) -> str:
    """What a config field means: its ``help`` metadata (with what None means, for a
    field whose default is None), else the ``Attributes:`` entry of the nearest class in
    ``cls``'s MRO that documents it."""
    if field.metadata.get("help"):
        text = str(field.metadata["help"])
        unset = field.metadata.get("unset")
        if unset and field_default(field) is None:
            text += f" (None: {unset})"
        return text
    for klass in cls.__mro__:
        text = docstring_attributes(klass).get(field.name)
        if text:
            return text
    return ""


def field_values(cls: type, field: dataclasses.Field) -> str:
    """The values a field takes, from its metadata: ``one of `a`, `b` ``, ``a positive
    integer``, ...; "" when it states none."""
    from beats.options import describe, value_types

    meta = field.metadata
    if meta.get("choices") is not None:
        return "one of " + ", ".join(_code(c) for c in meta["choices"])
    kind = value_types(cls)[field.name][0]
    if any(meta.get(k) is not None for k in ("ge", "gt", "le", "lt")):
        return describe(int if kind is int else float, meta)
    return ""


def field_option(field: dataclasses.Field) -> str:
    """How the command line sets a field: its flags, or "" for none."""
    from beats.options import flags

    if "help" not in field.metadata:
        return ""
    if not field.metadata.get("cli", True) and not field.metadata.get("flags"):
        return ""
    return ", ".join(_code(f) for f in flags(field))


def _type_name(hint: Any) -> str:
    text = hint.__name__ if isinstance(hint, type) else str(hint)
    text = re.sub(r"\b(typing|beats(\.\w+)*)\.", "", text)
    return text.replace(" | ", " or ")  # a table cell cannot hold a pipe


def field_default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING


def _default_text(value: Any) -> str:
    if value is dataclasses.MISSING:
        return "required"
    if dataclasses.is_dataclass(value):
        return f"a `{type(value).__name__}`"
    return _code(repr(value))


def config_class(path: str) -> type:
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


def config_fields(cls: type) -> list[tuple[dataclasses.Field, str, str, str]]:
    """(field, type, default as shown, meaning) of every field of ``cls``."""
    hints = typing.get_type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        if f.name == "extra":  # BEATsConfig's unknown checkpoint keys
            continue
        rows.append((f, _type_name(hints[f.name]), _default_text(field_default(f)),
                     field_help(cls, f)))
    return rows


def config_heading(path: str) -> str:
    """The section heading of a config: its class name, or its full name when another
    config on the page has the same class name (``beats.probe.TrainConfig``)."""
    module, name = path.split(":")
    same = [p for p in CONFIGS if p.split(":")[1] == name]
    return f"## `{name}`" if same[0] == path else f"## `{module}.{name}`"


def config_reference() -> str:
    """One table per config dataclass: field, option, type, default, values, meaning."""
    out = []
    for path in CONFIGS:
        cls = config_class(path)
        module = path.split(":")[0]
        out.append(config_heading(path) + "\n")
        out.append(f"`{module}.{cls.__name__}`: {_summary(cls)}\n")
        rows = [[_code(f.name), field_option(f), _code(t), d, field_values(cls, f),
                 _cell(text)] for f, t, d, text in config_fields(cls)]
        out.append(_table(["field", "option", "type", "default", "values", "meaning"], rows))
    return "\n".join(out)


# --------------------------------------------------------------------------- errors
def exit_codes() -> list[tuple[int, str, str]]:
    """(code, constant, meaning) of every exit code of ``beats.cli``.

    Read from the module's ``EXIT_CODES`` table when it has one ({code: meaning} or rows
    of (code, meaning)), else from its ``EXIT_*`` / ``INTERRUPTED`` constants, their
    comments, and the ``Exit codes:`` sentence of its docstring.
    """
    cli = importlib.import_module("beats.cli")
    names = {value: name for name, value in vars(cli).items()
             if (name.startswith("EXIT_") or name == "INTERRUPTED") and isinstance(value, int)}
    table = getattr(cli, "EXIT_CODES", None)
    if table is not None:
        items = table.items() if isinstance(table, dict) else table
        rows = []
        for item in items:
            code = next(x for x in item if isinstance(x, int))
            text = next(x for x in item if isinstance(x, str))
            rows.append((code, names.get(code, ""), text))
        return sorted(rows)
    meanings: dict[int, str] = {}
    sentence = re.search(r"Exit codes: (.*?)\.\s", inspect.getdoc(cli) or "", flags=re.S)
    if sentence:
        for part in re.split(r",\s+(?=\d+ )", " ".join(sentence.group(1).split())):
            code, _, text = part.partition(" ")
            meanings[int(code)] = text
    for line in inspect.getsource(cli).splitlines():
        match = re.match(r"^(\w+) = (\d+)\s+# (.*)$", line)
        if match and match.group(1) in names.values():
            meanings.setdefault(int(match.group(2)), match.group(3))
    return sorted((code, name, meanings.get(code, "")) for code, name in names.items())


def _error_types() -> list[type]:
    """`beats.errors.BeatsError` and every subclass defined in the package."""
    import pkgutil

    import beats
    from beats.errors import BeatsError

    for info in pkgutil.walk_packages(beats.__path__, "beats."):
        if ".commands." not in info.name and info.name != "beats.__main__":
            importlib.import_module(info.name)
    found, todo = [], [BeatsError]
    while todo:
        cls = todo.pop(0)
        found.append(cls)
        todo += sorted(cls.__subclasses__(), key=lambda c: c.__name__)
    return found


def error_policy() -> str:
    """The error policy as `beats.cli`'s docstring states it (its ``Errors`` part), in
    Markdown: the one place it is written."""
    doc = inspect.getdoc(importlib.import_module("beats.cli")) or ""
    if "\nErrors" not in doc:
        return ""
    part = doc.split("\nErrors", 1)[1].split(":", 1)[1].strip()
    return part.replace("``", "`") + "\n"


def errors_reference() -> str:
    """The exit-code table, the error policy and the error types a user can fix."""
    rows = [[_code(code), _code(name) if name else "", _cell(text)]
            for code, name, text in exit_codes()]
    out = [_table(["code", "in `beats.cli`", "meaning"], rows), ""]
    policy = error_policy()
    if policy:
        out += ["### What each kind of error does\n", policy]
    rows = []
    for cls in _error_types():
        bases = ", ".join(f"`{b.__name__}`" for b in cls.__bases__ if b is not object)
        rows.append([f"`{cls.__module__}.{cls.__name__}`", bases,
                     _cell(_summary(cls).replace("``", "`"))])
    out.append("### Error types\n")
    out.append(_table(["type", "bases", "raised for"], rows))
    return "\n".join(out)


# --------------------------------------------------------------------------- outputs
def manifest_reference() -> str:
    """``manifest.jsonl``: its fields and types from `beats.manifest.Record`, its rules
    from the module docstring."""
    from beats import manifest

    hints = typing.get_type_hints(manifest.Record)
    rows = [[_code(f.name), _code(_type_name(hints[f.name]))]
            for f in dataclasses.fields(manifest.Record) if f.name != "extra"]
    doc = inspect.getdoc(manifest) or ""
    body = doc.split("\n\n", 1)[1] if "\n\n" in doc else doc
    statuses = ", ".join(_code(s) for s in manifest.STATUSES)
    return (_table(["field", "type"], rows) + f"\n`status` is one of {statuses}.\n\n"
            + body.replace("``", "`") + "\n")


GENERATORS: dict[str, Callable[[], str]] = {
    "cli": cli_reference,
    "config": config_reference,
    "errors": errors_reference,
    "manifest": manifest_reference,
}
