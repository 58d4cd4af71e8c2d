"""The ``beats`` command line (also ``python -m beats``).

Each subcommand lives in ``beats/commands/<name>.py`` with ``add_parser(subparsers)`` and
``run(args) -> int``; this module dispatches, so subcommands import their heavy
dependencies when they run. Exit codes are one contract for every command, written once
in `EXIT_CODES`; ``beats --help``, each command's ``--help`` (`exit_code_help`) and the
documentation are made from it.

Errors (`beats.failures` implements this policy):

- A mistake the user can fix, the data or the machine (a `beats.errors.BeatsError`: bad
  arguments, input or setup; an ``OSError`` the system raised with an errno, such as a
  missing file, a full or read-only disk or a permission; running out of memory): one
  line, ``beats COMMAND: error: WHAT (WHAT TO DO)``, and exit code 2.
- Any other exception is a bug in beats: one line saying so and naming the file that
  holds its traceback (``OUT/errors.log`` when the command has an output folder that
  exists, else a new file in the temporary folder's ``beats-errors/``), and exit code 3.
- ``BEATS_DEBUG=1`` also prints the traceback, for either kind.
- One input's failure never stops a run: it is recorded with its reason, which starts
  with the exception's type (``AudioError: a.wav: ...``), and the run ends with exit
  code 1. An input that failed with an unexpected type also gets its traceback in
  ``OUT/errors.log``, and the command's summary says so.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys
import traceback
from collections.abc import Sequence

from . import __version__
from .commands.arguments import HelpFormatter
from .failures import one_line
from .files import printable

# Subcommand modules under beats/commands/, in the order `beats --help` lists them.
SUBCOMMANDS: list[str] = [
    "extract", "tag", "detect", "tokenize", "probe", "finetune", "pretrain", "distill", "iterate",
    "models", "convert",
]
INTERRUPTED = 130  # the exit code after Ctrl-C (128 + SIGINT), as shells use

EXIT_OK, EXIT_FAILED_INPUTS, EXIT_SETUP, EXIT_BUG = 0, 1, 2, 3
EXIT_DIVERGED = 4  # a training command's loss or gradient norm stopped being finite

TRAINING = ("finetune", "pretrain", "distill", "iterate")
# The exit codes of every command, code -> meaning: the one table `beats --help`, each
# command's --help (`exit_code_help`) and the documentation are made from.
EXIT_CODES: dict[int, str] = {
    EXIT_OK: "all done",
    EXIT_FAILED_INPUTS: "the job completed, but some inputs could not be used and were skipped",
    EXIT_SETUP: "bad arguments, input or setup: one line says what was wrong and what to do",
    EXIT_BUG: "a bug in beats: one line names the file holding the traceback; please "
              "report it",
    EXIT_DIVERGED: "a training run diverged (its loss or gradient norm stopped being "
                   "finite); the last good training state is kept",
    INTERRUPTED: "interrupted (Ctrl-C); what was finished is kept",
}
# The codes that only some commands return, and those commands (the rest: every command).
EXIT_CODE_COMMANDS: dict[int, tuple[str, ...]] = {
    EXIT_FAILED_INPUTS: ("extract", "tag", "detect", "tokenize", "probe", *TRAINING),
    EXIT_DIVERGED: TRAINING,
}
# Where each command lists the inputs it skipped (exit code 1), with the reasons.
SKIPPED_LISTED: dict[str, str] = {
    "extract": "OUT/manifest.jsonl", "tokenize": "OUT/manifest.jsonl",
    "detect": "OUT/manifest.jsonl",
    "tag": "its output", "probe": "OUT/failed.jsonl (with --predict: its output)",
    "finetune": "OUT/failed.jsonl", "pretrain": "OUT/failed.jsonl",
    "distill": "OUT/failed.jsonl", "iterate": "each stage's failed.jsonl",
}


def exit_code_help(command: str | None = None) -> str:
    """The exit codes that ``command`` can return (None: every code, with the commands
    that return it when not all do), as the lines of a ``--help`` epilog."""
    lines = ["exit codes:"]
    for code, meaning in EXIT_CODES.items():
        commands = EXIT_CODE_COMMANDS.get(code, ())
        if command is not None and commands and command not in commands:
            continue
        if code == EXIT_FAILED_INPUTS:
            where = SKIPPED_LISTED.get(command or "", "OUT/failed.jsonl or OUT/manifest.jsonl")
            meaning = f"{meaning}; each is listed with its reason in {where}"
        if command is None and commands:
            meaning = f"{meaning} ({', '.join(commands)})"
        lines.append(f"  {code:<4} {meaning}")
    return "\n".join(lines)


# Set BEATS_DEBUG=1 to see the traceback behind a one-line error too.
DEBUG_ENV = "BEATS_DEBUG"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="beats", description="BEATs audio embeddings: exact, batch-invariant, fast.",
        epilog="`beats COMMAND --help` for each command.\n\n" + exit_code_help(),
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"beats {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        module = importlib.import_module(f"beats.commands.{name}")
        module.add_parser(sub)
        sub.choices[name].formatter_class = HelpFormatter  # every option shows its default
        own = sub.choices[name].epilog  # the command's examples, then the codes
        sub.choices[name].epilog = (f"{own}\n\n" if own else "") + exit_code_help(name)
    return parser


def _diverged(error: Exception) -> bool:
    """Whether ``error`` is a training run's divergence (`beats.train.loop.TrainingError`);
    the training package is only imported when a training command ran."""
    train = sys.modules.get("beats.train.loop")
    return train is not None and isinstance(error, train.TrainingError)


def main(argv: Sequence[str] | None = None) -> int:
    # huggingface_hub logs each retry of an unreachable Hub; the final error says it all.
    os.environ.setdefault("HF_HUB_VERBOSITY", "error")
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]  # as typed (--config-file)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_SETUP
    module = importlib.import_module(f"beats.commands.{args.command.replace('-', '_')}")
    try:
        code = int(module.run(args) or 0)
    except BrokenPipeError:  # `beats models | head`: the reader left; stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception as e:
        if _diverged(e):
            print(f"beats {args.command}: error: {printable(str(e))}", file=sys.stderr)
            return EXIT_DIVERGED
        if os.environ.get(DEBUG_ENV):
            traceback.print_exc()
        message = setup_error(e, resumable=_has_option(parser, args.command, "--resume"))
        if message is None:
            return _bug(args, e)
        print(f"beats {args.command}: error: {printable(message)}", file=sys.stderr)
        return EXIT_SETUP

    if code == INTERRUPTED:  # Ctrl-C, handled and said: all is written and closed, so
        sys.stdout.flush()  # skip the interpreter's teardown (torch's alone takes seconds)
        sys.stderr.flush()
        os._exit(code)
    return code


def _bug(args: argparse.Namespace, error: Exception) -> int:
    """Exit code 3: the traceback written to a file (`beats.failures.bug_report`), one line
    naming it."""
    from .failures import bug_report, describe

    what = describe(error)
    what = what if len(what) <= 200 else what[:199] + "…"
    try:
        where = f"the traceback is in {bug_report(args.command, error, _output(args))}"
    except OSError as e:  # nowhere to write it: print it instead
        traceback.print_exc()
        where = f"the traceback is above (it could not be written: {e})"
    print(f"beats {args.command}: internal error: {printable(what)}: this is a bug in beats; "
          f"{where}; please report it", file=sys.stderr)
    return EXIT_BUG


def _has_option(parser: argparse.ArgumentParser, command: str, flag: str) -> bool:
    """Whether ``beats COMMAND`` takes the option ``flag``."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return flag in sub.choices[command]._option_string_actions


def _output(args: argparse.Namespace) -> str | None:
    """The command's output folder, if it has one."""
    output = getattr(args, "output", None)
    return output if isinstance(output, (str, os.PathLike)) else None


def setup_error(error: BaseException, resumable: bool = False) -> str | None:
    """The one-line message of an expected error, or None for a bug (see the module
    docstring): a `BeatsError`, an ``OSError`` the system raised (it has an errno), or
    running out of memory. ``resumable``: the command can continue an interrupted run
    with ``--resume`` (said after disk errors)."""
    from .errors import BeatsError
    from .failures import out_of_memory

    if out_of_memory(error):
        return ("out of memory: lower --batch-size (or --window for long files), or use a "
                "smaller model or --dtype bfloat16")
    if isinstance(error, BeatsError):
        return one_line(str(error)) or type(error).__name__
    if isinstance(error, OSError) and error.errno is not None:
        text = _os_error(error)
        if resumable and error.errno in _NO_SPACE:
            text += "; then `--resume` continues the run"
        return text
    return None


_NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _os_error(error: OSError) -> str:
    """A system's OSError as one line, with advice."""
    if error.strerror is None:
        return one_line(str(error)) or type(error).__name__
    where = error.filename if error.filename is not None else "a file"
    if error.errno in _NO_SPACE:
        return (f"cannot write {where}: {error.strerror} (the disk is full or a size limit "
                "was reached): free some space or write elsewhere")
    if error.errno == errno.EROFS:
        return f"cannot write {where}: the file system is read-only: write elsewhere"
    if error.errno in (errno.EACCES, errno.EPERM):
        return (f"cannot access {where}: permission denied: choose a path you may use, or "
                "change its permissions")
    return f"{where}: {error.strerror}"
