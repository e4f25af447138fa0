"""Batched multi-LoRA linear layers: one mixed batch of rows, each row with its own adapter (or none).

``BatchedLoRALinear`` wraps a base ``nn.Linear`` in place and owns that layer's ``kernels.PagedLoRA`` (the
page tables of the resident adapters that adapt it). Its forward reads the running step's LoRA segments
(``StepBatch.lora``, built once per step by the engine) from the engine's ``ActiveStep`` and hands them to
``kernels.add_lora``, which picks the backend: Triton on GPU (one shrink and one expand launch for the
whole batch), the per-segment torch implementation on CPU. An adapter that does not touch this layer keeps
rank 0 here and adds nothing. Compressed adapters (shared bases + per-adapter cores, ``shared_lora.py``)
live in the wrapper's ``shared`` tables, set up when the first of them targets the layer.
"""

from __future__ import annotations

from torch import nn

from kernels.lora import PagedLoRA, add_lora

from .shared_lora import SharedLoRA
from .step_batch import ActiveStep


class BatchedLoRALinear(nn.Module):
    """``y = base(x) + scale[a] * (x A_a^T) B_a^T`` per row, with ``a`` the row's resident adapter index."""

    def __init__(self, base: nn.Linear, active: ActiveStep, lora: PagedLoRA):
        super().__init__()
        self.base = base
        self.active = active
        self.lora = lora
        self.shared: SharedLoRA | None = None  # compressed adapters' tables, once one targets this layer

    def forward(self, x):
        y = self.base(x)
        step = self.active.batch
        if step is None or step.lora is None:
            return y
        rows_out, rows_in = y.view(-1, y.shape[-1]), x.reshape(-1, x.shape[-1])
        if self.lora.num_set:
            add_lora(rows_out, rows_in, self.lora, step.lora)
        if self.shared is not None and self.shared.num_set:
            self.shared.apply(rows_out, rows_in, step.lora)
        return y


def wrap_linear(model: nn.Module, name: str, active: ActiveStep, pool, capacity: int) -> BatchedLoRALinear:
    """Replace ``model``'s linear ``name`` by a ``BatchedLoRALinear`` around it (idempotent); return the wrapper."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    module = getattr(parent, child)
    if isinstance(module, BatchedLoRALinear):
        return module
    if not isinstance(module, nn.Linear):
        raise TypeError(f"{name} is a {type(module).__name__}, expected nn.Linear")
    lora = PagedLoRA(pool, module.in_features, module.out_features, capacity)
    wrapper = BatchedLoRALinear(module, active, lora)
    setattr(parent, child, wrapper)
    return wrapper
