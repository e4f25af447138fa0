"""FP8 training memory savers after COAT: FP8 AdamW states and FP8 activation compression."""

from .activations import ActivationCompressor, compress_activations, default_selection, with_attention
from .optim import FP8AdamW

__all__ = ["ActivationCompressor", "FP8AdamW", "compress_activations", "default_selection", "with_attention"]
