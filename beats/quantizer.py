"""The BEATs tokenizer's vector quantiser: cosine codebook with EMA updates (see
docs/design/architecture.md, Acoustic tokenizer).

Inference is a nearest-code lookup. Training (docs/design/training.md, Tokenizer
distillation) follows Microsoft's ``NormEMAVectorQuantizer``: codes and inputs are unit
vectors; the codebook is not trained by gradients but moved by an exponential moving
average of the vectors assigned to each code, with the statistics summed over every
distributed rank (so every rank holds the same codebook, equal to one process seeing the
whole batch); a codebook whose ``initted`` flag is 0 is first set by spherical k-means on
the first training batch.

Distributed k-means: every rank's vectors of that first batch are gathered (in rank order,
so 2 ranks see exactly what 1 rank seeing both halves sees); rank 0 runs k-means with its
own seeded generator (the training RNG is not consumed) and broadcasts the codes.

Key meanings, as in Microsoft's files: ``quantize.embedding.weight`` the codes,
``quantize.embedding.cluster_size`` the cluster sizes found by the k-means initialisation,
``quantize.embedding.embed_avg`` unused by the normalised-EMA update (Microsoft's stays
at its construction value; here it is set to the codes at initialisation),
``quantize.embedding.initted`` 1 once initialised, ``quantize.cluster_size`` the EMA
(decay ``decay``) of how many vectors each code received per update.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def l2norm(x: torch.Tensor) -> torch.Tensor:
    """Unit-length rows along the last axis."""
    return F.normalize(x, p=2.0, dim=-1)


def _world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Every rank's rows (M_r, D) concatenated in rank order; x itself without a group."""
    _, world = _world()
    if world == 1:
        return x
    size = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    counts = [int(s) for s in sizes]
    padded = x.new_zeros(max(counts), x.shape[1])
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:n] for p, n in zip(parts, counts, strict=True)])


def code_perplexity(counts: torch.Tensor) -> float:
    """exp(entropy) of the code distribution with per-code counts (K,); 0.0 when empty.

    K when every code is used equally, 1 when one code takes everything.
    """
    total = counts.double().sum()
    if total <= 0:
        return 0.0
    p = counts.double()[counts > 0] / total
    return float(torch.exp(-(p * p.log()).sum()))


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

    Eval mode is a pure lookup: nothing changes. In training mode each forward records the
    batch's per-code counts and vector sums; `update` sums them over ranks and moves each
    code that received vectors to ``normalise(decay * code + (1 - decay) * normalise(mean))``
    (codes that received nothing keep their value exactly). With ``update_in_forward``
    (the original's behaviour) the forward calls `update` itself; without it the owner
    calls `update` once per optimiser step, after any number of forwards (micro-batches).
    A codebook whose ``initted`` flag is 0 is first set by spherical k-means
    (``kmeans_iters`` iterations, k-means++ seeds drawn from ``seed``) on the first batch.

    Args:
        num_tokens, dim: codebook size K and code width D.
        decay: EMA decay (0.99 in the original).
        beta: commitment weight (1.0 in the original; ESPnet uses 10).
    """

    def __init__(self, num_tokens: int, dim: int, *, decay: float = 0.99, beta: float = 1.0,
                 kmeans_iters: int = 10, update_in_forward: bool = True, seed: int = 0) -> None:
        super().__init__()
        self.num_tokens = num_tokens
        self.dim = dim
        self.decay = decay
        self.beta = beta
        self.kmeans_iters = kmeans_iters
        self.update_in_forward = update_in_forward
        self.seed = seed
        self.embedding = Codebook(num_tokens, dim)
        self.register_buffer("cluster_size", torch.zeros(num_tokens))
        # Transient training state, never saved: the statistics recorded since the last
        # update, (K, D + 1) vector sums and counts, and the unit vectors recorded since
        # the last update (M, D), the candidates for restarting unused codes.
        self._pending: torch.Tensor | None = None
        self._recent: torch.Tensor | None = None

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
        gradient to l2norm(z), loss ``beta * mse(z_q, l2norm(z))`` (the commitment term,
        averaged over every element), ids (...) int64. Under a process group every rank
        must call it in training mode the same number of times (it may communicate).
        """
        zn = l2norm(z)
        flat = zn.detach().float().reshape(-1, self.dim)
        if self.training and not bool(self.embedding.initted.item()):
            self.init_from_data(flat)
        ids = self.lookup(zn)
        z_q = F.embedding(ids, self.embedding.weight).to(zn.dtype)
        if self.training:
            self.record(flat, ids.reshape(-1))
            if self.update_in_forward:
                self.update()
        loss = self.beta * F.mse_loss(z_q.detach(), zn)
        return zn + (z_q - zn).detach(), loss, ids

    @torch.no_grad()
    def record(self, flat: torch.Tensor, ids: torch.Tensor) -> None:
        """Add unit vectors (M, D) assigned to codes ``ids`` (M,) to the pending statistics."""
        rows = torch.cat([flat.float(), flat.new_ones(flat.shape[0], 1, dtype=torch.float32)], 1)
        stats = rows.new_zeros(self.num_tokens, self.dim + 1).index_add_(0, ids, rows)
        first = self._pending is None  # the first record since the last update
        self._pending = stats if first else self._pending + stats
        recent = flat.float()
        self._recent = recent if first or self._recent is None else torch.cat([self._recent,
                                                                                recent])

    @torch.no_grad()
    def update(self) -> torch.Tensor:
        """Apply one EMA step with everything recorded since the last one, summed over ranks.

        Every rank of a process group must call it together (one all-reduce). Returns the
        global per-code counts (K,) float32 of the step.
        """
        weight = self.embedding.weight
        stats = self._pending
        if stats is None:  # nothing recorded here (other ranks may have)
            stats = torch.zeros(self.num_tokens, self.dim + 1, device=weight.device)
        self._pending = None
        if _world()[1] > 1:
            dist.all_reduce(stats)
        sums, counts = stats[:, : self.dim], stats[:, self.dim]
        decay = self.decay
        self.cluster_size.mul_(decay).add_(counts, alpha=1 - decay)
        empty = (counts == 0).unsqueeze(1)
        means = l2norm(sums / counts.clamp(min=1.0).unsqueeze(1)).to(weight.dtype)
        moved = l2norm(weight * decay + means * (1 - decay))
        weight.copy_(torch.where(empty, weight, moved))
        return counts

    def discard_pending(self) -> None:
        """Forget what was recorded since the last update without applying it: after a
        skipped step, or before a step (so that `restart_codes` draws from that step's
        vectors only, whatever happened before: a resumed run then restarts the same)."""
        self._pending = None
        self._recent = None

    @torch.no_grad()
    def restart_codes(self, dead: torch.Tensor, seed: int) -> int:
        """Set the codes where ``dead`` (K,) bool to vectors recorded since the last update
        (those of the last step, call it right after `update`).

        Every rank's recorded vectors are gathered in rank order and the new codes drawn
        from them with a generator seeded from ``seed``: every rank sets the same codes,
        the same ones that one process recording all the vectors would set. Every rank
        must call it with the same ``dead`` and ``seed``. Returns the number of codes
        restarted (0 without recorded vectors).
        """
        n = int(dead.sum())
        if n == 0:
            return 0
        weight = self.embedding.weight
        recent = self._recent
        if recent is None:
            recent = torch.zeros(0, self.dim, device=weight.device)
        pool = _gather_rows(recent.float())
        if pool.shape[0] == 0:
            return 0
        chosen = pool[_draw(pool.shape[0], n, torch.Generator().manual_seed(seed)).to(pool.device)]
        weight[dead.to(weight.device)] = l2norm(chosen).to(weight.dtype)
        return n

    def _kmeans_pp_seeds(self, flat: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """k-means++ seeding: each next seed drawn in proportion to its squared distance
        from the nearest seed so far, so that separate clusters get separate seeds."""
        first = int(torch.randint(flat.shape[0], (1,), generator=generator))
        seeds = [flat[first : first + 1]]
        nearest = (flat - seeds[0]).pow(2).sum(dim=1)
        for _ in range(1, self.num_tokens):
            weights = nearest if nearest.sum() > 0 else torch.ones_like(nearest)
            index = int(torch.multinomial(weights.cpu(), 1, generator=generator))
            seed = flat[index : index + 1]
            seeds.append(seed)
            nearest = torch.minimum(nearest, (flat - seed).pow(2).sum(dim=1))
        return torch.cat(seeds).clone()

    def _kmeans(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Spherical k-means on unit vectors (M, D) -> (codes (K, D), last counts (K,))."""
        generator = torch.Generator().manual_seed(self.seed)
        means = self._kmeans_pp_seeds(flat, generator)
        counts = torch.zeros(self.num_tokens, device=flat.device)
        for _ in range(self.kmeans_iters):
            assign = (flat @ means.t()).argmax(dim=1)
            counts = torch.bincount(assign, minlength=self.num_tokens).to(flat.dtype)
            sums = torch.zeros_like(means).index_add_(0, assign, flat)
            means = torch.where(counts.unsqueeze(1) > 0, l2norm(sums), means)
        return means, counts

    @torch.no_grad()
    def init_from_data(self, flat: torch.Tensor) -> None:
        """Spherical k-means on unit vectors (M, D) to set the codebook; marks it initted.

        Under a process group, every rank must call it together: the vectors of all ranks
        are gathered, rank 0 runs k-means and broadcasts the codes.
        """
        rank, world = _world()
        flat = _gather_rows(flat.float())
        if flat.shape[0] == 0:
            raise ValueError("cannot initialise the codebook from an empty batch")
        if rank == 0:
            means, counts = self._kmeans(flat)
        else:
            means = flat.new_empty(self.num_tokens, self.dim)
            counts = flat.new_empty(self.num_tokens)
        if world > 1:
            dist.broadcast(means, 0)
            dist.broadcast(counts, 0)
        self.embedding.weight.copy_(means)
        self.embedding.embed_avg.copy_(means)
        self.embedding.cluster_size.copy_(counts)
        self.embedding.initted.fill_(1.0)


def _draw(population: int, n: int, generator: torch.Generator) -> torch.Tensor:
    """n indices into range(population): distinct when population >= n, else repeating."""
    if population >= n:
        return torch.randperm(population, generator=generator)[:n]
    return torch.randint(population, (n,), generator=generator)
