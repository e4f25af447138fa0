"""Batched multi-LoRA linear layers: one mixed batch of rows, each row with its own adapter (or none).

``BatchedLoRALinear`` wraps a base ``nn.Linear`` in place. Each step the engine tells the shared
``LoRAContext`` which adapter every packed row uses (-1 = base model), once for all wrapped layers.
The wrapper owns the page tables of its layer: row ``m`` of ``a_table`` / ``b_table`` lists the pool
slots holding resident adapter ``m``'s A rank-rows and B^T rank-rows (layout in ``kernels/lora.py``).
An adapter that does not touch this layer keeps rank 0 here and adds nothing.

Two paths compute the same thing:

* GPU (``kernels.backend`` picks Triton): one ``lora_shrink`` and one ``lora_expand`` launch per layer
  for the whole batch, reading the page tables on the device (SGMV).
* CPU: the engine packs each adapter's rows next to each other, so the context holds the step's
  *runs* ``(adapter, start, stop)``; each run is one ``x @ A^T`` and one ``addmm_`` into ``y``. A/B are
  views of the pool when the adapter's slots in this layer are one ascending run (the pool's
  ``allocate_run`` makes that the usual case), gathered from the pool otherwise. The SGMV reference
  did the same GEMMs plus a sort, row gathers/scatters, table reads and value checks for every adapter
  of every layer every step: ~20 small ops each, which dominated decode on CPU.
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import nn

from kernels import backend
from kernels.lora import lora_expand, lora_shrink


class LoRAContext:
    """Per-step state shared by all wrappers of one engine: which adapter each packed row uses."""

    def __init__(self):
        self.row_adapter: torch.Tensor | None = None  # [T] int64, or None when no row uses an adapter
        self.runs: list[tuple[int, int, int]] = []  # (adapter, start, stop) of consecutive rows, adapter >= 0

    def set_rows(self, rows: list[int], device: torch.device) -> None:
        """Set the step's adapter of each packed row (-1 = none); computed once per step, not per layer."""
        self.runs, start = [], 0
        for adapter, group in itertools.groupby(rows):
            count = sum(1 for _ in group)
            if adapter >= 0:
                self.runs.append((adapter, start, start + count))
            start += count
        self.row_adapter = torch.tensor(rows, dtype=torch.long, device=device) if self.runs else None

    def clear(self) -> None:
        """Forget the step's rows (between steps no LoRA is applied)."""
        self.row_adapter, self.runs = None, []


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
        # Host-side copy of the tables for the CPU path, per table index: (A, B^T, scale) where A and
        # B^T are pool views, or slot-index tensors to gather from; None where no adapter is set.
        self._host: list[tuple[torch.Tensor, torch.Tensor, float] | None] = [None] * capacity

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
        self._host[index] = (self._rows(slots[:split], rank), self._rows(slots[split:], rank), float(scale))
        self.num_resident += 1

    def clear_adapter(self, index: int) -> None:
        """Forget table row ``index``; its rank drops to 0 so stale slots are never read."""
        self.ranks[index] = 0
        self.scales[index] = 0.0
        self._host[index] = None
        self.num_resident -= 1

    def _rows(self, slots: torch.Tensor, rank: int) -> torch.Tensor:
        """``[rank, chunks * D]`` view of the pool if ``slots`` (host int64) is one ascending run, else the
        slot indices on the pool's device (the CPU path gathers those each step)."""
        first = int(slots[0]) if slots.numel() else 0
        if torch.equal(slots, torch.arange(first, first + slots.numel(), dtype=slots.dtype, device=slots.device)):
            return self.pool.narrow(0, first, slots.numel()).view(rank, -1)
        return slots.to(self.pool.device)

    def _weights(self, index: int) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """Adapter ``index``'s ``A [r, in]``, ``B^T [r, out]`` and scale for the CPU path (None: not on this layer)."""
        host = self._host[index]
        if host is None:
            return None
        a, bt, scale = host
        return self._gathered(a, self.chunks_in)[:, : self.base.in_features], self._gathered(bt, self.chunks_out)[
            :, : self.base.out_features
        ], scale

    def _gathered(self, rows: torch.Tensor, chunks: int) -> torch.Tensor:
        """``rows`` itself if it is a pool view, else the rank-rows gathered from its slot indices."""
        if rows.is_floating_point():
            return rows
        return self.pool.index_select(0, rows).view(-1, chunks * self.pool.shape[1])

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
        context = self.context
        if context.row_adapter is None or self.num_resident == 0:
            return y
        flat_x = x.reshape(-1, x.shape[-1])
        flat_y = y.view(-1, y.shape[-1])
        if backend.use_triton(x.device):
            v = lora_shrink(flat_x, self.pool, self.a_table, self.ranks, context.row_adapter)
            lora_expand(flat_y, v, self.pool, self.b_table, self.ranks, self.scales, context.row_adapter)
            return y
        for adapter, start, stop in context.runs:
            weights = self._weights(adapter)
            if weights is not None:
                a, bt, scale = weights
                flat_y[start:stop].addmm_(flat_x[start:stop] @ a.t(), bt, alpha=scale)
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
