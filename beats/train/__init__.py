"""Training BEATs: fine-tuning, self-supervised pre-training and tokenizer distillation.

Everything here builds on the inference package (`beats.model`, `beats.encoder`, ...)
without changing its layers; nothing in ``beats`` outside this subpackage imports it.
`beats.train.loop.fit` is the one training loop; tasks plug into it (see its docstring).
"""

from .config import TrainConfig
from .data import Clip, ClipDataset
from .distill import DistillConfig, DistillResult, distill
from .finetune import FinetuneConfig, FinetuneResult, LabelledClips, finetune
from .loop import FitResult, RunError, Task, TrainingError, fit

__all__ = [
    "Clip",
    "ClipDataset",
    "DistillConfig",
    "DistillResult",
    "FinetuneConfig",
    "FinetuneResult",
    "FitResult",
    "LabelledClips",
    "RunError",
    "Task",
    "TrainConfig",
    "TrainingError",
    "distill",
    "finetune",
    "fit",
]
