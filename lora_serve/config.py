"""Engine options, validated with errors that name the bad value."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class EngineConfig:
    """Options of a ``lora_serve.Engine``.

    The pool is sized either in slots (``pool_slots``; one slot = one hidden-size vector) or in MiB
    (``pool_mb``). ``max_batch_tokens`` bounds the tokens one step processes (decodes count one each,
    long prompts are split into chunks); ``max_batch_size`` bounds the running requests;
    ``max_resident_adapters`` bounds how many adapters sit in the pool at once (it sizes the LoRA page
    tables). ``adapter_host_mb`` caps the host memory of all registered adapters' weights (adapters with
    identical files are stored once; None: no cap). ``dtype`` / ``device`` default to the given model's, or float32 on CPU for a path.
    """

    pool_slots: int | None = None
    pool_mb: float = 1024.0
    max_batch_tokens: int = 1024
    max_batch_size: int = 64
    max_resident_adapters: int = 64
    adapter_host_mb: float | None = 8192.0
    dtype: torch.dtype | None = None
    device: str | torch.device | None = None

    def __post_init__(self):
        if self.pool_slots is not None and (not isinstance(self.pool_slots, int) or self.pool_slots < 1):
            raise ValueError(f"pool_slots must be a positive integer or None, got {self.pool_slots!r}")
        if not self.pool_mb > 0:
            raise ValueError(f"pool_mb must be positive, got {self.pool_mb!r}")
        for name in ("max_batch_tokens", "max_batch_size", "max_resident_adapters"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.adapter_host_mb is not None and not self.adapter_host_mb > 0:
            raise ValueError(f"adapter_host_mb must be positive or None, got {self.adapter_host_mb!r}")
        if self.dtype is not None and not (isinstance(self.dtype, torch.dtype) and self.dtype.is_floating_point):
            raise ValueError(f"dtype must be a floating torch.dtype or None, got {self.dtype!r}")

    def num_slots(self, slot_width: int, dtype: torch.dtype) -> int:
        """Pool size in slots: ``pool_slots`` if given, else as many as fit in ``pool_mb``."""
        if self.pool_slots is not None:
            return self.pool_slots
        bytes_per_slot = slot_width * torch.finfo(dtype).bits // 8
        return max(1, int(self.pool_mb * 2**20) // bytes_per_slot)
