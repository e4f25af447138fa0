"""FP8 training memory savers after COAT: FP8 AdamW states and FP8 activation compression."""

from .optim import FP8AdamW

__all__ = ["FP8AdamW"]
