"""One rank of `test_quantizer_training.py::test_two_ranks_equal_one_rank` (run by torchrun).

Each rank quantises its share of two fixed batches (rank 0 the first `SPLIT` vectors,
rank 1 the rest, so the shares differ in size), then restarts two codes, and saves its
codebook after each step to OUT/rank{R}.pt.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from beats.quantizer import VectorQuantizer, l2norm

CODES, DIM, SPLIT = 8, 6, 30
DEAD = (1, 4)  # the codes restarted at the end


def batches() -> list[torch.Tensor]:
    """Two steps of 80 vectors around 5 directions (so some of the 8 codes go unused)."""
    g = torch.Generator().manual_seed(0)
    centres = l2norm(torch.randn(5, DIM, generator=g))
    out = []
    for _ in range(2):
        which = torch.randint(5, (80,), generator=g)
        out.append(centres[which] + 0.1 * torch.randn(80, DIM, generator=g))
    return out


def snapshot(vq: VectorQuantizer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in vq.state_dict().items()}


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(100 + rank)  # each rank starts from other random codes
    vq = VectorQuantizer(CODES, DIM, decay=0.9, update_in_forward=False).train()
    steps, counts = [], []
    for batch in batches():
        vq(batch[:SPLIT] if rank == 0 else batch[SPLIT:])
        counts.append(vq.update())
        steps.append(snapshot(vq))
    dead = torch.zeros(CODES, dtype=torch.bool)
    dead[list(DEAD)] = True
    restarted = vq.restart_codes(dead, seed=3)
    torch.save({"steps": steps, "counts": counts, "restarted": restarted,
                "after_restart": snapshot(vq)}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
