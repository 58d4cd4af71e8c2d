"""Training the tokenizer's codebook: EMA update, k-means once, ranks, health, restarts."""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from beats.quantizer import VectorQuantizer, code_perplexity, l2norm

from . import dist_quantizer_worker as worker

ROOT = Path(__file__).resolve().parents[1]


def _initialised(codes: torch.Tensor, **kwargs) -> VectorQuantizer:
    """A training quantiser whose codebook is ``codes`` (rows normalised), k-means skipped."""
    vq = VectorQuantizer(codes.shape[0], codes.shape[1], **kwargs).train()
    with torch.no_grad():
        vq.embedding.weight.copy_(l2norm(codes))
        vq.embedding.initted.fill_(1.0)
    return vq


def _ema_by_hand(codes: np.ndarray, vectors: np.ndarray, decay: float) -> np.ndarray:
    """The spec's update, written out: nearest code by cosine, per-code normalised mean,
    code <- normalise(decay * code + (1 - decay) * mean); codes with no vector unchanged."""
    units = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    nearest = (units @ codes.T).argmax(axis=1)
    new = codes.copy()
    for k in range(len(codes)):
        mine = units[nearest == k]
        if len(mine):
            mean = mine.mean(axis=0)
            mean /= np.linalg.norm(mean)
            moved = decay * codes[k] + (1 - decay) * mean
            new[k] = moved / np.linalg.norm(moved)
    return new


def test_ema_update_matches_the_formula_and_unused_codes_keep_their_value():
    g = torch.Generator().manual_seed(0)
    codes = l2norm(torch.randn(10, 4, generator=g))
    codes[7] = l2norm(torch.tensor([-1.0, -1.0, -1.0, -1.0]))  # far from every vector below
    vectors = torch.rand(50, 4, generator=g) + 0.1  # all in the positive orthant
    vq = _initialised(codes, decay=0.9)
    codes = vq.embedding.weight.clone()
    _, _, ids = vq(vectors)
    want = _ema_by_hand(codes.numpy(), vectors.numpy(), 0.9)
    got = vq.embedding.weight.detach()
    assert np.allclose(got.numpy(), want, atol=1e-6)
    unused = sorted(set(range(10)) - set(ids.tolist()))
    assert 7 in unused and len(unused) >= 2
    for k in unused:
        assert torch.equal(got[k], codes[k]), k  # bit for bit, not just close
    counts = np.bincount(ids.numpy(), minlength=10)
    assert np.allclose(vq.cluster_size.numpy(), 0.1 * counts)  # EMA from zero


def test_deferred_update_equals_one_update_of_the_whole_step():
    g = torch.Generator().manual_seed(1)
    codes = l2norm(torch.randn(6, 5, generator=g))
    vectors = torch.randn(40, 5, generator=g)
    whole = _initialised(codes)
    whole(vectors)  # update in the forward, as the original
    parts = _initialised(codes, update_in_forward=False)
    start = parts.embedding.weight.clone()
    _, _, first = parts(vectors[:15])
    assert torch.equal(parts.embedding.weight, start)  # nothing moves between micro-batches
    _, _, second = parts(vectors[15:])
    counts = parts.update()
    assert torch.allclose(parts.embedding.weight, whole.embedding.weight, atol=1e-6)
    assert torch.allclose(parts.cluster_size, whole.cluster_size, atol=1e-6)
    assert torch.equal(counts, torch.bincount(torch.cat([first, second]), minlength=6).float())
    before = parts.embedding.weight.clone()
    parts.update()  # nothing recorded since: no code received anything
    assert torch.equal(parts.embedding.weight, before)


def test_kmeans_initialisation_runs_once():
    g = torch.Generator().manual_seed(2)
    centres = l2norm(torch.randn(4, 6, generator=g))
    first = l2norm(centres[torch.randint(4, (400,), generator=g)]
                   + 0.05 * torch.randn(400, 6, generator=g))
    vq = VectorQuantizer(4, 6, update_in_forward=False).train()
    vq(first)
    assert vq.embedding.initted.item() == 1
    initial = vq.embedding.weight.clone()
    assert (initial @ centres.t()).max(dim=0).values.min() > 0.98  # one code per cluster
    assert vq.embedding.cluster_size.sum() == 400
    vq.update()
    after_first = vq.embedding.weight.clone()
    # A second batch, all near one new direction: k-means would put a code on it; the
    # EMA only moves the nearest code 1 % of the way.
    other = l2norm(torch.randn(1, 6, generator=g)) + 0.01 * torch.randn(300, 6, generator=g)
    vq(other)
    vq.update()
    want = _ema_by_hand(after_first.numpy(), other.numpy(), 0.99)
    assert np.allclose(vq.embedding.weight.numpy(), want, atol=1e-6)
    assert vq.embedding.cluster_size.sum() == 400  # the k-means statistics are kept


def test_eval_mode_records_nothing():
    vq = _initialised(torch.randn(5, 3), update_in_forward=False).eval()
    vq(torch.randn(20, 3))
    vq.train()
    assert torch.equal(vq.update(), torch.zeros(5))


def test_perplexity():
    assert code_perplexity(torch.tensor([5.0, 5.0, 5.0, 5.0])) == pytest.approx(4.0)
    assert code_perplexity(torch.tensor([0.0, 9.0, 0.0])) == pytest.approx(1.0)
    p = np.array([1, 3]) / 4
    assert code_perplexity(torch.tensor([1.0, 3.0, 0.0])) == pytest.approx(
        math.exp(-(p * np.log(p)).sum()))
    assert code_perplexity(torch.zeros(3)) == 0.0


def test_restart_sets_dead_codes_to_recent_vectors_only():
    g = torch.Generator().manual_seed(3)
    codes = l2norm(torch.randn(8, 4, generator=g))
    vq = _initialised(codes, update_in_forward=False)
    vectors = torch.randn(30, 4, generator=g)
    vq(vectors)
    vq.update()
    moved = vq.embedding.weight.clone()
    dead = torch.zeros(8, dtype=torch.bool)
    dead[[2, 5]] = True
    assert vq.restart_codes(dead, seed=0) == 2
    weight = vq.embedding.weight
    assert torch.equal(weight[~dead], moved[~dead])
    match = (weight[dead] @ l2norm(vectors).t()).max(dim=1)
    assert torch.allclose(match.values, torch.ones(2), atol=1e-6)  # each is a recent vector
    assert match.indices[0] != match.indices[1]
    again = _initialised(codes, update_in_forward=False)
    again(vectors)
    again.update()
    again.restart_codes(dead, seed=0)
    assert torch.equal(again.embedding.weight, weight)  # deterministic from the seed
    assert vq.restart_codes(torch.zeros(8, dtype=torch.bool), seed=0) == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_equal_one_rank(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node",
         "2", "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
         str(ROOT / "tests" / "dist_quantizer_worker.py"), str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]

    torch.manual_seed(7)  # yet another random start: k-means replaces it
    single = VectorQuantizer(worker.CODES, worker.DIM, decay=0.9,
                             update_in_forward=False).train()
    batches = worker.batches()
    for step, batch in enumerate(batches):
        single(batch)
        counts = single.update()
        for r in range(2):
            assert torch.equal(ranks[r]["counts"][step], counts)
            for key, value in single.state_dict().items():
                assert torch.allclose(ranks[r]["steps"][step][key], value, atol=1e-6), key
        for key, value in ranks[0]["steps"][step].items():  # the ranks agree exactly
            assert torch.equal(ranks[1]["steps"][step][key], value), key
    assert counts.eq(0).any()  # some codes got nothing (and kept their value, as above)

    assert ranks[0]["restarted"] == ranks[1]["restarted"] == len(worker.DEAD)
    for key, value in ranks[0]["after_restart"].items():
        assert torch.equal(ranks[1]["after_restart"][key], value), key
    restarted = ranks[0]["after_restart"]["embedding.weight"][list(worker.DEAD)]
    similarity = restarted @ l2norm(batches[-1]).t()  # offered by either rank
    assert torch.allclose(similarity.max(dim=1).values, torch.ones(2), atol=1e-6)
