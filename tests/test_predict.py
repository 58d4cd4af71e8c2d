"""predict_labels: top-k AudioSet classes with display names, fine-tuned models only."""

from __future__ import annotations

import pytest
import torch

from beats import BEATs

from .conftest import reference_model, tiny_config


def test_predict_labels_gives_top_k_names_and_probabilities(waves):
    model = reference_model("finetuned")
    clips = [waves["wav.0"], waves["wav.2"]]
    preds = model.predict_labels(clips, top_k=3)
    with torch.no_grad():
        probs = model.extract_features(clips).probs  # the same padded batch
    assert len(preds) == 2
    for row, p in zip(preds, probs, strict=True):
        values, indices = p.topk(3)
        assert row == [(model.labels[i], v) for v, i in zip(values.tolist(), indices.tolist(),
                                                             strict=True)]
        assert all(isinstance(name, str) and isinstance(prob, float) for name, prob in row)
        assert [prob for _, prob in row] == sorted((prob for _, prob in row), reverse=True)
    assert {name for row in preds for name, _ in row} <= {
        "Speech", "Music", "Animal", "Vehicle", "Silence"
    }


def test_predict_labels_of_one_clip_matches_it_alone(waves):
    model = reference_model("finetuned")
    alone = model.predict_labels(waves["wav.1"], top_k=5)
    batched = model.predict_labels([waves["wav.0"], waves["wav.1"]], top_k=5)[1]
    assert [n for n, _ in alone[0]] == [n for n, _ in batched]
    assert max(abs(a - b) for (_, a), (_, b) in zip(alone[0], batched, strict=True)) < 1e-5


def test_top_k_larger_than_the_classes_gives_them_all(waves):
    preds = reference_model("finetuned").predict_labels(waves["wav.0"], top_k=50)
    assert len(preds[0]) == 5


@pytest.mark.parametrize("top_k", [0, -1, 2.0, True, "3"])
def test_bad_top_k(waves, top_k):
    with pytest.raises(ValueError, match="top_k must be a positive int"):
        reference_model("finetuned").predict_labels(waves["wav.0"], top_k=top_k)


def test_predict_labels_needs_a_fine_tuned_model(waves):
    with pytest.raises(ValueError) as err:
        reference_model("postnorm_gru").predict_labels(waves["wav.0"])
    assert "predict_labels needs a fine-tuned model" in str(err.value)
    assert "BEATs_iter3_plus_AS2M_finetuned_on_AS2M_cpt2" in str(err.value)


def test_classes_without_labels_are_numbered(waves):
    model = BEATs(tiny_config(finetuned_model=True, predictor_class=4)).eval()
    model.label_dict = {0: "/m/09x0r", 1: "/m/not-in-audioset"}
    names = {name for name, _ in model.predict_labels(waves["wav.0"], top_k=4)[0]}
    assert names == {"Speech", "/m/not-in-audioset", "class 2", "class 3"}
