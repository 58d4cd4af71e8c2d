"""``beats convert MODEL OUT``: between Microsoft ``.pt`` files and safetensors model folders.

The direction follows OUT: a name ending in ``.pt`` or ``.pth`` is written as a Microsoft
checkpoint, anything else as a model folder. MODEL is anything `BEATs.from_pretrained`
loads (a ``.pt``, a folder, a registered name, a Hub repo), encoder or tokenizer.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..errors import InputError
from ..serialization import CONFIG_NAME, LABELS_NAME, WEIGHTS_NAME

if TYPE_CHECKING:
    from ..model import BEATs

PT_SUFFIXES = (".pt", ".pth")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "convert",
        help="convert between a Microsoft .pt checkpoint and a safetensors model folder",
        description="Load MODEL (a Microsoft .pt, a model folder, a registered name or a Hub "
        "repo; encoder or tokenizer; a .pt is read without running code from it) and write "
        "it as OUT. OUT ending in .pt or .pth: a Microsoft-format checkpoint (cfg, model and, "
        "for fine-tuned models, label_dict, in the original's key layout) that the original "
        "code loads. Anything else: a folder of config.json, model.safetensors and, for "
        "fine-tuned models, labels.json, that loads without any pickle. Either is checked by "
        "reloading it.",
    )
    p.add_argument("input", metavar="MODEL",
                   help="the model to convert: a .pt file, a folder, a registered name or a "
                        "Hub repo id")
    p.add_argument("output", metavar="OUT",
                   help="OUT.pt / OUT.pth: write a Microsoft checkpoint; otherwise the folder "
                        "to write (created if needed)")
    p.add_argument("--force", action="store_true",
                   help="overwrite a model already in OUT")
    p.add_argument("--config", metavar="CFG.json", default=None,
                   help="a JSON file of BEATs cfg keys: the architecture of a bare state dict "
                   "(an ESPnet .pth), or keys that override the checkpoint's cfg (e.g. "
                   "fbank_mean, fbank_std)")


def load_any(source: str | Path, config: str | Path | dict[str, Any] | None = None) -> BEATs:
    """``source`` as a `BEATs`, or as a `BEATsTokenizer` when it holds a tokenizer.

    ``config`` (a dict or a JSON file of cfg keys) is needed for a bare state dict and
    overrides the checkpoint's own cfg keys otherwise (see `BEATs.from_pretrained`).
    """
    from ..hub import ModelKindError
    from ..model import BEATs
    from ..tokenizer import BEATsTokenizer

    try:
        return BEATs.from_pretrained(source, config=config)
    except ModelKindError:
        return BEATsTokenizer.from_pretrained(source, config=config)


def convert(
    input_path: str | Path,
    output: str | Path,
    *,
    force: bool = False,
    config: str | Path | dict[str, Any] | None = None,
) -> BEATs:
    """Write ``input_path`` as ``output`` (a ``.pt`` or a folder, by its suffix), verified by
    reloading it. Returns the loaded model."""
    out = Path(output)
    to_pt = out.suffix.lower() in PT_SUFFIXES
    if to_pt and out.is_dir():
        raise InputError(f"{out} is a folder: give a file name ending in .pt to write a "
                         "Microsoft checkpoint, or a folder name without .pt")
    if to_pt and out.exists() and not force:
        raise InputError(f"{out} already exists; pass --force to overwrite it")
    if not to_pt and out.exists() and not out.is_dir():
        raise InputError(f"{out} exists and is not a folder: give a folder to write the model "
                         "into, or a name ending in .pt to write a Microsoft checkpoint")
    if not to_pt and (out / WEIGHTS_NAME).exists() and not force:
        raise InputError(f"{out} already holds a model ({WEIGHTS_NAME}); pass --force to "
                         "overwrite it")
    model = load_any(input_path, config)
    if to_pt:
        model.save_microsoft_checkpoint(out)
    else:
        model.save_pretrained(out)
    again = type(model).from_pretrained(out)
    mine, theirs = model.state_dict(), again.state_dict()
    if mine.keys() != theirs.keys() or not all(torch.equal(mine[k], theirs[k]) for k in mine):
        raise RuntimeError(f"{out} does not reload to the same tensors; please report this")
    return model


def usage_hint(model: BEATs, out: Path) -> str:
    """How to load what was written, in Python and on the command line."""
    cls = type(model).__name__
    command = ("beats tokenize" if model.is_tokenizer
               else "beats tag" if model.predictor is not None else "beats extract")
    return f"load it with {cls}.from_pretrained({str(out)!r}) or `{command} -m {out} ...`"


def run(args: argparse.Namespace) -> int:
    out = Path(args.output)
    model = convert(args.input, out, force=args.force, config=args.config)
    if out.suffix.lower() in PT_SUFFIXES:
        labelled = model.predictor is not None and model.label_dict is not None
        keys = "cfg, model" + (", label_dict" if labelled else "")
        print(f"wrote {out}: a Microsoft checkpoint ({keys}; reloads to identical tensors)")
    else:
        files = [n for n in (CONFIG_NAME, WEIGHTS_NAME, LABELS_NAME) if (out / n).is_file()]
        print(f"wrote {out}: {', '.join(files)} (reloads to identical tensors)")
    print(usage_hint(model, out))
    return 0
