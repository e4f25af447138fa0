"""Compressed adapters in the page pool: one linear's shared bases per group and a core per adapter.

A compressed collection (``collection.py``) gives each group ``g`` of adapters, per adapted linear, bases
``U [out, c]``, ``V [in, c]`` and each adapter a core ``Σ [c, c]``. ``SharedLoRA`` keeps them in the unified
pool like any adapter weight: a group's bases are laid out as a rank-``c`` LoRA (``A = V^T``, ``B = U``) in a
``kernels.PagedLoRA`` indexed by group, and an adapter's core, flattened, takes ``ceil(c² / D)`` slots
(``D`` = slot width). Adapters use the engine's adapter indices (``residency.py``), so compressed and
uncompressed adapters and base rows mix in one batch: the uncompressed ones' ``PagedLoRA`` has nothing
set at a compressed adapter's index, and these tables nothing at an uncompressed one's.

Bases stay in the pool while any adapter of their group is registered (``adapter_manager.py``); cores are
paged in and evicted with their adapter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from kernels.lora import LoRASegments, PagedLoRA
from kernels.lora_shared import add_shared_lora


@dataclass(frozen=True)
class CoreWeights:
    """A compressed adapter's part in one linear: its core ``Σ [c, c]`` and its group's engine-wide key."""

    core: torch.Tensor
    group: int

    @property
    def rank(self) -> int:
        """The shared rank ``c`` of its group in this linear."""
        return self.core.shape[0]

    @property
    def nbytes(self) -> int:
        """Host bytes of the core."""
        return self.core.nbytes


class SharedLoRA:
    """One linear's compressed adapters: group bases and per-adapter cores in the pool (module docstring)."""

    def __init__(self, pool: torch.Tensor, in_features: int, out_features: int, capacity: int, max_groups: int):
        self.pool, self.capacity = pool, capacity
        self.bases = PagedLoRA(pool, in_features, out_features, max_groups)
        # Row 0 stands for base-model rows (adapter -1), row a + 1 for adapter index a.
        self._group_of = torch.full((capacity + 1,), -1, dtype=torch.long, device=pool.device)
        self._core_slots: dict[int, torch.Tensor] = {}  # group -> [capacity + 1, slots per core]
        self._host_group: list[int | None] = [None] * capacity
        self.num_set = 0

    # ---------------------------------------------------------------- groups (bases)
    def basis_rows(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Pool rows of a group's bases ``U [out, c]``, ``V [in, c]`` (as the rank-c LoRA ``A = V^T``, ``B = U``)."""
        return self.bases.pack(v.t(), u)

    def set_group(self, group: int, slots: torch.Tensor, c: int) -> None:
        """Point group ``group`` at the pool ``slots`` holding ``basis_rows`` of shared rank ``c``."""
        self.bases.set_adapter(group, slots, c, 1.0)
        per_core = math.ceil(c * c / self.pool.shape[1])
        self._core_slots[group] = torch.zeros(self.capacity + 1, per_core, dtype=torch.long, device=self.pool.device)

    def clear_group(self, group: int) -> None:
        """Forget group ``group``'s bases (none of its adapters may be set)."""
        if group in self._host_group:
            raise RuntimeError(f"group {group} still has adapters in the pool")
        self.bases.clear_adapter(group)
        del self._core_slots[group]

    # ---------------------------------------------------------------- adapters (cores)
    def slots_needed(self, c: int) -> int:
        """Pool slots of one core of shared rank ``c``."""
        return math.ceil(c * c / self.pool.shape[1])

    def pack(self, w: CoreWeights) -> torch.Tensor:
        """The core of ``w`` flattened into ``slots_needed`` pool rows."""
        width = self.pool.shape[1]
        flat = w.core.reshape(-1)
        return nn.functional.pad(flat, (0, self.slots_needed(w.rank) * width - flat.numel())).view(-1, width)

    def set_adapter(self, index: int, slots: torch.Tensor, w: CoreWeights) -> None:
        """Point adapter index ``index`` at the pool ``slots`` holding ``pack(w)``."""
        if w.group not in self._core_slots or self.bases.ranks[w.group] != w.rank:
            raise ValueError(f"group {w.group} of shared rank {w.rank} is not set in this layer")
        self._core_slots[w.group][index + 1] = slots.to(self.pool.device)
        self._group_of[index + 1] = w.group
        self.num_set += self._host_group[index] is None
        self._host_group[index] = w.group

    def clear_adapter(self, index: int) -> None:
        """Forget adapter index ``index``; its rows add nothing any more."""
        self._group_of[index + 1] = -1
        self.num_set -= self._host_group[index] is not None
        self._host_group[index] = None

    def is_set(self, index: int) -> bool:
        """Whether a compressed adapter is set at ``index``."""
        return self._host_group[index] is not None

    def apply(self, y: torch.Tensor, x: torch.Tensor, segments: LoRASegments) -> torch.Tensor:
        """``y[t] += x[t] ΔW_a^T`` for the rows whose adapter ``a`` is set here, one group at a time: per
        group one GEMM to rank c over the rows, a batched per-row core product, one GEMM back."""
        groups = {self._host_group[a] for a, _, _ in segments.runs} - {None}
        if not groups:
            return y
        rows = segments.row_adapter + 1
        row_group = self._group_of[rows]
        for g in sorted(groups):
            vt, ut, _ = self.bases.adapter_weights(g)
            c = vt.shape[0]
            slots = self._core_slots[g][rows].reshape(-1)
            cores = self.pool.index_select(0, slots).view(len(rows), -1)[:, : c * c].view(-1, c, c)
            add_shared_lora(y, x, vt.t(), ut, cores, row_group == g)
        return y
