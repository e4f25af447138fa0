"""Compressed adapters in the page pool: one linear's shared bases per collection and a core per adapter.

A compressed collection (``collection.py``) gives each group ``g`` of adapters, per adapted linear, bases
``U_g [out, c_g]``, ``V_g [in, c_g]`` and each adapter a core ``Σ [c_g, c_g]``. ``SharedLoRA`` keeps them in
the unified pool like any adapter weight: a collection's bases, its K groups side by side in blocks of
``c = max c_g`` columns (zero-padded), are laid out as one rank-``K c`` LoRA (``A = V^T``, ``B = U``) in a
``kernels.PagedLoRA`` indexed by collection, and an adapter's core, padded to ``[c, c]`` and flattened,
takes ``ceil(c² / D)`` slots (``D`` = slot width). Adapters use the engine's adapter indices
(``residency.py``), so compressed and uncompressed adapters and base rows mix in one batch: the uncompressed
ones' ``PagedLoRA`` has nothing set at a compressed adapter's index, and these tables nothing at an
uncompressed one's.

Bases stay in the pool while any adapter of their collection is registered (``adapter_manager.py``);
cores are paged in and evicted with their adapter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from kernels.lora import LoRASegments, PagedLoRA
from kernels.lora_shared import add_shared_lora, add_shared_lora_runs


@dataclass(frozen=True)
class CoreWeights:
    """A compressed adapter's part in one linear: its core ``Σ [c, c]`` (zero-padded to the collection's block
    width), its collection's engine-wide key and its group's block in the collection's bases."""

    core: torch.Tensor
    collection: int  # its collection's engine-wide key
    block: int

    @property
    def rank(self) -> int:
        """The block width ``c`` of its collection in this linear."""
        return self.core.shape[0]

    @property
    def nbytes(self) -> int:
        """Host bytes of the core."""
        return self.core.nbytes


# Rows per run above which a collection's rows are applied run by run (prefill): three rank-c GEMMs per run
# cost K times fewer FLOPs than the K c wide block GEMMs, and the per-run Python is small against them.
RUN_ROWS = 8


class SharedLoRA:
    """One linear's compressed adapters: collection bases and per-adapter cores in the pool (module docstring)."""

    def __init__(self, pool: torch.Tensor, in_features: int, out_features: int, capacity: int, max_collections: int):
        self.pool, self.capacity = pool, capacity
        self.bases = PagedLoRA(pool, in_features, out_features, max_collections)
        # Row 0 stands for base-model rows (adapter -1), row a + 1 for adapter index a.
        self._key_of = torch.full((capacity + 1,), -1, dtype=torch.long, device=pool.device)
        self._block_of = torch.zeros(capacity + 1, dtype=torch.long, device=pool.device)
        self._core_slots: dict[int, torch.Tensor] = {}  # key -> [capacity + 1, slots per core]
        self._width: dict[int, int] = {}  # key -> block width c
        self._host: list[tuple[int, int, torch.Tensor] | None] = [None] * capacity  # (key, block, core slots)
        self.num_set = 0

    # ---------------------------------------------------------------- collections (bases)
    def basis_rows(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Pool rows of a collection's bases ``U [out, K c]``, ``V [in, K c]`` (the LoRA ``A = V^T``, ``B = U``)."""
        return self.bases.pack(v.t(), u)

    def set_collection(self, key: int, slots: torch.Tensor, rank: int, width: int) -> None:
        """Point collection ``key`` at the pool ``slots`` holding ``basis_rows`` of ``rank = K c``, blocks of ``width``."""
        self.bases.set_adapter(key, slots, rank, 1.0)
        self._width[key] = width
        per_core = math.ceil(width * width / self.pool.shape[1])
        self._core_slots[key] = torch.zeros(self.capacity + 1, per_core, dtype=torch.long, device=self.pool.device)

    def clear_collection(self, key: int) -> None:
        """Forget collection ``key``'s bases (none of its adapters may be set)."""
        if any(h is not None and h[0] == key for h in self._host):
            raise RuntimeError(f"collection {key} still has adapters in the pool")
        self.bases.clear_adapter(key)
        del self._core_slots[key], self._width[key]

    # ---------------------------------------------------------------- adapters (cores)
    def slots_needed(self, c: int) -> int:
        """Pool slots of one core of block width ``c``."""
        return math.ceil(c * c / self.pool.shape[1])

    def pack(self, w: CoreWeights) -> torch.Tensor:
        """The core of ``w`` flattened into ``slots_needed`` pool rows."""
        width = self.pool.shape[1]
        flat = w.core.reshape(-1)
        return nn.functional.pad(flat, (0, self.slots_needed(w.rank) * width - flat.numel())).view(-1, width)

    def set_adapter(self, index: int, slots: torch.Tensor, w: CoreWeights) -> None:
        """Point adapter index ``index`` at the pool ``slots`` holding ``pack(w)``."""
        if self._width.get(w.collection) != w.rank:
            raise ValueError(f"collection {w.collection} with blocks of width {w.rank} is not set in this layer")
        self._core_slots[w.collection][index + 1] = slots.to(self.pool.device)
        self._key_of[index + 1], self._block_of[index + 1] = w.collection, w.block
        self.num_set += self._host[index] is None
        self._host[index] = (w.collection, w.block, slots.to(self.pool.device))

    def clear_adapter(self, index: int) -> None:
        """Forget adapter index ``index``; its rows add nothing any more."""
        self._key_of[index + 1] = -1
        self.num_set -= self._host[index] is not None
        self._host[index] = None

    def is_set(self, index: int) -> bool:
        """Whether a compressed adapter is set at ``index``."""
        return self._host[index] is not None

    def apply(self, y: torch.Tensor, x: torch.Tensor, segments: LoRASegments) -> torch.Tensor:
        """``y[t] += x[t] ΔW_a^T`` for the rows whose adapter ``a`` is set here, one collection at a time:
        block GEMMs over all rows with a batched per-row core product (``add_shared_lora``), or run by run
        when the runs are long (``add_shared_lora_runs``)."""
        runs: dict[int, list] = {}
        for a, start, stop in segments.runs:
            if self._host[a] is not None:
                runs.setdefault(self._host[a][0], []).append((a, start, stop))
        for key, key_runs in runs.items():
            vt, ut, _ = self.bases.adapter_weights(key)
            c = self._width[key]
            if segments.packed and segments.num_rows >= RUN_ROWS * len(key_runs):
                cores = [(s, e, self._host[a][1], self._core(self._host[a][2], c)) for a, s, e in key_runs]
                add_shared_lora_runs(y, x, vt.t(), ut, cores)
                continue
            rows = segments.row_adapter + 1
            slots = self._core_slots[key][rows].reshape(-1)
            cores = self.pool.index_select(0, slots).view(len(rows), -1)[:, : c * c].view(-1, c, c)
            add_shared_lora(y, x, vt.t(), ut, cores, self._block_of[rows], self._key_of[rows] == key)
        return y

    def _core(self, slots: torch.Tensor, c: int) -> torch.Tensor:
        return self.pool.index_select(0, slots).view(-1)[: c * c].view(c, c)
