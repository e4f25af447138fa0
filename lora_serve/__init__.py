"""Serve one base model with many LoRA adapters in mixed batches from one paged memory pool."""

from .adapter_store import AdapterError
from .async_engine import AsyncEngine, EngineDeadError
from .config import EngineConfig
from .engine import AdapterInfo, AdapterInUseError, Engine, EngineStats
from .engine_process import EngineProcess
from .pool import PoolStats
from .request import Completion, FinishReason, RequestOutput
from .sampling import SamplingParams

__all__ = [
    "AdapterError",
    "AdapterInUseError",
    "AdapterInfo",
    "AsyncEngine",
    "Completion",
    "Engine",
    "EngineConfig",
    "EngineDeadError",
    "EngineProcess",
    "EngineStats",
    "FinishReason",
    "PoolStats",
    "RequestOutput",
    "SamplingParams",
]
