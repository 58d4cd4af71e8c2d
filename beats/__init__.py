"""BEATs audio embeddings: exact numerics, batch-invariant padding, safe loading."""

from .config import BEATsConfig
from .fbank import fbank
from .model import BEATs
from .model_output import BEATsOutput, patch_padding_mask
from .modules import GradMultiply, quant_noise
from .registry import available_models
from .tokenizer import BEATsTokenizer
from .windows import WindowedOutput, extract_windowed, iter_windowed

__all__ = [
    "BEATs",
    "BEATsConfig",
    "BEATsOutput",
    "BEATsTokenizer",
    "GradMultiply",
    "WindowedOutput",
    "available_models",
    "extract_windowed",
    "fbank",
    "iter_windowed",
    "patch_padding_mask",
    "quant_noise",
]
__version__ = "0.1.0"
