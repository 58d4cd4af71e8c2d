"""Microsoft ``.pt`` checkpoints: reading them safely and mapping their keys onto `BEATs`,
and writing a model back in their layout (`save_microsoft_checkpoint`)."""

from __future__ import annotations

import pickle
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from .config import BEATsConfig
from .errors import InputError, NotFoundError
from .files import atomic_path

# Newer PyTorch writes weight norm as a parametrization; Microsoft's files use _g/_v.
_WEIGHT_NORM_KEYS = {
    "parametrizations.weight.original0": "weight_g",
    "parametrizations.weight.original1": "weight_v",
}


def load_pt(path: str | Path) -> dict[str, Any]:
    """Load a ``.pt``/``.pth`` checkpoint with ``weights_only=True``; never runs code.

    Returns the dict with ``cfg``, ``model`` and, for fine-tuned models, ``label_dict``.
    A bare state dict (ESPnet's ``.pth``) comes back as ``{"cfg": None, "model": ...}``:
    its architecture must be given separately.
    """
    path = Path(path)
    if not path.is_file():
        raise NotFoundError(f"no checkpoint file at {path}")
    not_torch = _not_a_torch_file(path)
    if not_torch is not None:
        raise InputError(
            f"{path} is not a PyTorch checkpoint: it holds {not_torch}, not what torch.save "
            "writes (a zip archive or a pickle). Give a BEATs .pt, a model folder or a "
            "registered name (`beats models` lists them)"
        )
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        refused = _refused_global(e)
        if refused is None:
            raise InputError(f"{path} is corrupt or not a checkpoint: its pickle cannot be "
                             f"read ({_unpickler_reason(e)})") from None
        raise InputError(
            f"{path} is not a plain-tensor checkpoint: loading it would run code named in the "
            f"file (it calls {refused}), which beats never does: checkpoints of tensors, dicts "
            "and numbers load. If you trust where this file comes from, re-save its 'cfg' and "
            "'model' as plain dicts and tensors with the code that wrote it, then `beats "
            "convert` that file into a safetensors folder that loads without any pickle"
        ) from None
    except MemoryError:
        raise
    except Exception as e:  # the unpickler meets arbitrary bytes: any failure is a bad file
        raise InputError(f"{path} is truncated or corrupt and cannot be read: "
                         f"{type(e).__name__}: {_first_line(e)}") from e
    if isinstance(ckpt, dict) and isinstance(ckpt.get("model"), dict):
        if ckpt.get("cfg") is None:  # a state dict under "model", no architecture
            return {**ckpt, "cfg": None}
        return ckpt
    if isinstance(ckpt, dict) and ckpt and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in ckpt.items()
    ):  # a bare state dict, as ESPnet saves its models (.pth): the config comes separately
        return {"cfg": None, "model": ckpt}
    keys = key_examples(sorted(map(str, ckpt))) if isinstance(ckpt, dict) else type(ckpt).__name__
    raise InputError(
        f"{path} is not a BEATs checkpoint: expected a dict with 'cfg' and 'model' (Microsoft, "
        f"OpenBEATs) or a state dict of tensors (ESPnet .pth), got {keys}"
    )


_SHARED_BIAS = re.compile(
    r"^(.*encoder\.layers\.)(\d+)(\.self_attn\.relative_attention_bias\.weight)$"
)


def _not_a_torch_file(path: Path) -> str | None:
    """What the file holds if it cannot be a torch.save file (zip archive, or a pickle for
    the legacy format), else None."""
    with open(path, "rb") as f:
        head = f.read(64)
    if head.startswith(b"PK\x03\x04") or head.startswith(b"\x80"):
        return None
    if not head:
        return "nothing (the file is empty)"
    if head.startswith(b"RIFF") and head[8:12] == b"WAVE":
        return "WAV audio"
    for magic, what in ((b"fLaC", "FLAC audio"), (b"OggS", "Ogg audio"), (b"ID3", "MP3 audio"),
                        (b"\x89HDF", "an HDF5 file (a Keras/TensorFlow model?)")):
        if head.startswith(magic):
            return what
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return "unrecognised binary data"
    return "JSON text" if text.lstrip().startswith(("{", "[")) else "text"


_GLOBAL = re.compile(r"GLOBAL ([A-Za-z_][\w.]*)")


def _refused_global(error: Exception) -> str | None:
    """The global (function or class) that torch's weights-only unpickler refused, if any."""
    match = _GLOBAL.search(str(error))
    return match.group(1) if match else None


def _unpickler_reason(error: Exception) -> str:
    """What torch's weights-only unpickler could not read, without its advice (which
    suggests ``weights_only=False``, that is running the file's code)."""
    text = str(error)
    tail = text.split("WeightsUnpickler error:", 1)[1] if "WeightsUnpickler error:" in text else ""
    for line in tail.splitlines():
        line = line.strip().split(". ")[0]
        if line and "weights_only" not in line:
            return line
    return "not a plain-tensor pickle"


def _first_line(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else "no details"


def normalize_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map a Microsoft state dict onto `BEATs`' keys.

    Renames parametrized weight-norm keys to ``weight_g``/``weight_v``, and keeps one copy
    of the relative position table: the original shares layer 0's table by assigning the
    same module into every layer, so its files repeat it under each layer's name. The
    copies must equal layer 0's; a file where they differ is refused.
    """
    out = {}
    for key, value in state_dict.items():
        for old, new in _WEIGHT_NORM_KEYS.items():
            if key.endswith(old):
                key = key[: -len(old)] + new
        out[key] = value
    for key in [k for k in out if _SHARED_BIAS.match(k)]:
        prefix, layer, suffix = _SHARED_BIAS.match(key).groups()  # type: ignore[union-attr]
        if layer == "0":
            continue
        first = out.get(prefix + "0" + suffix)
        if first is None or not torch.equal(first, out[key]):
            raise InputError(
                f"{key} differs from layer 0's table: BEATs shares one relative position "
                "table across layers, so this checkpoint is not a BEATs encoder"
            )
        del out[key]
    return out


_TOKENIZER_PREFIXES = ("quantize.", "quantize_layer.")


def is_tokenizer_state_dict(state_dict: dict[str, torch.Tensor]) -> bool:
    """Whether a state dict holds the acoustic tokenizer's quantizer (``quantize*`` keys)."""
    return any(k.startswith(_TOKENIZER_PREFIXES) for k in state_dict)


WRAPPER_PREFIX = "encoder."  # ESPnet saves the BEATs encoder as its model's ``encoder``
# ESPnet's encoder holds two frozen all-ones convolutions that only turn the sample padding
# mask into frame and patch masks (a frame or patch is padding when any input under it is).
# With all-positive weights that is exactly `patch_padding_mask`, so they are not needed.
PAD_CONVOLUTIONS = {"raw2fbank_pad.weight": (1, 1, 400),
                    "patch_embedding_pad.weight": (1, 1, 16, 16)}


def prepare_state_dict(
    state_dict: dict[str, torch.Tensor], source: str
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Map a Microsoft, OpenBEATs or ESPnet state dict onto `BEATs`' keys.

    Applies `normalize_state_dict`; takes the keys under ESPnet's ``encoder.`` prefix when
    the file holds the encoder there (``encoder.patch_embedding.weight``), setting aside the
    keys outside it (the ESPnet task model's other parts, such as a ``decoder``); drops
    ESPnet's padding-mask convolutions (`PAD_CONVOLUTIONS`) after checking that they are
    what ESPnet writes. Returns the state dict and the sorted keys set aside.
    """
    state_dict = normalize_state_dict(state_dict)
    outside: list[str] = []
    inner = WRAPPER_PREFIX + "patch_embedding.weight"
    if "patch_embedding.weight" not in state_dict and inner in state_dict:
        outside = sorted(k for k in state_dict if not k.startswith(WRAPPER_PREFIX))
        state_dict = {k[len(WRAPPER_PREFIX):]: v for k, v in state_dict.items()
                      if k.startswith(WRAPPER_PREFIX)}
    for key, shape in PAD_CONVOLUTIONS.items():
        if key not in state_dict:
            continue
        weight = state_dict.pop(key)
        if tuple(weight.shape) != shape:
            problem = f"a {tuple(weight.shape)} tensor"
        elif not bool((weight.float() > 0).all()):
            problem = "zero, negative or NaN values"
        else:
            continue
        raise InputError(
            f"{source}: {key} is ESPnet's padding-mask convolution, which ESPnet keeps at all "
            f"ones {shape}; this file holds {problem}, so its padding mask would differ from "
            "the exact one beats computes"
        )
    return state_dict, outside


def key_examples(keys: list[str], limit: int = 3) -> str:
    """``a, b, c and 12 more``: a few keys, never the whole list."""
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


_LAYER = re.compile(r"^encoder\.layers\.(\d+)\.")
# A key fragment and the config keys that decide whether a model has that tensor.
_FEATURES = (
    ("predictor.", "finetuned_model"),
    ("relative_attention_bias", "relative_position_embedding"),
    ("grep_", "gru_rel_pos"),
    ("post_extract_proj", "embed_dim/encoder_embed_dim (a projection exists when they differ)"),
    ("patch_embedding.bias", "conv_bias"),
    ("fc1.linear.", "activation_fn (glu)"),
    ("quantize", "the model class (BEATsTokenizer loads tokenizers)"),
)


def _num_layers(keys: Iterable[str]) -> int:
    found = [int(m.group(1)) for k in keys if (m := _LAYER.match(k))]
    return max(found) + 1 if found else 0


# Config keys that can be read off a tensor's shape: (key, tensor, axis).
_SIZES = (
    ("encoder_embed_dim", "encoder.layer_norm.weight", 0),
    ("embed_dim", "layer_norm.weight", 0),
    ("encoder_ffn_embed_dim", "encoder.layers.0.fc2.weight", 1),
    ("conv_pos", "encoder.pos_conv.0.weight_g", 2),
    ("num_buckets", "encoder.layers.0.self_attn.relative_attention_bias.weight", 0),
    ("encoder_attention_heads", "encoder.layers.0.self_attn.relative_attention_bias.weight", 1),
    ("predictor_class", "predictor.weight", 0),
)


def _likely_cause(
    expected: dict[str, torch.Tensor], state_dict: dict[str, torch.Tensor],
    missing: list[str], unexpected: list[str],
) -> str:
    """One sentence on why a state dict does not fit the model built from a config."""
    anchor = "patch_embedding.weight"
    prefixes = sorted(k[: -len(anchor)] for k in unexpected if k.endswith(anchor))
    if prefixes and prefixes[0]:
        return (f"the file's keys carry the prefix {prefixes[0]!r} (a wrapper's name for the "
                f"model; beats only removes ESPnet's {WRAPPER_PREFIX!r}): strip it from every "
                "key and save the state dict again")
    have, want = _num_layers(state_dict), _num_layers(expected)
    if have != want:
        return (f"the file has {have} encoder layers and the config says encoder_layers="
                f"{want}: the config does not describe this file (give the right one)")
    for fragment, key in _FEATURES:
        gone = [k for k in missing if fragment in k]
        extra = [k for k in unexpected if fragment in k]
        if gone or extra:
            where = "the model expects" if gone else "the file holds"
            return (f"{where} {(gone or extra)[0]} but {'the file' if gone else 'the model'} "
                    f"has no such tensor: the config's {key} does not match the file")
    for key, name, axis in _SIZES:
        ours, theirs = expected.get(name), state_dict.get(name)
        if (ours is not None and theirs is not None and ours.dim() == theirs.dim() > axis
                and ours.shape[axis] != theirs.shape[axis]):
            return (f"the file's {key} is {theirs.shape[axis]} and the config says "
                    f"{ours.shape[axis]}: the config does not describe this file (give the "
                    "right one)")
    if missing and not unexpected:
        return "the file is incomplete: it lacks tensors that every model of this config has"
    return "the file is not a BEATs encoder of this architecture"


def check_keys(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Raise one short ``ValueError`` when keys are missing or unexpected or shapes differ.

    The message gives counts, a few example keys and the likely cause, never the whole list.
    """
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    shapes = [
        f"{k} {tuple(state_dict[k].shape)} in the file, {tuple(expected[k].shape)} in the model"
        for k in sorted(set(expected) & set(state_dict))
        if tuple(state_dict[k].shape) != tuple(expected[k].shape)
    ]
    if not (missing or unexpected or shapes):
        return
    parts = []
    for found, what in ((missing, "missing key"), (unexpected, "unexpected key"),
                        (shapes, "shape mismatch")):
        if found:
            plural = "es" if what.endswith("h") else "s"
            parts.append(f"{len(found)} {what}{plural if len(found) > 1 else ''} "
                         f"({key_examples(found, 3 if found is not shapes else 1)})")
    cause = _likely_cause(expected, state_dict, missing, unexpected)
    raise InputError(f"{source} does not match the model built from its config: "
                     f"{'; '.join(parts)}. Likely cause: {cause}")


# ---------------------------------------------------------------------- writing
# The keys of Microsoft's BEATsConfig, in its order; its tokenizer's config adds
# quant_n and quant_dim. Every Microsoft checkpoint's cfg holds these.
MICROSOFT_CFG_KEYS = (
    "input_patch_size", "embed_dim", "conv_bias", "encoder_layers", "encoder_embed_dim",
    "encoder_ffn_embed_dim", "encoder_attention_heads", "activation_fn",
    "layer_wise_gradient_decay_ratio", "layer_norm_first", "deep_norm", "dropout",
    "attention_dropout", "activation_dropout", "encoder_layerdrop", "dropout_input",
    "conv_pos", "conv_pos_groups", "relative_position_embedding", "num_buckets",
    "max_distance", "gru_rel_pos", "finetuned_model", "predictor_dropout", "predictor_class",
)
TOKENIZER_CFG_KEYS = ("quant_n", "quant_dim")


def microsoft_cfg(cfg: BEATsConfig, tokenizer: bool) -> dict[str, Any]:
    """``cfg`` as a Microsoft checkpoint's ``cfg`` dict.

    Microsoft's keys always; the tokenizer's two with ``tokenizer``; any other field only
    when it differs from its default (the original ignores keys it does not know), and the
    unknown keys a loaded checkpoint brought with it (`BEATsConfig.extra`).
    """
    values, defaults = cfg.to_dict(), BEATsConfig().to_dict()
    keys = MICROSOFT_CFG_KEYS + (TOKENIZER_CFG_KEYS if tokenizer else ())
    out = {key: values[key] for key in keys}
    for key, value in values.items():
        if key not in out and (key not in defaults or defaults[key] != value):
            out[key] = value
    return out


def microsoft_state_dict(
    state_dict: dict[str, torch.Tensor], num_layers: int
) -> dict[str, torch.Tensor]:
    """`BEATs` keys -> Microsoft's: the shared relative position table (kept once, under
    layer 0) is repeated under every layer's name, as the original's strict
    ``load_state_dict`` needs. Tensors are moved to the CPU; the copies share storage."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    first = next((k for k in tensors if _SHARED_BIAS.match(k)), None)
    if first is None:  # no relative positions
        return tensors
    prefix, _, suffix = _SHARED_BIAS.match(first).groups()  # type: ignore[union-attr]
    out: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        out[key] = value
        if key == first:
            for layer in range(1, num_layers):
                out[f"{prefix}{layer}{suffix}"] = value
    return out


def microsoft_checkpoint(
    cfg: BEATsConfig,
    state_dict: dict[str, torch.Tensor],
    label_dict: dict[int, str] | None,
    tokenizer: bool = False,
) -> dict[str, Any]:
    """The dict Microsoft's code saves: ``cfg``, ``model`` and, with labels, ``label_dict``."""
    ckpt: dict[str, Any] = {
        "cfg": microsoft_cfg(cfg, tokenizer),
        "model": microsoft_state_dict(state_dict, cfg.encoder_layers),
    }
    if label_dict is not None:
        ckpt["label_dict"] = {int(k): str(v) for k, v in label_dict.items()}
    return ckpt


def save_microsoft_checkpoint(
    path: str | Path,
    cfg: BEATsConfig,
    state_dict: dict[str, torch.Tensor],
    label_dict: dict[int, str] | None,
    tokenizer: bool = False,
) -> Path:
    """`torch.save` `microsoft_checkpoint` to ``path``, atomically; returns ``path``."""
    path = Path(path)
    ckpt = microsoft_checkpoint(cfg, state_dict, label_dict, tokenizer)
    with atomic_path(path) as tmp:
        torch.save(ckpt, tmp)
    return path
