"""Attention: the plain computation against the original's, and every implementation
against the plain one (float64 and float32 exactly, bfloat16 to its rounding)."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from beats import BEATs
from beats.attention import MultiheadAttention, relative_position_buckets
from beats.errors import InputError
from beats.fast_attention import Workspace

from .conftest import NUM_WAVES, REFERENCE, padded_batch, reference_model

IMPLEMENTATIONS = ["eager", "sdpa", "by_clip"]


def _bucket(r: int, num_buckets: int, max_distance: int) -> int:
    """The architecture's bucket of offset r, computed alone in plain Python floats."""
    nb = num_buckets // 2
    base = nb if r > 0 else 0
    a, e = abs(r), nb // 2
    if a < e:
        return base + a
    scaled = math.log(a / e) / math.log(max_distance / e) * (nb - e)
    return base + min(nb - 1, e + int(scaled))


@pytest.mark.parametrize("num_buckets, max_distance", [(320, 800), (32, 64)])
def test_relative_position_buckets(num_buckets, max_distance):
    n = 600
    buckets = relative_position_buckets(n, num_buckets, max_distance)
    for i in (0, 1, 77, 599):
        for j in range(n):
            assert int(buckets[i, j]) == _bucket(j - i, num_buckets, max_distance), (i, j)
    # Hand-checked values for the released configuration.
    b = relative_position_buckets(1000, 320, 800)
    assert b[0, 0] == 0 and b[1, 0] == 1 and b[0, 1] == 161
    assert b[0, 79] == 239 and b[0, 80] == 240 and b[0, 999] == 319 and b[999, 0] == 159


def _hand_position_bias(attn: MultiheadAttention, length: int, table):
    """The ungated bias (H, S, S) from the bucket table, buckets computed one by one by hand."""
    offsets = torch.arange(length)[None, :] - torch.arange(length)[:, None]
    buckets = torch.tensor([[_bucket(int(r), attn.num_buckets, attn.max_distance) for r in row]
                            for row in offsets])
    return table[buckets].permute(2, 0, 1)


def _original_attention(attn: MultiheadAttention, x, key_padding_mask, position_bias):
    """The original's computation: scaled q, max subtraction and x32 rescaling, explicit
    softmax; ``position_bias`` (H, S, S) or (B, H, S, S), gated when ``attn`` has the GRU
    gate; ``key_padding_mask`` (B, S) or None."""
    batch, length, dim = x.shape
    heads, d = attn.num_heads, attn.head_dim
    alpha, scaling = 32.0, d**-0.5
    q = (x @ attn.q_proj.weight.T + attn.q_proj.bias) * scaling / alpha
    k = x @ attn.k_proj.weight.T + attn.k_proj.bias
    v = x @ attn.v_proj.weight.T + attn.v_proj.bias
    q, k, v = (t.view(batch, length, heads, d).transpose(1, 2) for t in (q, k, v))
    w = q @ k.transpose(-1, -2)
    w = (w - w.max(dim=-1, keepdim=True).values) * alpha
    if key_padding_mask is not None:
        w = w.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
    bias = position_bias
    if attn.gru_rel_pos:
        u = q * alpha / scaling
        g = torch.sigmoid((u @ attn.grep_linear.weight.T + attn.grep_linear.bias)
                          .view(batch, heads, length, 2, 4).sum(-1))
        bias = (g[..., :1] * (g[..., 1:] * attn.grep_a - 1.0) + 2.0) * bias
    out = torch.softmax(w + bias, dim=-1) @ v
    out = out.transpose(1, 2).reshape(batch, length, dim)
    return out @ attn.out_proj.weight.T + attn.out_proj.bias


def _perturbed_attention(gru: bool = True, dim: int = 16, lengths: tuple[int, ...] = (40, 27)):
    """A relative-position attention (GRU gate or not) with every weight perturbed, a
    (len(lengths), 40, dim) input and its key padding mask (clip i has lengths[i] valid
    positions)."""
    torch.manual_seed(0)
    attn = MultiheadAttention(dim, 4, has_relative_attention_bias=True, num_buckets=32,
                              max_distance=64, gru_rel_pos=gru).eval()
    with torch.no_grad():
        for p in attn.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    x = torch.randn(len(lengths), 40, dim)
    mask = torch.arange(40)[None, :] >= torch.tensor(lengths)[:, None]
    return attn, x, mask


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_attention_matches_the_original_computation(implementation):
    attn, x, mask = _perturbed_attention()
    attn.implementation = implementation
    with torch.no_grad():
        ours = attn(x, mask, attn.position_bias(40, x.device))
        theirs = _original_attention(
            attn, x, mask, _hand_position_bias(attn, 40, attn.relative_attention_bias.weight))
    assert attn.last_implementation == implementation
    assert (ours - theirs).abs().max() < 1e-5


@pytest.mark.parametrize("gru", [True, False])
@pytest.mark.parametrize("padded", [True, False])
@pytest.mark.parametrize("bias", ["shared", "per_clip", "none"])
def test_every_implementation_computes_the_plain_one_in_float64(gru, padded, bias):
    """Outside autograd with a workspace (the encoder's inference call): sdpa and by_clip
    give the plain computation's numbers to float64 rounding."""
    attn, x, mask = _perturbed_attention(gru, lengths=(40, 27, 9))
    attn, x = attn.double(), x.double()
    mask = mask if padded else None
    position_bias = None
    if bias == "shared":
        position_bias = attn.position_bias(40, x.device)
    elif bias == "per_clip":  # kept patches at scattered true positions (pre-training)
        positions = torch.stack([torch.randperm(100)[:40].sort().values for _ in range(3)])
        position_bias = attn.position_bias_at(positions)
    outputs = {}
    with torch.no_grad():
        for implementation in IMPLEMENTATIONS:
            attn.implementation = implementation
            outputs[implementation] = attn(x, mask, position_bias, Workspace())
            assert attn.last_implementation == implementation
    plain = outputs["eager"]
    assert plain.isfinite().all() and plain.abs().max() > 1.0
    for implementation in ("sdpa", "by_clip"):
        assert (outputs[implementation] - plain).abs().max() < 1e-12, implementation


@pytest.mark.parametrize("gru", [True, False])
def test_sdpa_and_the_plain_computation_have_the_same_gradients(gru):
    attn, x, mask = _perturbed_attention(gru)
    attn, x = attn.double(), x.double().requires_grad_()
    results = []
    for implementation in ("eager", "sdpa"):
        attn.implementation = implementation
        attn.zero_grad()
        x.grad = None
        out = attn(x, mask, attn.position_bias(40, x.device))
        out.pow(2).sum().backward()
        grads = {n: p.grad.clone() for n, p in attn.named_parameters()}
        results.append((out.detach(), x.grad.clone(), grads))
    (out_a, dx_a, grads_a), (out_b, dx_b, grads_b) = results
    assert (out_a - out_b).abs().max() < 1e-12
    assert (dx_a - dx_b).abs().max() < 1e-10
    for name, g in grads_a.items():
        assert (g - grads_b[name]).abs().max() <= 1e-10 * max(1.0, g.abs().max()), name


@pytest.mark.parametrize("gru", [True, False])
@pytest.mark.parametrize("padded", [True, False])
def test_sdpa_mask_buffer_and_autograd_paths_agree(gru, padded):
    """The encoder's inference call writes SDPA's mask into a shared buffer; same values."""
    attn, x, mask = _perturbed_attention(gru)
    attn.implementation = "sdpa"
    mask = mask if padded else None
    bias = attn.position_bias(40, x.device)
    with torch.enable_grad():
        with_grad = attn(x, mask, bias)
    workspace = Workspace()
    buffer = workspace.get("mask", (2, 4, 40, 40), x).fill_(float("nan"))
    with torch.no_grad():
        plain = attn(x, mask, bias)
        buffered = attn(x, mask, bias, workspace)
    assert torch.equal(plain, buffered)
    # Autograd may pick another SDPA kernel: equal to float noise (outputs are ~3).
    assert (with_grad - buffered).abs().max() < 1e-5
    if gru or padded:
        assert not buffer.isnan().any()  # the mask went into the buffer


def test_fused_projection_gradients_equal_the_original_computation():
    """q/k/v and the gate logits come from one stacked product; gradients must not notice."""
    attn, x, mask = _perturbed_attention()
    grads = []
    for run in ("ours", "original"):
        attn.zero_grad()
        if run == "ours":
            out = attn(x, mask, attn.position_bias(40, x.device))
        else:
            out = _original_attention(
                attn, x, mask, _hand_position_bias(attn, 40, attn.relative_attention_bias.weight))
        out.pow(2).sum().backward()
        grads.append({n: p.grad.clone() for n, p in attn.named_parameters()})
    for name, g in grads[0].items():
        assert torch.allclose(g, grads[1][name], atol=1e-4, rtol=1e-4), name


@pytest.mark.parametrize("gru", [True, False])
@pytest.mark.parametrize("padded", [True, False])
@pytest.mark.parametrize("per_clip_bias", [True, False])
def test_bfloat16_attention_matches_the_formula_to_bfloat16_rounding(gru, padded,
                                                                     per_clip_bias):
    """bfloat16 on CPU outside autograd: by_clip and the plain computation give the
    original's attention (in float64) as closely as SDPA's bfloat16 kernel does."""
    attn, x, mask = _perturbed_attention(gru, dim=32, lengths=(40, 27, 9))
    mask = mask if padded else None
    if per_clip_bias:
        positions = torch.stack([torch.randperm(100)[:40].sort().values for _ in range(3)])
        bias = attn.position_bias_at(positions)
    else:
        bias = attn.position_bias(40, x.device)
    outputs = {}
    with torch.no_grad():
        expected = _original_attention(copy.deepcopy(attn).double(), x.double(), mask,
                                       bias.double())
        half = attn.to(torch.bfloat16)
        xb, bias_b = x.to(torch.bfloat16), bias.to(torch.bfloat16)
        for implementation in IMPLEMENTATIONS:
            half.implementation = implementation
            outputs[implementation] = half(xb, mask, bias_b, Workspace())
            assert half.last_implementation == implementation
    scale = expected.abs().max().item()
    sdpa = outputs["sdpa"].double()
    sdpa_err = (sdpa - expected).abs().max().item()
    sdpa_cosine = F.cosine_similarity(sdpa, expected, dim=-1).min().item()
    assert sdpa_err < 0.02 * scale
    for implementation in ("eager", "by_clip"):
        out = outputs[implementation]
        assert out.dtype == torch.bfloat16 and out.shape == x.shape
        err = (out.double() - expected).abs().max().item()
        assert err < 0.02 * scale
        assert err < 5.0 * sdpa_err + 1e-3 * scale
        cosine = F.cosine_similarity(out.double(), expected, dim=-1).min().item()
        # One more bfloat16 rounding (of the scores, which SDPA keeps in float32): within
        # a few times SDPA's own distance on these deliberately sharp weights.
        assert 1 - cosine < 5.0 * (1 - sdpa_cosine) + 1e-4, implementation


@pytest.mark.parametrize("implementation", ["sdpa", "by_clip"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_clip_whose_keys_are_all_padding_gets_zeros(implementation, dtype):
    """No key to attend to (0/0 in the softmax): the fast implementations return zeros,
    so the output is out_proj's bias, and the other clip is the same as alone."""
    torch.manual_seed(0)
    attn = MultiheadAttention(32, 4, has_relative_attention_bias=True, num_buckets=32,
                              max_distance=64, gru_rel_pos=True).eval().to(dtype)
    attn.implementation = implementation
    x = torch.randn(2, 20, 32, dtype=dtype)
    mask = torch.zeros(2, 20, dtype=torch.bool)
    mask[1] = True
    bias = attn.position_bias(20, x.device)
    with torch.no_grad():
        out = attn(x, mask, bias, Workspace())
        alone = attn(x[:1], mask[:1], bias, Workspace())
    assert torch.equal(out[1], attn.out_proj.bias.detach().expand(20, -1))
    assert (out[0] - alone[0]).abs().max() <= (1e-6 if dtype == torch.float32 else 0.02)


def test_by_clip_is_refused_where_it_cannot_run():
    attn, x, mask = _perturbed_attention()
    attn.implementation = "by_clip"
    bias = attn.position_bias(40, x.device)
    with pytest.raises(InputError, match="outside autograd"):
        attn(x, mask, bias)  # gradients are recorded
    attn.dropout = 0.1
    attn.train()
    with torch.no_grad(), pytest.raises(InputError, match="dropout"):
        attn(x, mask, bias)
    attn.eval()
    with torch.no_grad():
        assert attn(x, mask, bias).isfinite().all()  # eval mode: no dropout


def _has_amx() -> bool:
    """AMX from the kernel's list of CPU flags (torch's own check where there is none)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        return "amx_tile" in cpuinfo.read_text()
    return bool(torch.cpu._is_amx_tile_supported())


def test_model_attn_implementation_shows_what_runs(waves):
    path = REFERENCE / "postnorm_gru.pt"
    wav = waves["wav.0"]
    model = BEATs.from_pretrained(path)
    assert model.attn_implementation == "sdpa"  # float32: before any call
    model.embed(wav)
    assert model.attn_implementation == "sdpa"
    # bfloat16 inference on CPU: by_clip, except on CPUs with AMX, where SDPA is faster.
    fast = "sdpa" if _has_amx() else "by_clip"
    half = BEATs.from_pretrained(path, dtype=torch.bfloat16)
    assert half.attn_implementation == fast
    half.embed(wav)
    assert half.attn_implementation == fast
    half.extract_features(wav)  # gradients recorded: SDPA
    assert half.attn_implementation == "sdpa"
    half.attn_implementation = "by_clip"
    assert half.attn_implementation == "by_clip"
    half.embed(wav)
    assert half.attn_implementation == "by_clip"
    assert all(layer.self_attn.last_implementation == "by_clip"
               for layer in half.encoder.layers)
    half.float()  # a change of dtype: what the next inference call runs
    half.attn_implementation = "auto"
    assert half.attn_implementation == "sdpa"
    eager = BEATs.from_pretrained(path, attn_implementation="eager")
    assert eager.attn_implementation == "eager"
    features = eager.embed(wav).features
    assert eager.attn_implementation == "eager"
    assert (features - model.embed(wav).features).abs().max() < 1e-5


def test_unknown_or_impossible_implementations_are_input_errors(waves):
    path = REFERENCE / "postnorm_gru.pt"
    with pytest.raises(InputError, match="unknown attention implementation 'flash'"):
        BEATs.from_pretrained(path, attn_implementation="flash")
    model = BEATs.from_pretrained(path)
    with pytest.raises(InputError, match="choose one of 'auto', 'eager', 'sdpa', 'by_clip'"):
        model.attn_implementation = "flash"
    model.attn_implementation = "by_clip"
    with pytest.raises(InputError, match="outside autograd"):
        model.extract_features(waves["wav.0"])
    assert model.embed(waves["wav.0"]).features.isfinite().all()


@pytest.mark.parametrize("case", ["postnorm_gru", "finetuned", "prenorm_glu", "relpos_relu"])
@pytest.mark.parametrize("implementation", ["eager", "by_clip"])
def test_reference_vectors_with_each_implementation(case, implementation, waves, expected):
    """The reference checkpoints' outputs (float32, a padded batch of every wave) with the
    implementations the default float32 run does not use (test_reference covers sdpa)."""
    model = BEATs.from_pretrained(REFERENCE / f"{case}.pt", attn_implementation=implementation)
    clips = [waves[f"wav.{i}"] for i in range(NUM_WAVES)]
    batch, lengths = padded_batch(clips)
    out = model.embed(batch, lengths=lengths, output_hidden_states=True)
    assert model.attn_implementation == implementation
    layers = model.cfg.encoder_layers
    for i in range(NUM_WAVES):
        want = expected[case][f"hidden.{i}.{layers}"]
        got = out.hidden_states[layers][i, : want.shape[0]]
        assert (got - want).abs().max() <= 1e-4, i
        if case == "finetuned":
            assert (out.probs[i] - expected[case][f"probs.{i}"]).abs().max() <= 1e-5


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_bfloat16_features_with_each_implementation(implementation, waves):
    """bfloat16 against float32 (both padded batches), per position, as in test_precision."""
    full = reference_model("postnorm_gru")
    half = BEATs.from_pretrained(REFERENCE / "postnorm_gru.pt", dtype=torch.bfloat16,
                                 attn_implementation=implementation)
    batch, lengths = padded_batch([waves[f"wav.{i}"] for i in range(NUM_WAVES)])
    ref = full.embed(batch, lengths=lengths)
    out = half.embed(batch, lengths=lengths)
    assert half.attn_implementation == implementation
    valid = ~ref.padding_mask
    cos = F.cosine_similarity(out.features.float(), ref.features, dim=-1)[valid]
    assert cos.min() >= 0.999
