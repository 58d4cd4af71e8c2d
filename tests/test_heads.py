"""Classifier heads on a frozen or partly unfrozen backbone."""

from __future__ import annotations

import pytest
import torch

from beats import BEATs
from beats.heads import BEATsClassifier, Head

from .conftest import padded_batch, tiny_config


def _backbone(seed: int = 0, **overrides) -> BEATs:
    torch.manual_seed(seed)
    return BEATs(tiny_config(encoder_layerdrop=0.0, **overrides))


def _audio(seed: int = 0, lengths=(16000, 9000, 12000)):
    g = torch.Generator().manual_seed(seed)
    return padded_batch([torch.rand(n, generator=g) * 0.4 - 0.2 for n in lengths])


def _train(clf: BEATsClassifier, steps: int = 3, targets=None) -> torch.optim.Optimizer:
    wav, lengths = _audio()
    targets = torch.tensor([0, 1, 2]) if targets is None else targets
    opt = torch.optim.AdamW(clf.parameter_groups(lr=1e-2, decay=0.5))
    clf.train()
    for _ in range(steps):
        opt.zero_grad()
        clf.loss(clf(wav, lengths=lengths), targets).backward()
        opt.step()
    return opt


@pytest.mark.parametrize("pooling", ["mean", "max", "attentive"])
def test_frozen_backbone_is_untouched_and_stays_in_eval(pooling):
    clf = BEATsClassifier(_backbone(), 3, pooling=pooling, dropout=0.1)
    before = {k: v.clone() for k, v in clf.backbone.state_dict().items()}
    head_before = {k: v.clone() for k, v in clf.head.state_dict().items()}
    opt = _train(clf)
    assert clf.training and clf.head.training and not clf.backbone.training
    assert not any(m.training for m in clf.backbone.modules())
    for k, v in clf.backbone.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert any(not torch.equal(v, head_before[k]) for k, v in clf.head.state_dict().items())
    backbone_ids = {id(p) for p in clf.backbone.parameters()}
    assert not any(id(p) in backbone_ids for p in opt.state)  # no optimizer state for it
    assert all(p.grad is None for p in clf.backbone.parameters())
    wav, lengths = _audio()
    x, _ = clf.embed(wav, lengths=lengths)
    assert not x.requires_grad and x.grad_fn is None  # no graph through the backbone


def test_unfreezing_the_top_layer_changes_only_that_layer():
    clf = BEATsClassifier(_backbone(), 3).unfreeze_top(1)
    before = {k: v.clone() for k, v in clf.backbone.state_dict().items()}
    _train(clf)
    assert clf.backbone.encoder.layers[2].training and not clf.backbone.encoder.layers[1].training
    changed = {k for k, v in clf.backbone.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith("encoder.layers.2.") for k in changed)
    clf.eval()
    assert not clf.backbone.encoder.layers[2].training


def test_parameter_groups_decay_by_depth():
    clf = BEATsClassifier(_backbone(), 3, freeze=False)
    groups = clf.parameter_groups(lr=1.0, decay=0.5)
    lrs = sorted({g["lr"] for g in groups}, reverse=True)
    assert lrs == [1.0, 0.5, 0.25, 0.125, 0.0625]  # head, layers 2, 1, 0, embedding
    by_id = {id(p): g["lr"] for g in groups for p in g["params"]}
    assert by_id[id(clf.head.linear.weight)] == 1.0
    assert by_id[id(clf.backbone.encoder.layers[2].fc1.weight)] == 0.5
    assert by_id[id(clf.backbone.encoder.layers[0].fc1.weight)] == 0.125
    assert by_id[id(clf.backbone.patch_embedding.weight)] == 0.0625
    assert len(by_id) == sum(1 for _ in clf.parameters())
    frozen = BEATsClassifier(_backbone(), 3)
    assert len({id(p) for g in frozen.parameter_groups(1.0, 0.5) for p in g["params"]}) == 2


def test_layer_choice():
    backbone = _backbone().eval()
    wav, lengths = _audio()
    with torch.no_grad():
        ref = backbone.extract_features(wav, lengths=lengths, output_hidden_states=True)
    middle = BEATsClassifier(backbone, 3, layer=1)
    x, mask = middle.embed(wav, lengths=lengths)
    assert torch.equal(x, ref.hidden_states[1]) and torch.equal(mask, ref.padding_mask)
    weighted = BEATsClassifier(backbone, 3, layer="weighted")
    x, _ = weighted.embed(wav, lengths=lengths)
    assert torch.allclose(x, torch.stack(ref.hidden_states).mean(0), atol=1e-6)  # equal weights
    _train(weighted)
    assert not torch.allclose(weighted.layer_weights.logits, torch.zeros(4))
    with pytest.raises(ValueError, match="layer 9 does not exist"):
        BEATsClassifier(backbone, 3, layer=9)


@pytest.mark.parametrize("pooling", ["mean", "max", "attentive"])
def test_pooling_ignores_padding(pooling):
    torch.manual_seed(0)
    head = Head(8, 4, pooling=pooling).eval()
    if head.attention is not None:
        torch.nn.init.normal_(head.attention.query)
    x = torch.randn(2, 10, 8)
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[1, 6:] = True
    garbage = x.clone()
    garbage[1, 6:] = 1e6
    assert torch.equal(head(x, mask), head(garbage, mask))
    assert torch.allclose(head(x, mask)[1], head(x[1:, :6])[0], atol=1e-6)


def test_multilabel_uses_bce_and_sigmoid():
    clf = BEATsClassifier(_backbone(), 3, multilabel=True)
    targets = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    _train(clf, targets=targets)
    wav, lengths = _audio()
    probs = clf.predict_proba(wav, lengths=lengths)
    assert probs.shape == (3, 3) and not torch.allclose(probs.sum(-1), torch.ones(3))
    single = BEATsClassifier(_backbone(), 3)
    assert torch.allclose(single.predict_proba(wav, lengths=lengths).sum(-1), torch.ones(3))
