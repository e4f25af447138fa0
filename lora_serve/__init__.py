"""Serve one base model with many LoRA adapters in mixed batches from one paged memory pool."""

from .adapter_store import AdapterError
from .config import EngineConfig
from .engine import AdapterInfo, AdapterInUseError, Engine
from .pool import PoolStats
from .request import Completion, FinishReason, RequestOutput
from .sampling import SamplingParams

__all__ = [
    "AdapterError",
    "AdapterInUseError",
    "AdapterInfo",
    "Completion",
    "Engine",
    "EngineConfig",
    "FinishReason",
    "PoolStats",
    "RequestOutput",
    "SamplingParams",
]
