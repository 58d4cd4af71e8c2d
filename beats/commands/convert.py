"""``beats convert IN.pt OUT_DIR [--config CFG.json]``: a Microsoft, OpenBEATs or ESPnet
checkpoint to a safetensors model folder."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

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
    p.add_argument("input", metavar="IN.pt",
                   help="the checkpoint: a Microsoft or OpenBEATs .pt ({'cfg', 'model'}), or a "
                   "bare state dict such as an ESPnet .pth (with --config)")
    p.add_argument("output", metavar="OUT_DIR", help="the folder to write (created if needed)")
    p.add_argument("--force", action="store_true",
                   help="overwrite a model already in OUT_DIR")
    p.add_argument("--config", metavar="CFG.json", default=None,
                   help="a JSON file of BEATs cfg keys: the architecture of a bare state dict, "
                   "or keys that override the checkpoint's cfg (e.g. fbank_mean, fbank_std)")


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


def convert(
    input_path: str | Path,
    output: str | Path,
    *,
    force: bool = False,
    config: str | Path | dict[str, Any] | None = None,
) -> Path:
    """Convert ``input_path`` into the folder ``output``, verified by reloading it.

    ``config`` (a dict or a JSON file of cfg keys) is needed for a bare state dict and
    overrides the checkpoint's own cfg keys otherwise (see `BEATs.from_pretrained`).
    """
    out = Path(output)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} exists and is not a folder")
    if (out / WEIGHTS_NAME).exists() and not force:
        raise ValueError(f"{out} already holds a model ({WEIGHTS_NAME}); pass --force to "
                         "overwrite it")
    ckpt = load_pt(input_path)
    cls = _model_class(is_tokenizer_state_dict(ckpt["model"]), input_path)
    model = cls.from_microsoft_checkpoint(ckpt, source=str(input_path), config=config)
    model.save_pretrained(out)
    again = cls.from_pretrained(out)
    mine, theirs = model.state_dict(), again.state_dict()
    if mine.keys() != theirs.keys() or not all(torch.equal(mine[k], theirs[k]) for k in mine):
        raise RuntimeError(f"{out} does not reload to the same tensors; please report this")
    return out


def run(args: argparse.Namespace) -> int:
    try:
        out = convert(args.input, args.output, force=args.force, config=args.config)
    except (OSError, ValueError, RuntimeError) as e:
        print(f"beats convert: error: {e}", file=sys.stderr)
        return 1
    files = [n for n in (CONFIG_NAME, WEIGHTS_NAME, LABELS_NAME) if (out / n).is_file()]
    print(f"wrote {out}: {', '.join(files)} (reloads to identical tensors)")
    print(f"load it with BEATs.from_pretrained({str(out)!r})")
    return 0
