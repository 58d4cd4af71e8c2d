"""Fine-tuning: gradients reach every parameter, decay, layerdrop, noise only in training."""

from __future__ import annotations

import pytest
import torch

from beats import BEATs

from .conftest import padded_batch, tiny_config


def _audio(seed: int = 0, lengths=(16000, 9000)) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    clips = [torch.rand(n, generator=g) * 0.2 - 0.1 for n in lengths]
    return padded_batch(clips)


@pytest.mark.parametrize(
    "overrides",
    [
        {},  # released layout: deep norm, relative positions, GRU gate
        {"finetuned_model": True, "predictor_class": 5},
        {"layer_norm_first": True, "deep_norm": False, "activation_fn": "glu",
         "embed_dim": 48, "conv_bias": True},
        {"activation_fn": "gelu_accurate", "gru_rel_pos": False, "quant_noise": 0.1},
    ],
)
def test_backward_reaches_every_parameter(overrides):
    torch.manual_seed(0)
    model = BEATs(tiny_config(encoder_layerdrop=0.0, **overrides)).train()
    wav, lengths = _audio()
    out = model.extract_features(wav, lengths=lengths)
    loss = out.probs.sum() if out.probs is not None else out.features.pow(2).mean()
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_dropout_acts_only_in_training():
    torch.manual_seed(0)
    model = BEATs(tiny_config(dropout=0.3, attention_dropout=0.3, encoder_layerdrop=0.0))
    wav, lengths = _audio()
    model.train()
    a = model.extract_features(wav, lengths=lengths).features
    b = model.extract_features(wav, lengths=lengths).features
    assert not torch.allclose(a, b)
    model.eval()
    with torch.no_grad():
        c = model.extract_features(wav, lengths=lengths).features
        d = model.extract_features(wav, lengths=lengths).features
    assert torch.equal(c, d)


def _input_grads(model: BEATs, wav, lengths) -> list[torch.Tensor]:
    """Gradient of the loss at each layer's input (after its GradMultiply)."""
    captured: list[torch.Tensor] = []

    def hook(_module, args):
        args[0].retain_grad()
        captured.append(args[0])

    hooks = [layer.register_forward_pre_hook(hook) for layer in model.encoder.layers]
    try:
        model.extract_features(wav, lengths=lengths).features.pow(2).sum().backward()
    finally:
        for h in hooks:
            h.remove()
    return [x.grad for x in captured]


def test_layer_wise_gradient_decay_scales_each_layers_incoming_gradient():
    ratio = 0.6
    torch.manual_seed(0)
    decayed = BEATs(tiny_config(layer_wise_gradient_decay_ratio=ratio)).eval()
    plain = BEATs(tiny_config(layer_wise_gradient_decay_ratio=1.0)).eval()
    plain.load_state_dict(decayed.state_dict())
    wav, lengths = _audio()
    g_decayed = _input_grads(decayed, wav, lengths)
    g_plain = _input_grads(plain, wav, lengths)
    layers = len(g_plain)
    for k in range(layers):
        # Layer k's input gradient passed through the GradMultiply of layers k+1 .. L-1.
        expect = ratio ** (layers - 1 - k)
        assert torch.allclose(g_decayed[k], expect * g_plain[k], rtol=1e-4, atol=1e-9), k
    # and the patch embedding sees all L multipliers
    decayed.zero_grad()
    plain.zero_grad()
    for m in (decayed, plain):
        m.extract_features(wav, lengths=lengths).features.pow(2).sum().backward()
    assert torch.allclose(decayed.patch_embedding.weight.grad,
                          ratio**layers * plain.patch_embedding.weight.grad, rtol=1e-4, atol=1e-9)


def test_layerdrop_skips_layers_only_in_training():
    torch.manual_seed(0)
    model = BEATs(tiny_config(encoder_layerdrop=1.0)).train()
    wav, lengths = _audio()
    out = model.extract_features(wav, lengths=lengths, output_hidden_states=True)
    out.features.pow(2).sum().backward()
    for i, layer in enumerate(model.encoder.layers):
        for name, p in layer.named_parameters():
            if "relative_attention_bias" in name:
                continue
            assert p.grad is None or not p.grad.any(), (i, name)
    assert all(torch.equal(h, out.hidden_states[0]) for h in out.hidden_states)
    model.eval()
    with torch.no_grad():
        ev = model.extract_features(wav, lengths=lengths, output_hidden_states=True)
    assert not torch.allclose(ev.hidden_states[1], ev.hidden_states[0])


def test_quant_noise_training_keeps_stored_weights_and_eval_equals_plain():
    torch.manual_seed(0)
    noisy = BEATs(tiny_config(quant_noise=0.25, quant_noise_block_size=8, encoder_layerdrop=0.0,
                              dropout=0.0, attention_dropout=0.0))
    plain = BEATs(tiny_config(encoder_layerdrop=0.0, dropout=0.0, attention_dropout=0.0))
    plain.load_state_dict(noisy.state_dict())  # same keys: noise adds no parameters
    stored = {k: v.clone() for k, v in noisy.state_dict().items()}
    wav, lengths = _audio()
    noisy.train()
    outs = []
    for _ in range(3):
        noisy.zero_grad()
        out = noisy.extract_features(wav, lengths=lengths).features
        out.pow(2).mean().backward()
        outs.append(out.detach())
        q = noisy.encoder.layers[0].self_attn.q_proj.weight.grad.view(48, 6, 8)
        assert ((q == 0).all(-1)).any()  # some blocks dropped: exactly zero gradient
    assert not torch.equal(outs[0], outs[1])
    for k, v in noisy.state_dict().items():
        assert torch.equal(v, stored[k]), k
    noisy.eval()
    plain.eval()
    with torch.no_grad():
        assert torch.equal(noisy.extract_features(wav, lengths=lengths).features,
                           plain.extract_features(wav, lengths=lengths).features)


def test_freeze():
    model = BEATs(tiny_config()).train()
    assert model.freeze() is model
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    model.unfreeze()
    assert all(p.requires_grad for p in model.parameters())


def test_optimizer_step_reduces_loss():
    torch.manual_seed(0)
    model = BEATs(tiny_config(finetuned_model=True, predictor_class=3, encoder_layerdrop=0.0))
    model.train()
    wav, lengths = _audio()
    target = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        probs = model.extract_features(wav, lengths=lengths).probs
        loss = torch.nn.functional.binary_cross_entropy(probs, target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_training_after_inference_mode_calls():
    """Caches filled under inference mode (embed, predict_labels) must not break a later
    forward with gradients: an inference tensor cannot be saved for backward."""
    from beats.fbank import _TABLES
    from beats.heads import BEATsClassifier

    _TABLES.clear()  # made afresh under inference mode below
    torch.manual_seed(0)
    model = BEATs(tiny_config(finetuned_model=True, predictor_class=3, encoder_layerdrop=0.0))
    wav, lengths = _audio()
    model.embed(wav, lengths=lengths)
    model.predict_labels(wav[0], top_k=1)
    model.train()
    out = model.extract_features(wav, lengths=lengths)
    out.logits.sum().backward()
    assert model.encoder.layers[0].self_attn.relative_attention_bias.weight.grad.abs().sum() > 0

    # gradients w.r.t. the waveform go through the cached filterbank tables
    _TABLES.clear()
    with torch.inference_mode():
        model.extract_features(wav, lengths=lengths)
    audio = wav.clone().requires_grad_(True)
    model.extract_features(audio, lengths=lengths).logits.sum().backward()
    assert audio.grad is not None and torch.isfinite(audio.grad).all()
    assert audio.grad.abs().sum() > 0

    # a classifier validated under inference mode, then trained with every layer unfrozen
    clf = BEATsClassifier(BEATs(tiny_config(encoder_layerdrop=0.0)), num_classes=2)
    clf.eval()
    clf.predict_proba(wav, lengths=lengths)
    clf.unfreeze_top(len(clf.backbone.encoder.layers)).train()
    loss = clf.loss(clf(wav, lengths=lengths), torch.tensor([0, 1]))
    loss.backward()
    assert clf.backbone.encoder.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
