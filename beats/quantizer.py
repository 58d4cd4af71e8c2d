"""The BEATs tokenizer's vector quantiser: cosine codebook with EMA updates (spec section 11)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def l2norm(x: torch.Tensor) -> torch.Tensor:
    """Unit-length rows along the last axis."""
    return F.normalize(x, p=2.0, dim=-1)


class Codebook(nn.Module):
    """The codebook and its EMA statistics; keys match Microsoft's ``quantize.embedding.*``.

    ``weight`` (K, D) holds unit-length codes and is not trained by gradients.
    ``cluster_size``, ``embed_avg`` and ``initted`` are training statistics: loaded and
    saved, never used for lookup.
    """

    def __init__(self, num_tokens: int, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(l2norm(torch.randn(num_tokens, dim)), requires_grad=False)
        self.register_buffer("cluster_size", torch.zeros(num_tokens))
        self.register_buffer("embed_avg", self.weight.detach().clone())
        self.register_buffer("initted", torch.zeros(1))


class VectorQuantizer(nn.Module):
    """Nearest-code quantiser over L2-normalised vectors, (..., D) -> token ids (...).

    Eval mode is a pure lookup: nothing changes. Training mode updates the codebook by
    exponential moving average like the original (``decay``), for users distilling their
    own tokenizer: each code moves toward the normalised mean of the vectors assigned to
    it and is renormalised; codes that received nothing keep their value. A codebook whose
    ``initted`` flag is 0 is first initialised by spherical k-means on the first batch.
    """

    def __init__(self, num_tokens: int, dim: int, *, decay: float = 0.99, beta: float = 1.0,
                 kmeans_iters: int = 10) -> None:
        super().__init__()
        self.num_tokens = num_tokens
        self.dim = dim
        self.decay = decay
        self.beta = beta
        self.kmeans_iters = kmeans_iters
        self.embedding = Codebook(num_tokens, dim)
        self.register_buffer("cluster_size", torch.zeros(num_tokens))

    def lookup(self, z: torch.Tensor) -> torch.Tensor:
        """Token ids (...,) int64: nearest code by squared Euclidean distance to l2norm(z)."""
        flat = l2norm(z.float()).reshape(-1, self.dim)
        codes = self.embedding.weight.float()
        distance = (
            flat.pow(2).sum(dim=1, keepdim=True)
            + codes.pow(2).sum(dim=1)
            - 2.0 * flat @ codes.t()
        )
        return distance.argmin(dim=1).view(z.shape[:-1])

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Quantise z (..., D).

        Returns ``(z_q, loss, ids)``: z_q (..., D) the chosen codes with a straight-through
        gradient to l2norm(z), loss ``beta * mse(z_q, l2norm(z))`` (the commitment term),
        ids (...) int64.
        """
        zn = l2norm(z)
        if self.training and not bool(self.embedding.initted.item()):
            self.init_from_data(zn.detach().reshape(-1, self.dim))
        ids = self.lookup(zn)
        z_q = F.embedding(ids, self.embedding.weight).to(zn.dtype)
        if self.training:
            self._ema_update(zn.detach().reshape(-1, self.dim), ids.reshape(-1))
        loss = self.beta * F.mse_loss(z_q.detach(), zn)
        return zn + (z_q - zn).detach(), loss, ids

    @torch.no_grad()
    def _ema_update(self, flat: torch.Tensor, ids: torch.Tensor) -> None:
        decay = self.decay
        onehot = F.one_hot(ids, self.num_tokens).to(flat.dtype)  # (M, K)
        counts = onehot.sum(dim=0)
        self.cluster_size.mul_(decay).add_(counts, alpha=1 - decay)
        empty = counts == 0
        means = l2norm((onehot.t() @ flat) / counts.masked_fill(empty, 1.0).unsqueeze(1))
        weight = self.embedding.weight
        target = torch.where(empty.unsqueeze(1), weight, means.to(weight.dtype))
        weight.mul_(decay).add_(target, alpha=1 - decay)
        weight.copy_(l2norm(weight))

    def _kmeans_pp_seeds(self, flat: torch.Tensor) -> torch.Tensor:
        """k-means++ seeding: each next seed drawn in proportion to its squared distance
        from the nearest seed so far, so that separate clusters get separate seeds."""
        seeds = [flat[torch.randint(flat.shape[0], (1,), device=flat.device)]]
        nearest = (flat - seeds[0]).pow(2).sum(dim=1)
        for _ in range(1, self.num_tokens):
            weights = nearest if nearest.sum() > 0 else torch.ones_like(nearest)
            seed = flat[torch.multinomial(weights, 1)]
            seeds.append(seed)
            nearest = torch.minimum(nearest, (flat - seed).pow(2).sum(dim=1))
        return torch.cat(seeds).clone()

    @torch.no_grad()
    def init_from_data(self, flat: torch.Tensor) -> None:
        """Spherical k-means on unit vectors (M, D) to set the codebook; marks it initted."""
        if flat.shape[0] == 0:
            raise ValueError("cannot initialise the codebook from an empty batch")
        means = self._kmeans_pp_seeds(flat)
        counts = torch.zeros(self.num_tokens, device=flat.device)
        for _ in range(self.kmeans_iters):
            assign = (flat @ means.t()).argmax(dim=1)
            onehot = F.one_hot(assign, self.num_tokens).to(flat.dtype)
            counts = onehot.sum(dim=0)
            sums = onehot.t() @ flat
            means = torch.where(counts.unsqueeze(1) > 0, l2norm(sums), means)
        self.embedding.weight.copy_(means)
        self.embedding.embed_avg.copy_(means)
        self.embedding.cluster_size.copy_(counts)
        self.embedding.initted.fill_(1.0)
