"""Set-up for DataLoader worker processes (audio reading in ``extract`` and training).

`worker_init` makes each worker die with its parent: DataLoader workers only notice a
dead parent when they next wait for work, so after a SIGKILL of the main process they
could live on for minutes holding their memory. On Linux the kernel delivers SIGKILL to
the worker the moment its parent exits (``PR_SET_PDEATHSIG``); elsewhere this is a no-op.
Workers also run torch single-threaded: they decode and resample, and several of them
each spawning a full thread pool would starve the model's own threads. And they ignore
SIGINT: Ctrl-C in a terminal reaches every process of the job, and a worker that stops on
its own mid-batch can block at exit on results nobody reads; the main process handles
Ctrl-C and shuts its workers down.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

import torch

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> bool:
    """Ask the kernel to SIGKILL this process when its parent exits; True if armed."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    # The parent may have died before prctl took effect: then we were re-parented already.
    if os.getppid() == 1:
        os._exit(1)
    return True


def worker_init(worker_id: int) -> None:
    """``DataLoader(worker_init_fn=worker_init)``: die with the parent, ignore Ctrl-C, one
    torch thread."""
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)
