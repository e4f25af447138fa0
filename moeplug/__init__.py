"""Drop-in Mixture-of-Experts layers and training plugins for Hugging Face models.

``import moeplug`` loads neither Triton nor transformers' modeling code (which imports ``torch._dynamo`` and
with it Triton): ``patch_model`` and the other Hugging Face entry points load :mod:`moeplug.hf` on first
access.
"""

import importlib

from .balance import RouterStats, load_balancing_loss, router_z_loss, sequence_load_balancing_loss
from .config import MoEConfig
from .controller import BalanceController
from .fp8 import FP8AdamW, compress_activations
from .layer import MoELayer
from .router import Routing, route
from .state import MoEState, moe_modules, router_stats
from .upcycle import upcycle

_LAZY = {
    "SUPPORTED_FAMILIES": "hf", "PatchReport": "hf", "patch_model": "hf", "unpatch_model": "hf",
}

__all__ = [
    "BalanceController", "FP8AdamW", "MoEConfig", "MoELayer", "MoEState", "PatchReport", "RouterStats", "Routing",
    "SUPPORTED_FAMILIES", "compress_activations", "load_balancing_loss", "moe_modules", "patch_model", "route",
    "router_stats", "router_z_loss",
    "sequence_load_balancing_loss", "unpatch_model", "upcycle",
]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'moeplug' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value  # later lookups skip this hook
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
