"""Unified page pool: one preallocated tensor whose rows ("slots") hold both KV cache and adapter weights.

Following S-LoRA's Unified Paging, the paging unit is a single slot: one vector of width ``D`` (the
model's hidden size). A KV entry of one token takes a fixed number of slots (see ``kv_layout.py``) and
each rank-row of an adapter's A or B matrix takes ``ceil(width / D)`` slots, so adapters of any rank and
sequences of any length share one pool without fragmentation: any free slot serves any owner, and the
slots of one owner need not be contiguous. Page tables (per sequence and per adapter) are plain index
tensors into this pool.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch


class SlotOwner(str, Enum):
    """What a group of allocated slots is used for; only used for accounting."""

    KV = "kv"
    ADAPTER = "adapter"


@dataclass(frozen=True)
class PoolStats:
    """A snapshot of pool use, in slots (one slot = one vector of ``slot_width`` elements)."""

    total: int
    kv: int
    adapters: int
    free: int
    slot_width: int
    bytes_per_slot: int

    def __str__(self) -> str:
        mib = self.bytes_per_slot / 2**20
        return (
            f"pool {self.total} slots x {self.slot_width} ({self.total * mib:.1f} MiB): "
            f"kv {self.kv}, adapters {self.adapters}, free {self.free}"
        )


class PoolExhausted(RuntimeError):
    """Raised when an allocation asks for more free slots than the pool has.

    The scheduler checks capacity before allocating, so seeing this means a bookkeeping bug, not load.
    """


class PagePool:
    """A fixed set of ``num_slots`` slots of width ``slot_width`` with a free-list allocator.

    The free list is a tensor used as a stack, so allocating or freeing ``n`` slots is one slice and
    never a Python loop over slots.
    """

    def __init__(self, num_slots: int, slot_width: int, dtype: torch.dtype, device: torch.device | str):
        if num_slots <= 0:
            raise ValueError(f"num_slots must be positive, got {num_slots}")
        if slot_width <= 0:
            raise ValueError(f"slot_width must be positive, got {slot_width}")
        self.slots = torch.zeros(num_slots, slot_width, dtype=dtype, device=device)
        # Kept on the host: allocation decisions are made in Python, and a device free list would
        # force a synchronisation on every allocation.
        self._free = torch.arange(num_slots - 1, -1, -1, dtype=torch.long)
        self._num_free = num_slots
        self._used = {owner: 0 for owner in SlotOwner}

    @property
    def num_slots(self) -> int:
        """Total number of slots in the pool."""
        return self.slots.shape[0]

    @property
    def slot_width(self) -> int:
        """Elements per slot (the model's hidden size)."""
        return self.slots.shape[1]

    @property
    def num_free(self) -> int:
        """Slots not owned by anything."""
        return self._num_free

    def allocate(self, n: int, owner: SlotOwner) -> torch.Tensor:
        """Take ``n`` free slots for ``owner`` and return their indices (int64, host)."""
        if n < 0:
            raise ValueError(f"cannot allocate a negative number of slots ({n})")
        if n > self._num_free:
            raise PoolExhausted(f"asked for {n} slots for {owner.value}, only {self._num_free} free")
        start = self._num_free - n
        taken = self._free[start : self._num_free].clone()
        self._num_free = start
        self._used[owner] += n
        return taken

    def allocate_run(self, n: int, owner: SlotOwner) -> torch.Tensor:
        """Like :meth:`allocate`, but hand out ``n`` consecutive ascending slots when the free list has such
        a run (lowest first), else any ``n`` slots.

        For adapter weights: a layer's A/B rank-rows in one run are a plain view of the pool, so the CPU
        LoRA path multiplies them in place instead of gathering them every step. Costs a sort of the free
        list, which is fine for adapter loads (rare); KV pages use :meth:`allocate`.
        """
        if n < 0 or n > self._num_free:
            return self.allocate(n, owner)  # same errors
        free = self._free[: self._num_free]
        top = free[self._num_free - n :]
        if n == 0 or int(top.max()) - int(top.min()) == n - 1:  # the top of the stack is a run already
            return self.allocate(n, owner).sort().values
        ordered = free.sort().values
        breaks = torch.nonzero(ordered.diff() != 1).flatten() + 1  # run i spans ordered[starts[i]:ends[i]]
        starts = torch.cat([breaks.new_zeros(1), breaks])
        ends = torch.cat([breaks, breaks.new_tensor([ordered.numel()])])
        fits = torch.nonzero(ends - starts >= n).flatten()
        if not fits.numel():
            return self.allocate(n, owner)
        first = int(starts[fits[0]])
        taken = ordered[first : first + n].clone()
        # Keep the rest of the free list as a descending stack, so later allocations also find runs.
        rest = torch.cat([ordered[:first], ordered[first + n :]]).flip(0)
        self._free[: rest.numel()] = rest
        self._num_free = rest.numel()
        self._used[owner] += n
        return taken

    def release(self, slots: torch.Tensor, owner: SlotOwner) -> None:
        """Return ``slots`` (previously allocated to ``owner``) to the free list."""
        n = slots.numel()
        if n > self._used[owner]:
            raise ValueError(f"releasing {n} {owner.value} slots but only {self._used[owner]} are allocated")
        self._free[self._num_free : self._num_free + n] = slots.reshape(-1).cpu()
        self._num_free += n
        self._used[owner] -= n

    def stats(self) -> PoolStats:
        """Current accounting: slots used by KV, by adapters, and free."""
        return PoolStats(
            total=self.num_slots,
            kv=self._used[SlotOwner.KV],
            adapters=self._used[SlotOwner.ADAPTER],
            free=self._num_free,
            slot_width=self.slot_width,
            bytes_per_slot=self.slot_width * self.slots.element_size(),
        )
