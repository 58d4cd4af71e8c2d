"""``beats convert IN.pt OUT_DIR``: a Microsoft checkpoint to a safetensors model folder."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from ..checkpoint import is_tokenizer_state_dict, load_pt
from ..serialization import CONFIG_NAME, LABELS_NAME, WEIGHTS_NAME


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "convert",
        help="convert a Microsoft .pt checkpoint into a safetensors model folder",
        description="Read a Microsoft-format .pt checkpoint (never running code from it: "
        "files that would need code are refused), check it against the model, and write "
        "OUT_DIR/config.json, model.safetensors and, for fine-tuned models, labels.json. "
        "The folder loads with BEATs.from_pretrained(OUT_DIR) without any pickle.",
    )
    p.add_argument("input", metavar="IN.pt", help="the Microsoft .pt checkpoint")
    p.add_argument("output", metavar="OUT_DIR", help="the folder to write (created if needed)")
    p.add_argument("--force", action="store_true",
                   help="overwrite a model already in OUT_DIR")


def _model_class(tokenizer: bool, source: str | Path) -> type:
    if not tokenizer:
        from ..model import BEATs

        return BEATs
    try:
        from ..tokenizer import BEATsTokenizer  # type: ignore[import-not-found]
    except ImportError:
        raise ValueError(f"{source} is an acoustic tokenizer checkpoint, and this version of "
                         "beats has no BEATsTokenizer to convert it with") from None
    return BEATsTokenizer


def convert(input_path: str | Path, output: str | Path, *, force: bool = False) -> Path:
    """Convert ``input_path`` into the folder ``output``, verified by reloading it."""
    out = Path(output)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} exists and is not a folder")
    if (out / WEIGHTS_NAME).exists() and not force:
        raise ValueError(f"{out} already holds a model ({WEIGHTS_NAME}); pass --force to "
                         "overwrite it")
    ckpt = load_pt(input_path)
    cls = _model_class(is_tokenizer_state_dict(ckpt["model"]), input_path)
    model = cls.from_microsoft_checkpoint(ckpt, source=str(input_path))
    model.save_pretrained(out)
    again = cls.from_pretrained(out)
    mine, theirs = model.state_dict(), again.state_dict()
    if mine.keys() != theirs.keys() or not all(torch.equal(mine[k], theirs[k]) for k in mine):
        raise RuntimeError(f"{out} does not reload to the same tensors; please report this")
    return out


def run(args: argparse.Namespace) -> int:
    try:
        out = convert(args.input, args.output, force=args.force)
    except (OSError, ValueError, RuntimeError) as e:
        print(f"beats convert: error: {e}", file=sys.stderr)
        return 1
    files = [n for n in (CONFIG_NAME, WEIGHTS_NAME, LABELS_NAME) if (out / n).is_file()]
    print(f"wrote {out}: {', '.join(files)} (reloads to identical tensors)")
    print(f"load it with BEATs.from_pretrained({str(out)!r})")
    return 0
