"""Training BEATs: fine-tuning, self-supervised pre-training, tokenizer distillation and
the whole iteration.

Everything here builds on the inference package (`beats.model`, `beats.encoder`, ...)
without changing its layers; nothing in ``beats`` outside this subpackage imports it.
`beats.train.loop.fit` is the one training loop; tasks plug into it (see its docstring).
"""

from .config import TrainConfig
from .data import Clip, ClipDataset
from .distill import DistillConfig, DistillResult, distill
from .finetune import FinetuneConfig, FinetuneResult, LabelledClips, finetune
from .iterate import IterateConfig, IterateResult, iterate
from .loop import FitResult, RunError, Task, TrainingError, fit
from .pretrain import PretrainConfig, PretrainResult, pretrain

__all__ = [
    "Clip",
    "ClipDataset",
    "DistillConfig",
    "DistillResult",
    "FinetuneConfig",
    "FinetuneResult",
    "FitResult",
    "IterateConfig",
    "IterateResult",
    "LabelledClips",
    "PretrainConfig",
    "PretrainResult",
    "RunError",
    "Task",
    "TrainConfig",
    "TrainingError",
    "distill",
    "finetune",
    "fit",
    "iterate",
    "pretrain",
]
