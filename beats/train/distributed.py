"""Processes under ``torchrun``: set-up, reductions, gradient sync and FSDP2 sharding.

Data parallelism here is explicit: every process runs the task's forward/backward on its
share of the step, then `sync_gradients` sums the gradients over processes (one flat
all-reduce per bucket). The task may call any method of its model (``forward_fbank``,
a predictor, a teacher), layers skipped by layerdrop simply contribute zeros, and
because each loss is divided by the GLOBAL count of loss terms, the summed gradient is
the one a single process would compute on the whole step. With ``--fsdp`` every encoder
layer and the model are sharded with FSDP2 ``fully_shard``; its reduce-scatter averages,
so the loop multiplies the loss by the world size (gloo has no pre-multiplied sum that
a divide factor of 1 would need).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from ..devices import pick_device

BUCKET_BYTES = 32 * 2**20


@dataclass
class Dist:
    """This process's place: ``rank`` of ``world`` processes, its ``device``."""

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    started_here: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup(device: str = "auto") -> Dist:
    """Join the process group that ``torchrun`` describes (gloo on CPU, nccl on CUDA)."""
    dev = pick_device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if dist.is_available() and dist.is_initialized():
        return Dist(dist.get_rank(), dist.get_world_size(), dev)
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Dist(0, 1, dev)
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), dev, started_here=True)


def teardown(d: Dist) -> None:
    if d.started_here and dist.is_initialized():
        dist.destroy_process_group()


def all_sum(x: torch.Tensor, d: Dist) -> torch.Tensor:
    """Sum of ``x`` over processes (a copy; ``x`` itself when alone)."""
    if d.world == 1:
        return x
    x = x.clone()
    dist.all_reduce(x)
    return x


def barrier(d: Dist) -> None:
    if d.world > 1:
        dist.barrier()


def broadcast_object(obj: object, d: Dist) -> object:
    """Rank 0's ``obj`` on every process."""
    if d.world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj: object, d: Dist) -> list[object]:
    """Every process's ``obj``, in rank order, on every process."""
    if d.world == 1:
        return [obj]
    out: list[object] = [None] * d.world
    dist.all_gather_object(out, obj)
    return out


def sync_gradients(params: list[nn.Parameter], d: Dist) -> None:
    """Sum gradients over processes, in buckets; a missing gradient counts as zeros.

    A parameter that got no gradient on any process keeps none (as alone: AdamW then
    leaves it untouched rather than decaying it).
    """
    if d.world == 1:
        return
    if not params:
        return
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.float32,
                       device=params[0].device)
    dist.all_reduce(has)
    params = [p for p, h in zip(params, has.tolist(), strict=True) if h > 0]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    bucket: list[torch.Tensor] = []
    size = 0
    for p in params:
        bucket.append(p.grad)
        size += p.grad.numel() * p.grad.element_size()
        if size >= BUCKET_BYTES:
            _reduce_bucket(bucket)
            bucket, size = [], 0
    if bucket:
        _reduce_bucket(bucket)


def _reduce_bucket(grads: list[torch.Tensor]) -> None:
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def shard(model: nn.Module, layers: list[nn.Module], dtype: torch.dtype | None = None) -> None:
    """FSDP2: ``fully_shard`` each of ``layers`` and then ``model`` (in place).

    FSDP averages the gradients over processes; the loop scales the loss by the world
    size to make that the sum. ``dtype``: compute dtype of the sharded parameters (None:
    autocast decides).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    for layer in layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)


def register_methods(model: nn.Module, names: list[str]) -> None:
    """Let FSDP2 gather parameters for methods other than ``forward`` (``forward_fbank``)."""
    from torch.distributed.fsdp import register_fsdp_forward_method

    for name in names:
        if hasattr(model, name):
            register_fsdp_forward_method(model, name)


def set_gradient_sync(model: nn.Module, enabled: bool) -> None:
    """FSDP2: skip the reduce-scatter on all micro-batches but a step's last."""
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(enabled)
