"""The loop's per-step task hooks (`before_step`, `after_step`'s logged numbers,
`discard_step` on a float16 step skipped by loss scaling), with a tiny real task."""

from __future__ import annotations

import json

import numpy as np
import torch
from torch import nn

from beats.train.config import TrainConfig
from beats.train.data import Clip, ClipDataset, collate_clips
from beats.train.loop import Task, fit

OVERFLOW_STEP = 2  # this step's gradient overflows float16 loss scaling (finite loss)


class HookTask(Task):
    """w * mean(wav)^2 per clip; records the hooks it sees."""

    name = "hooks"

    def __init__(self) -> None:
        rng = np.random.default_rng(0)
        clips = [Clip(rng.uniform(-0.5, 0.5, 4000).astype(np.float32)) for _ in range(6)]
        self.model = nn.Linear(1, 1, bias=False)
        nn.init.constant_(self.model.weight, 0.5)
        self.train_set = ClipDataset(clips)
        self.calls: list[tuple[str, int, object]] = []
        self.step = -1

    def collate(self, items):
        return collate_clips(items)

    def before_step(self, step, micro):
        self.step = step
        self.calls.append(("before", step, [b["count"] for b in micro]))

    def forward_loss(self, batch, denominator):
        with torch.autocast("cpu", enabled=False):
            x = batch["wav"].float().mean(dim=1, keepdim=True)
            loss = (self.model(x) ** 2).sum() / denominator
            if self.step == OVERFLOW_STEP:
                # a finite loss whose scaled gradient (1e34 x 65536) overflows float32
                loss = loss + self.model.weight.sum() * 1e34 * batch["count"] / denominator
        return loss, {}

    def after_step(self, step):
        self.calls.append(("after", step, None))
        return {"usage": float(step + 1)}

    def discard_step(self, step):
        self.calls.append(("discard", step, None))


def test_hooks_run_every_step_and_after_step_numbers_are_logged(tmp_path):
    task = HookTask()
    cfg = TrainConfig(steps=5, batch_size=3, micro_batch=2, num_workers=0, log_every=2,
                      quiet=True, dtype="float16", lr=1e-3, warmup_steps=1)
    result = fit(task, cfg, tmp_path)
    assert result.steps == 5
    ends = [(kind, step) for kind, step, _ in task.calls if kind != "before"]
    assert ends == [("after", 0), ("after", 1), ("discard", OVERFLOW_STEP), ("after", 3),
                    ("after", 4)]
    # every step first hands over its micro-batches (2 + 1 clips of 3)
    assert [c for c in task.calls if c[0] == "before"] == [("before", s, [2, 1])
                                                           for s in range(5)]
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 4, 5]
    # the window's mean of what after_step returned; the skipped step adds nothing
    assert [x["usage"] for x in lines] == [1.0, 2.0, 4.0, 5.0]
    assert lines[2]["grad_norm"] is not None  # step 4 stepped (the window's last step)
