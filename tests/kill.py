"""Kill a training command the moment its first checkpoint is on disk (for resume tests)."""

from __future__ import annotations

import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

import torch


def kill_at_checkpoint(args: list[str], env: Mapping[str, str], checkpoint: Path,
                       timeout: float = 300.0) -> int:
    """Run ``python -m beats ARGS``, SIGKILL it as soon as ``checkpoint`` (a training-state
    file) exists, and return the step that checkpoint holds. Fails if the run ended first
    without writing it (its stderr in the message)."""
    with tempfile.TemporaryFile("w+") as err:  # a file: a full pipe could stall the run
        run = subprocess.Popen([sys.executable, "-m", "beats", *args], env=dict(env),
                               stdout=subprocess.DEVNULL, stderr=err, text=True)
        deadline = time.monotonic() + timeout
        while not checkpoint.exists() and time.monotonic() < deadline and run.poll() is None:
            time.sleep(0.01)
        run.send_signal(signal.SIGKILL)
        run.wait()
        err.seek(0)
        assert checkpoint.exists(), f"no checkpoint before the run ended: {err.read()[-2000:]}"
    return torch.load(checkpoint, weights_only=True)["loop"]["step"]
