"""Drop-in Mixture-of-Experts layers and training plugins for Hugging Face models."""

from .balance import RouterStats, load_balancing_loss, router_z_loss, sequence_load_balancing_loss
from .config import MoEConfig
from .controller import BalanceController
from .fp8 import FP8AdamW, compress_activations
from .hf import SUPPORTED_FAMILIES, PatchReport, patch_model, router_stats, unpatch_model
from .layer import MoELayer
from .router import Routing, route
from .upcycle import upcycle

__all__ = [
    "BalanceController", "FP8AdamW", "MoEConfig", "MoELayer", "PatchReport", "RouterStats", "Routing", "SUPPORTED_FAMILIES",
    "compress_activations", "load_balancing_loss", "patch_model", "route", "router_stats", "router_z_loss",
    "sequence_load_balancing_loss", "unpatch_model", "upcycle",
]
