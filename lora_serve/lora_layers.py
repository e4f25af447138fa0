"""Batched multi-LoRA linear layers: one shrink and one expand call per layer per step for the whole batch.

``BatchedLoRALinear`` wraps a base ``nn.Linear`` in place. Each step the engine sets the packed batch's
per-row adapter ids (``LoRAContext.row_adapter``; -1 = base model) and every wrapper calls
``kernels.lora.lora_shrink`` / ``lora_expand`` once, whatever mix of adapters and ranks the batch has.
The wrapper owns the page tables of its layer: row ``m`` of ``a_table`` / ``b_table`` lists the pool
slots holding resident adapter ``m``'s A rank-rows and B^T rank-rows (layout in ``kernels/lora.py``).
An adapter that does not touch this layer keeps rank 0 here and adds nothing.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from kernels.lora import lora_expand, lora_shrink


class LoRAContext:
    """Per-step state shared by all wrappers of one engine: which adapter each packed row uses."""

    def __init__(self):
        self.row_adapter: torch.Tensor | None = None  # [T] int64, or None when no row uses an adapter


class BatchedLoRALinear(nn.Module):
    """``y = base(x) + scale[a] * (x A_a^T) B_a^T`` per row, with ``a`` the row's resident adapter index."""

    def __init__(self, base: nn.Linear, context: LoRAContext, pool: torch.Tensor, capacity: int):
        super().__init__()
        self.base = base
        self.context = context
        self.pool = pool
        width = pool.shape[1]
        self.chunks_in = math.ceil(base.in_features / width)
        self.chunks_out = math.ceil(base.out_features / width)
        device = pool.device
        self.a_table = torch.zeros(capacity, 0, dtype=torch.long, device=device)
        self.b_table = torch.zeros(capacity, 0, dtype=torch.long, device=device)
        self.ranks = torch.zeros(capacity, dtype=torch.long, device=device)
        self.scales = torch.zeros(capacity, dtype=pool.dtype, device=device)
        self.num_resident = 0  # resident adapters that adapt this layer; 0 -> skip the LoRA calls

    def slots_needed(self, rank: int) -> int:
        """Pool slots for one adapter of ``rank`` on this layer (A rank-rows plus B^T rank-rows)."""
        return rank * (self.chunks_in + self.chunks_out)

    def pack(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Lay out ``A [r, in]`` and ``B [out, r]`` as ``slots_needed(r)`` pool rows: A's chunks, then B^T's."""
        width = self.pool.shape[1]
        a_rows = nn.functional.pad(a, (0, self.chunks_in * width - a.shape[1])).reshape(-1, width)
        b_rows = nn.functional.pad(b.t(), (0, self.chunks_out * width - b.shape[0])).reshape(-1, width)
        return torch.cat([a_rows, b_rows])

    def set_adapter(self, index: int, slots: torch.Tensor, rank: int, scale: float) -> None:
        """Point table row ``index`` at ``slots`` (as laid out by ``pack``) for an adapter of ``rank``."""
        self._ensure_rank_capacity(rank)
        split = rank * self.chunks_in
        self.a_table[index, :split] = slots[:split].to(self.a_table.device)
        self.b_table[index, : rank * self.chunks_out] = slots[split:].to(self.b_table.device)
        self.ranks[index] = rank
        self.scales[index] = scale
        self.num_resident += 1

    def clear_adapter(self, index: int) -> None:
        """Forget table row ``index``; its rank drops to 0 so stale slots are never read."""
        self.ranks[index] = 0
        self.scales[index] = 0.0
        self.num_resident -= 1

    def _ensure_rank_capacity(self, rank: int) -> None:
        # Tables are as wide as the largest rank seen on this layer, rounded up to a power of two so
        # that a stream of growing ranks reallocates only a few times.
        width = self.a_table.shape[1] // self.chunks_in
        if rank <= width:
            return
        new_width = 1 << (rank - 1).bit_length()
        self.a_table = nn.functional.pad(self.a_table, (0, (new_width - width) * self.chunks_in))
        self.b_table = nn.functional.pad(self.b_table, (0, (new_width - width) * self.chunks_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        rows = self.context.row_adapter
        if rows is None or self.num_resident == 0:
            return y
        flat_x = x.reshape(-1, x.shape[-1])
        flat_y = y.view(-1, y.shape[-1])
        v = lora_shrink(flat_x, self.pool, self.a_table, self.ranks, rows)
        lora_expand(flat_y, v, self.pool, self.b_table, self.ranks, self.scales, rows)
        return y


def wrap_linear(model: nn.Module, name: str, context: LoRAContext, pool: torch.Tensor, capacity: int):
    """Replace ``model``'s linear ``name`` by a ``BatchedLoRALinear`` around it (idempotent); return the wrapper."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    module = getattr(parent, child)
    if isinstance(module, BatchedLoRALinear):
        return module
    if not isinstance(module, nn.Linear):
        raise TypeError(f"{name} is a {type(module).__name__}, expected nn.Linear")
    wrapper = BatchedLoRALinear(module, context, pool, capacity)
    setattr(parent, child, wrapper)
    return wrapper
