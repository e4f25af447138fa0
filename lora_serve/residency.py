"""Which adapters are in the page pool: on-demand copy-in, LRU eviction of idle adapters, pinning.

An adapter is *resident* when its A/B rank-rows are in pool slots and a table index ``m`` in
``[0, capacity)`` points every adapted layer's page tables (``kernels.PagedLoRA``, or
``kernels.lora.PagedExpertLoRA`` for a fused experts parameter: same protocol, one entry per expert) at them. Residents used
by running requests (``users > 0``) and pinned ones are never evicted; idle residents stay cached (a later
request for them costs nothing) until their slots or index are needed, then the least recently used goes first.
A compressed adapter (modules of ``CoreWeights``) is paged the same way; its cores go to the layers'
``SharedLoRA`` tables (``shared``) instead.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from kernels.lora import PagedExpertLoRA, PagedLoRA

from .adapter_store import Adapter
from .pool import PagePool, SlotOwner
from .shared_lora import CoreWeights, SharedLoRA


@dataclass
class Resident:
    """A resident adapter: its table index, its pool slots and who holds it."""

    index: int
    slots: torch.Tensor
    users: int = 0
    pinned: bool = False

    @property
    def evictable(self) -> bool:
        """Idle and not pinned."""
        return self.users == 0 and not self.pinned


class AdapterResidency:
    """Moves adapters between the host store and the pool for the wrappers in ``layers``."""

    def __init__(self, pool: PagePool, layers: dict[str, PagedLoRA | PagedExpertLoRA], capacity: int,
                 shared: dict[str, SharedLoRA] | None = None):
        self.pool = pool
        self.layers = layers  # shared with the model runner, which adds tables as adapters target new layers
        self.shared = {} if shared is None else shared  # the same, for compressed adapters
        self.capacity = capacity
        self._resident: OrderedDict[str, Resident] = OrderedDict()  # least recently used first
        self.loads = 0
        self.evictions = 0

    def slots_needed(self, adapter: Adapter) -> int:
        """Pool slots ``adapter`` occupies when resident."""
        return sum(self._tables(m, w).slots_needed(w.rank) for m, w in adapter.modules.items())

    def _tables(self, module: str, weights) -> PagedLoRA | PagedExpertLoRA | SharedLoRA:
        """Where ``weights`` of ``module`` go: a compressed adapter's core to the layer's shared-basis tables."""
        return self.shared[module] if isinstance(weights, CoreWeights) else self.layers[module]

    def resident_names(self) -> list[str]:
        """Resident adapters, least recently used first."""
        return list(self._resident)

    def get(self, name: str) -> Resident | None:
        """The residency record of adapter ``name``, or None if it is not in the pool."""
        return self._resident.get(name)

    def index_of(self, name: str) -> int:
        """Table index of resident adapter ``name``."""
        return self._resident[name].index

    def can_acquire(self, adapter: Adapter, free_slots: int) -> bool:
        """Whether ``acquire`` would succeed with ``free_slots`` usable slots (plus evictable adapters)."""
        if adapter.name in self._resident:
            return True
        idle = [r for r in self._resident.values() if r.evictable]
        index_free = len(self._resident) < self.capacity or bool(idle)
        return index_free and free_slots + sum(r.slots.numel() for r in idle) >= self.slots_needed(adapter)

    def acquire(self, adapter: Adapter, free_slots: int) -> int:
        """Make ``adapter`` resident (evicting LRU idle adapters as needed), count one user, return its index.

        ``free_slots`` is how many free pool slots may be used (the caller keeps the rest for KV it has
        promised to running requests). Call ``can_acquire`` first.
        """
        resident = self._resident.get(adapter.name)
        if resident is None:
            resident = self._load(adapter, free_slots)
        resident.users += 1
        self._resident.move_to_end(adapter.name)
        return resident.index

    def release(self, name: str) -> None:
        """Drop one user of resident adapter ``name``; it stays cached until evicted."""
        self._resident[name].users -= 1

    def set_pinned(self, adapter: Adapter, pinned: bool, free_slots: int) -> None:
        """Pin (load now and never evict) or unpin ``adapter``."""
        if pinned and adapter.name not in self._resident:
            if not self.can_acquire(adapter, free_slots):
                raise RuntimeError(f"no room in the pool to pin adapter {adapter.name!r} now")
            self._load(adapter, free_slots)
        if adapter.name in self._resident:
            self._resident[adapter.name].pinned = pinned

    def evict(self, name: str) -> None:
        """Remove adapter ``name`` from the pool (it must be idle); no-op if not resident."""
        resident = self._resident.get(name)
        if resident is None:
            return
        if resident.users:
            raise RuntimeError(f"adapter {name!r} is used by {resident.users} running request(s)")
        del self._resident[name]
        for layer in [*self.layers.values(), *self.shared.values()]:
            if layer.is_set(resident.index):
                layer.clear_adapter(resident.index)
        self.pool.release(resident.slots, SlotOwner.ADAPTER)
        self.evictions += 1

    def _load(self, adapter: Adapter, free_slots: int) -> Resident:
        needed = self.slots_needed(adapter)
        for name in [n for n, r in self._resident.items() if r.evictable]:
            if free_slots >= needed and len(self._resident) < self.capacity:
                break
            free_slots += self._resident[name].slots.numel()
            self.evict(name)
        if free_slots < needed or len(self._resident) >= self.capacity:
            raise RuntimeError(f"cannot make adapter {adapter.name!r} resident: pool or adapter table full")
        used = {r.index for r in self._resident.values()}
        index = next(i for i in range(self.capacity) if i not in used)
        slots = self.pool.allocate_run(needed, SlotOwner.ADAPTER)  # one run: the CPU path uses pool views
        layers = [(self._tables(m, w), w) for m, w in adapter.modules.items()]
        compressed = [isinstance(w, CoreWeights) for _, w in layers]
        rows = torch.cat([layer.pack(w) if core else layer.pack(w.a, w.b) for (layer, w), core in zip(layers, compressed)])
        self.pool.slots[slots.to(self.pool.slots.device)] = rows.to(self.pool.slots)
        start = 0
        for (layer, w), core in zip(layers, compressed):
            count = layer.slots_needed(w.rank)
            span = slots[start : start + count]
            layer.set_adapter(index, span, w) if core else layer.set_adapter(index, span, w.rank, w.scale)
            start += count
        resident = Resident(index=index, slots=slots)
        self._resident[adapter.name] = resident
        self.loads += 1
        return resident
