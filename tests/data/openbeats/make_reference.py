"""Make the OpenBEATs/ESPnet reference files with openbeats itself (not run in CI).

Run in a separate venv that has openbeats 0.1.1 and a torch + torchaudio pair, from the
repository root (see README.md beside this file for the exact setup):

    /work/venv-openbeats/bin/python tests/data/openbeats/make_reference.py

It builds two tiny random encoders with openbeats' vendored ESPnet ``BeatsEncoder``,
writes their checkpoints in the layouts ESPnet and OpenBEATs use, then loads each file
back with openbeats' own loader (``OpenBeats.from_pretrained``) and records what it
computes on a few short clips. beats' tests load the same files and compare.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import openbeats
import torch
import torchaudio
from openbeats.beats_encoder import BeatsEncoder
from openbeats.model import OpenBeats

HERE = Path(__file__).resolve().parent
SAMPLE_RATE = 16000

# Two architectures: the released layout (post-norm, deep norm, relative positions with
# the GRU gate, patch width != encoder width) with its own filterbank statistics in cfg,
# and a pre-norm GLU one without them (openbeats then uses Microsoft's constants).
ESPNET_KEYS = {  # keys ESPnet's BeatsConfig adds to Microsoft's; inert at inference
    "decoder_embed_dim": 48, "decoder_pos_trainable": False, "decoder_attention_heads": 4,
    "decoder_mlp_ratio": 4.0, "decoder_layers": 1, "codebook_vocab_size": 64,
    "mask_ratio": 0.75, "use_flash_attn": False,
}
MODELS = {
    "postnorm": {
        "input_patch_size": 16, "embed_dim": 32, "conv_bias": False, "encoder_layers": 3,
        "encoder_embed_dim": 48, "encoder_ffn_embed_dim": 96, "encoder_attention_heads": 4,
        "activation_fn": "gelu", "layer_norm_first": False, "deep_norm": True,
        "conv_pos": 16, "conv_pos_groups": 4, "relative_position_embedding": True,
        "num_buckets": 320, "max_distance": 800, "gru_rel_pos": True,
        "finetuned_model": False, "fbank_mean": 11.25, "fbank_std": 4.75, **ESPNET_KEYS,
    },
    "prenorm": {
        "input_patch_size": 16, "embed_dim": 40, "conv_bias": True, "encoder_layers": 2,
        "encoder_embed_dim": 40, "encoder_ffn_embed_dim": 64, "encoder_attention_heads": 5,
        "activation_fn": "glu", "layer_norm_first": True, "deep_norm": False,
        "conv_pos": 8, "conv_pos_groups": 4, "relative_position_embedding": True,
        "num_buckets": 64, "max_distance": 200, "gru_rel_pos": False,
        "finetuned_model": False, **ESPNET_KEYS,
    },
}
CLASSES = 5  # the ESPnet fine-tune's linear head (decoder.linear_out) in the bare .pth
CLIP_LENGTHS = [8000, 16037, 36000]  # samples; all >= 3200 (see README: short clips)
MAX_LAYER = 1


def clips() -> list[np.ndarray]:
    """Deterministic test audio: a chirp, a vowel-like harmonic mix, noise bursts.

    Each has a noise floor: bands holding no energy at all would leave the log filterbank
    to rounding noise, where two correct implementations differ (float32 FFTs do).
    """
    gen = np.random.default_rng(11)
    out = []
    for i, n in enumerate(CLIP_LENGTHS):
        t = np.arange(n) / SAMPLE_RATE
        if i == 0:
            x = 0.4 * np.sin(2 * np.pi * (200 + 1500 * t) * t) + 0.05 * gen.standard_normal(n)
        elif i == 1:
            x = sum(0.2 / k * np.sin(2 * np.pi * 140 * k * t) for k in range(1, 12))
            x = x + 0.01 * gen.standard_normal(n)
        else:
            x = 0.3 * gen.standard_normal(n) * (np.sin(2 * np.pi * 2.5 * t) > 0)
        out.append(np.clip(x, -1, 1).astype(np.float32))
    return out


def build(cfg: dict) -> BeatsEncoder:
    """An openbeats encoder with every weight moved off its initial value (the pad
    convolutions excepted: ESPnet keeps them all ones)."""
    encoder = BeatsEncoder(input_size=0, beats_config=cfg, is_pretraining=False,
                           fbank_mean=cfg.get("fbank_mean", 15.41663),
                           fbank_std=cfg.get("fbank_std", 6.55582))
    with torch.no_grad():
        for name, p in encoder.named_parameters():
            if "_pad" not in name:
                p.add_(0.05 * torch.randn_like(p))
    return encoder.eval()


def encode_batch(encoder: BeatsEncoder, waves: list[np.ndarray]) -> list[np.ndarray]:
    """ESPnet's own padded-batch path (its pad convolutions make the mask)."""
    lengths = torch.tensor([len(w) for w in waves])
    batch = torch.zeros(len(waves), int(lengths.max()))
    for i, w in enumerate(waves):
        batch[i, : len(w)] = torch.from_numpy(w)
    with torch.no_grad():
        rep, olens, _ = encoder(batch, lengths, waveform_input=True)
    return [rep[i, : int(olens[i])].numpy() for i in range(len(waves))]


def main() -> None:
    torch.manual_seed(0)
    waves = clips()
    arrays: dict[str, np.ndarray] = {f"wav.{i}": w for i, w in enumerate(waves)}
    for name, cfg in MODELS.items():
        encoder = build(cfg)
        state = encoder.state_dict()
        assert torch.equal(state["patch_embedding_pad.weight"], torch.ones(1, 1, 16, 16))
        assert torch.equal(state["raw2fbank_pad.weight"], torch.ones(1, 1, 400))
        # 1. OpenBEATs SSL layout: {"cfg", "model": the encoder's state dict}.
        torch.save({"cfg": cfg, "model": state}, HERE / f"{name}.pt")
        # 2. The same under ESPnet's "encoder." prefix (ESPnet saves the whole task model).
        prefixed = {f"encoder.{k}": v for k, v in state.items()}
        torch.save({"cfg": cfg, "model": prefixed}, HERE / f"{name}_prefixed.pt")
        # 3. A bare ESPnet .pth: the task model's state dict only (encoder + its linear
        #    head), no cfg: the architecture is given separately (cfg.json).
        head = torch.nn.Linear(cfg["encoder_embed_dim"], CLASSES)
        bare = {**prefixed, "decoder.linear_out.weight": head.weight.detach().clone(),
                "decoder.linear_out.bias": head.bias.detach().clone()}
        torch.save(bare, HERE / f"{name}_bare.pth")
        (HERE / f"{name}_cfg.json").write_text(json.dumps(cfg, indent=2) + "\n")

        for variant in ("", "_prefixed"):
            model = OpenBeats.from_pretrained(str(HERE / f"{name}{variant}.pt"))
            for i, w in enumerate(waves):
                arrays[f"{name}{variant}.{i}"] = model.encode(w)["patch_embeddings"]
        deep = OpenBeats.from_pretrained(str(HERE / f"{name}.pt"), max_layer=MAX_LAYER)
        for i, w in enumerate(waves):
            arrays[f"{name}.max_layer{MAX_LAYER}.{i}"] = deep.encode(w)["patch_embeddings"]
        for i, rep in enumerate(encode_batch(model.encoder, waves)):
            arrays[f"{name}.batch.{i}"] = rep

    np.savez_compressed(HERE / "outputs.npz", **arrays)
    versions = {"openbeats": getattr(openbeats, "__version__", None) or _dist("openbeats"),
                "torch": torch.__version__, "torchaudio": torchaudio.__version__,
                "numpy": np.__version__, "python": sys.version.split()[0],
                "clip_lengths": CLIP_LENGTHS, "max_layer": MAX_LAYER}
    (HERE / "versions.json").write_text(json.dumps(versions, indent=2) + "\n")
    print(json.dumps(versions))


def _dist(name: str) -> str:
    from importlib.metadata import version

    return version(name)


if __name__ == "__main__":
    main()
