"""Build ``checkpoints/registry.json`` (format 2) from ``checkpoints/sources.json``.

``sources.json`` is the one input: for each released checkpoint, its kind, pinned size and
sha256 with the public sources each digest was read from, the Hugging Face mirrors seen in
use (repo id, repo type, file, revision) and Microsoft's OneDrive page. What it does not
hold (aliases, descriptions, licence, the default flag, the tokenizers' architecture) is
the hand-kept table below.

Run ``python checkpoints/build_registry.py`` after changing either; ``--check`` only
compares and exits 1 when the committed registry differs from what would be built.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
FACTS = HERE / "sources.json"
REGISTRY = HERE / "registry.json"

DEFAULT_ENCODER = "BEATs_iter3_plus_AS2M"
DEFAULT_TAGGER = "BEATs_iter3_plus_AS2M_finetuned_on_AS2M_cpt2"  # `beats tag`'s default
LICENSE = "MIT"

_SSL = "Self-supervised encoder pre-trained on AudioSet-2M, "
# name: (aliases, description); in the order `beats models` lists them. A fine-tuned
# checkpoint's description is written from its name (see `_description`).
TABLE: dict[str, tuple[list[str], str | None]] = {
    "BEATs_iter1": (["iter1"], _SSL + "iteration 1 (targets from a random-projection "
                    "tokenizer)."),
    "BEATs_iter1_finetuned_on_AS2M_cpt1": (["iter1-cpt1"], None),
    "BEATs_iter1_finetuned_on_AS2M_cpt2": (["iter1-cpt2"], None),
    "BEATs_iter2": (["iter2"], _SSL + "iteration 2 (targets from Tokenizer_iter2)."),
    "BEATs_iter2_finetuned_on_AS2M_cpt1": (["iter2-cpt1"], None),
    "BEATs_iter2_finetuned_on_AS2M_cpt2": (["iter2-cpt2"], None),
    "BEATs_iter3": (["iter3"], _SSL + "iteration 3 (targets from Tokenizer_iter3)."),
    "BEATs_iter3_finetuned_on_AS2M_cpt1": (["iter3-cpt1"], None),
    "BEATs_iter3_finetuned_on_AS2M_cpt2": (["iter3-cpt2"], None),
    "BEATs_iter3_plus_AS20K": (["iter3+-as20k", "as20k"], _SSL + "iteration 3+ (tokenizer "
                               "taught by a model fine-tuned on AudioSet-20K)."),
    "BEATs_iter3_plus_AS20K_finetuned_on_AS2M_cpt1": (["iter3+-as20k-cpt1", "as20k-cpt1"], None),
    "BEATs_iter3_plus_AS20K_finetuned_on_AS2M_cpt2": (["iter3+-as20k-cpt2", "as20k-cpt2"], None),
    "BEATs_iter3_plus_AS2M": (["iter3+-as2m", "iter3+", "as2m"], _SSL + "iteration 3+ "
                              "(tokenizer taught by a model fine-tuned on AudioSet-2M); 12 "
                              "layers, width 768, 90.3M parameters. The default."),
    "BEATs_iter3_plus_AS2M_finetuned_on_AS2M_cpt1": (
        ["iter3+-as2m-cpt1", "iter3+-cpt1", "as2m-cpt1"], None),
    "BEATs_iter3_plus_AS2M_finetuned_on_AS2M_cpt2": (
        ["iter3+-as2m-cpt2", "iter3+-cpt2", "as2m-cpt2"], None),
    "Tokenizer_iter2": (["tokenizer-iter2"], "Acoustic tokenizer of iteration 2: audio to "
                        "discrete codebook ids."),
    "Tokenizer_iter3": (["tokenizer-iter3"], "Acoustic tokenizer of iteration 3: audio to "
                        "discrete codebook ids."),
    "Tokenizer_iter3_plus_AS20K": (["tokenizer-iter3+-as20k"], "Acoustic tokenizer of "
                                   "iteration 3+ (AudioSet-20K teacher): audio to discrete "
                                   "codebook ids."),
    "Tokenizer_iter3_plus_AS2M": (["tokenizer-iter3+-as2m", "tokenizer-iter3+", "tokenizer"],
                                  "Acoustic tokenizer of iteration 3+ (AudioSet-2M teacher): "
                                  "audio to discrete codebook ids."),
}

# What a released tokenizer's structure must be when a file is imported under its name
# (no digest is known for them): a 12-layer encoder of width 768, 1024 codes of width 256.
TOKENIZER_ARCHITECTURE = {"input_patch_size": 16, "encoder_layers": 12,
                          "encoder_embed_dim": 768, "quant_n": 1024, "quant_dim": 256}

ABOUT = (
    "Released BEATs checkpoints (Microsoft, arXiv 2212.09058), generated from sources.json by "
    "build_registry.py: do not edit by hand. Each entry lists its sources in order of "
    "preference: Hugging Face mirrors run by third parties, then plain URLs, then "
    "Microsoft's OneDrive page, which only a browser can open. A file from any source is "
    "used only when its size and sha256 equal the pinned ones ('digest_sources' says where "
    "each digest was read); entries without a digest (the tokenizers) are never downloaded "
    "by beats and are installed with `beats models --import FILE --name NAME`. Microsoft's "
    "original Azure blob addresses were withdrawn in April 2024 and are not listed. license: "
    "the microsoft/unilm repository, which published these files, is MIT-licensed; no "
    "separate licence for the weights is stated."
)


def _description(name: str, kind: str) -> str:
    given = TABLE[name][1]
    if given is not None:
        return given
    if kind != "fine-tuned":
        raise ValueError(f"{name}: the table needs a description")
    base, _, checkpoint = name.partition("_finetuned_on_AS2M_cpt")
    text = (f"{base} fine-tuned on AudioSet-2M: 527-class audio tagging, released checkpoint "
            f"{checkpoint} of 2.")
    return text + (" The default of `beats tag`." if name == DEFAULT_TAGGER else "")


def _sources(fact: dict) -> list[dict]:
    out: list[dict] = []
    for mirror in fact["mirrors"]:
        if mirror.get("hub") == "huggingface":
            out.append({"type": "huggingface", "repo_id": mirror["repo_id"],
                        "repo_type": mirror.get("repo_type") or "model",
                        "filename": mirror["filename"], "revision": mirror.get("revision"),
                        "note": mirror.get("cited_by", "")})
        elif mirror.get("url"):
            out.append({"type": "url", "url": mirror["url"], "note": mirror.get("cited_by", "")})
        else:
            raise ValueError(f"{fact['name']}: a mirror without a Hub repo or url: {mirror}")
    page = fact.get("official_browser_only")
    if page:
        out.append({"type": "browser", "url": page,
                    "note": "Microsoft's OneDrive share: opens in a browser, not to scripts"})
    return out


def build(facts: dict) -> dict:
    """The format-2 registry document for the facts document ``facts``."""
    by_name = {fact["name"]: fact for fact in facts["checkpoints"]}
    if set(by_name) != set(TABLE):
        raise ValueError(f"sources.json and the table disagree on the names: "
                         f"{sorted(set(by_name) ^ set(TABLE))}")
    models = []
    for name in TABLE:
        fact = by_name[name]
        entry = {
            "name": name,
            "kind": fact["kind"],
            "default": name == DEFAULT_ENCODER,
            "aliases": TABLE[name][0],
            "size": fact["size"],
            "sha256": fact["sha256"],
            "digest_sources": list(fact["digest_sources"]),
            "sources": _sources(fact),
            "license": LICENSE,
            "description": _description(name, fact["kind"]),
        }
        if fact["kind"] == "tokenizer":
            entry["architecture"] = dict(TOKENIZER_ARCHITECTURE)
        models.append(entry)
    return {"format_version": 2, "about": ABOUT, "models": models}


def render(doc: dict) -> str:
    return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="exit 1 when registry.json differs from what would be built")
    args = parser.parse_args(argv)
    text = render(build(json.loads(FACTS.read_text(encoding="utf-8"))))
    if args.check:
        same = REGISTRY.read_text(encoding="utf-8") == text
        print("registry.json is up to date" if same else "registry.json is out of date: "
              "run python checkpoints/build_registry.py")
        return 0 if same else 1
    REGISTRY.write_text(text, encoding="utf-8")
    print(f"wrote {REGISTRY}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
