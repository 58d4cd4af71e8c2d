"""torch.compile, torch.export and ONNX: waveform in, features out, same numbers as eager."""

from __future__ import annotations

import pytest
import torch

from beats import patch_padding_mask
from beats.export import WaveformEncoder, export_onnx, export_program, pad_width

from .conftest import padded_batch, reference_model

HIDDEN_TOL = 1e-4


def _batch(waves, indices):
    wav, lengths = padded_batch([waves[f"wav.{i}"] for i in indices])
    width = pad_width(wav.shape[1])
    return torch.nn.functional.pad(wav, (0, width - wav.shape[1])), lengths


def _check_against_reference(features, indices, expected, case):
    for b, i in enumerate(indices):
        want = expected[case][f"features.{i}"]
        got = torch.as_tensor(features[b, : want.shape[0]])
        assert (got - want).abs().max() <= HIDDEN_TOL, (case, i)
        assert (torch.as_tensor(features[b, want.shape[0]:]) == 0).all()


def test_pad_width():
    assert pad_width(2800) == 5360  # at least two steps
    assert pad_width(160000) == 2560 * 63 + 240
    assert all((pad_width(n) - 240) % 2560 == 0 and pad_width(n) >= n for n in range(2800, 9000))


@pytest.mark.slow
def test_torch_export_dynamic_shapes(waves, expected):
    model = reference_model("postnorm_gru")
    program = export_program(model, seconds=3.0, dynamic=True)
    run = program.module()
    for indices in ([0, 1, 2], [4], [3, 0]):
        wav, lengths = _batch(waves, indices)
        with torch.no_grad():
            features, mask = run(wav, lengths)
            eager = model.extract_features(wav, lengths=lengths)
        assert torch.equal(mask, eager.padding_mask)
        assert (features - eager.features).abs().max() <= 1e-5
        _check_against_reference(features, indices, expected, "postnorm_gru")


@pytest.mark.slow
def test_onnx_export_runs_in_onnxruntime(tmp_path, waves, expected):
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    for case in ("postnorm_gru", "finetuned"):
        model = reference_model(case)
        path = export_onnx(model, tmp_path / f"{case}.onnx", seconds=3.0, dynamic=True)
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        assert names == WaveformEncoder(model).output_names
        for indices in ([0, 1, 2], [4]):
            wav, lengths = _batch(waves, indices)
            outputs = session.run(None, {"wav": wav.numpy(), "lengths": lengths.numpy()})
            with torch.no_grad():
                eager = model.extract_features(wav, lengths=lengths)
            features = torch.from_numpy(outputs[0])
            assert torch.equal(torch.from_numpy(outputs[1]), eager.padding_mask)
            assert (features - eager.features).abs().max() <= 1e-4
            if case == "finetuned":
                probs = torch.from_numpy(outputs[2])
                assert (probs - eager.probs).abs().max() <= 1e-5
                for b, i in enumerate(indices):
                    assert (probs[b] - expected[case][f"probs.{i}"]).abs().max() <= 1e-5
            else:
                _check_against_reference(features, indices, expected, case)


@pytest.mark.slow
def test_compiled_encoder_has_no_graph_break(waves):
    model = reference_model("postnorm_gru")
    wav, lengths = padded_batch([waves["wav.0"], waves["wav.2"]])
    with torch.no_grad():
        features, _ = model.preprocess(wav, lengths=lengths)
        x = model.embed_patches(features)
        mask = patch_padding_mask(lengths, x.shape[1])
        assert mask.any()
        compiled = torch.compile(model.encoder, fullgraph=True)  # fails on any graph break
        for padding in (None, mask):
            got, _ = compiled(x, padding)
            want, _ = model.encoder(x, padding)
            assert (got - want).abs().max() <= 1e-5
