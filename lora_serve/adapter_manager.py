"""``AdapterManager``: one engine's adapters, from registration on the host to residency in the pool.

Registration validates an adapter's files against the base model and keeps its weights on the host
(``AdapterStore``); the first adapter to target a linear makes the runner wrap it. Residency
(``AdapterResidency``) copies adapters into the pool's slots on demand and evicts idle ones. The engine
calls these under its lock; only ``load`` (file IO and validation) runs outside it.

A compressed collection (``collection.py``) registers each of its adapters by name; its groups' shared
bases go into the pool at once and stay there while any adapter of the collection is registered, its
adapters' cores are paged like any adapter (``shared_lora.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .adapter_store import Adapter, AdapterError, AdapterStore
from .collection import CompressedCollection
from .config import EngineConfig
from .model_runner import ModelRunner
from .pool import SlotOwner
from .residency import AdapterResidency
from .shared_lora import CoreWeights


@dataclass(frozen=True)
class AdapterInfo:
    """A registered adapter as ``Engine.list_adapters`` reports it."""

    name: str
    path: str
    max_rank: int
    num_modules: int
    pool_slots: int  # slots it takes when resident
    resident: bool
    pinned: bool


class AdapterManager:
    """Registered adapters (host) and resident adapters (pool) of the model ``runner`` runs."""

    def __init__(self, runner: ModelRunner, config: EngineConfig):
        host_mb = config.adapter_host_mb
        host_bytes = None if host_mb is None else int(host_mb * 2**20)
        self.store = AdapterStore(runner.linear_shapes(), runner.model.dtype, host_bytes, runner.parameter_shapes())
        self.residency = AdapterResidency(runner.pool, runner.lora_layers, config.max_resident_adapters,
                                          runner.shared_layers)
        self._runner = runner
        self._collections: dict[int, tuple[dict, set[str]]] = {}  # collection key -> (module -> basis slots, adapters)

    def __contains__(self, name: str) -> bool:
        return name in self.store

    def names(self) -> list[str]:
        """Registered adapter names."""
        return self.store.names()

    def load(self, name: str, path: str | Path) -> Adapter:
        """Read and validate the PEFT adapter in ``path`` (``AdapterError`` if bad); nothing is registered yet."""
        return self.store.load(name, path)

    def register(self, adapter: Adapter) -> AdapterInfo:
        """Register a loaded adapter, wrapping the linears it targets; ``AdapterError`` if it can never fit."""
        for module in adapter.modules:
            self._runner.adapt(module)
        needed = self.residency.slots_needed(adapter)
        pool = self._runner.pool
        if needed > pool.num_slots:
            raise AdapterError(
                f"adapter {adapter.name!r} needs {needed} pool slots but the pool has only {pool.num_slots}; "
                "enlarge the pool (pool_slots / pool_mb)"
            )
        self.store.add(adapter)
        return self.info(adapter.name)

    def unregister(self, name: str) -> None:
        """Free adapter ``name``'s pool slots and forget it (no request may use it any more); the last adapter
        of a compressed collection frees its bases too."""
        self.residency.evict(name)
        adapter = self.store.remove(name)
        first = next(iter(adapter.modules.values()))
        if isinstance(first, CoreWeights):
            bases, names = self._collections[first.collection]
            names.discard(name)
            if not names:
                self._free_collection(first.collection)

    def _free_collection(self, key: int) -> None:
        """Release compressed collection ``key``'s bases (it has no registered adapter)."""
        bases, _ = self._collections.pop(key)
        for module, slots in bases.items():
            self._runner.shared_layers[module].clear_collection(key)
            self._runner.pool.release(slots, SlotOwner.ADAPTER)

    def register_collection(self, collection: CompressedCollection, path: str, free_slots: int) -> list[AdapterInfo]:
        """Register every adapter of a compressed ``collection`` (read from ``path``) by its name, putting its
        groups' bases (side by side) into the pool (at most ``free_slots`` slots); ``AdapterError`` if it does not fit the
        base model, a name is taken or there is no room. A failure leaves nothing registered."""
        label = f"adapter collection {Path(path).name!r}"
        linears = self.store.linears  # read before any linear was wrapped
        for module, shape in collection.modules.items():
            if linears.get(module) != shape:
                found = "no such linear" if module not in linears else _shape(linears[module])
                raise AdapterError(f"{label} adapts {module} as {_shape(shape)}, but the base model has {found}: it "
                                   "was compressed from adapters of another base")
        taken = [n for n in collection.names() if n in self.store]
        if taken:
            raise AdapterError(f"{label}: adapter name {taken[0]!r} is already registered")
        key = next((k for k in range(self.residency.capacity) if k not in self._collections), None)
        if key is None:
            raise AdapterError(f"{label}: {len(self._collections)} collections are registered, the most "
                               f"max_resident_adapters={self.residency.capacity} allows")
        bases = _side_by_side(collection)
        needed = sum(self._runner.adapt_shared(m).bases.slots_needed(u.shape[1]) for m, (u, _, _) in bases.items())
        if needed > free_slots:
            raise AdapterError(f"{label}: its shared bases need {needed} pool slots, {free_slots} are free")
        self._collections[key] = (self._load_bases(key, bases), set())
        try:
            for block, group in enumerate(collection.groups):
                for j, name in enumerate(group.names):
                    modules = {m: CoreWeights(_padded(cores[j], bases[m][2]).to(self._runner.model.dtype), key, block)
                               for m, cores in group.cores.items()}
                    self.store.add(Adapter(name, f"{path}#{name}", modules, digest=f"{path}#{key}#{name}"))
                    self._collections[key][1].add(name)
        except AdapterError:
            for name in list(self._collections[key][1]):
                self.unregister(name)
            if key in self._collections:  # bases loaded, no adapter added
                self._free_collection(key)
            raise
        return [self.info(name) for name in collection.names()]

    def _load_bases(self, key: int, bases: dict) -> dict:
        """Copy a collection's bases into the pool as collection ``key`` of every linear's tables; their slots."""
        pool, slots_of = self._runner.pool, {}
        for module, (u, v, width) in bases.items():
            tables = self._runner.shared_layers[module]
            slots = pool.allocate_run(tables.bases.slots_needed(u.shape[1]), SlotOwner.ADAPTER)
            pool.slots[slots.to(pool.slots.device)] = tables.basis_rows(u, v).to(pool.slots)
            tables.set_collection(key, slots, u.shape[1], width)
            slots_of[module] = slots
        return slots_of

    def pin(self, name: str, pinned: bool, free_slots: int) -> None:
        """Load adapter ``name`` into the pool now and keep it there (``pinned=False``: evictable again)."""
        self.residency.set_pinned(self.store.get(name), pinned, free_slots)

    def index_of(self, name: str) -> int:
        """Page-table index of resident adapter ``name``."""
        return self.residency.index_of(name)

    def info(self, name: str) -> AdapterInfo:
        """Adapter ``name``'s rank, size and residency (``KeyError`` if unknown)."""
        adapter = self.store.get(name)
        resident = self.residency.get(name)
        return AdapterInfo(
            name=name,
            path=adapter.path,
            max_rank=adapter.max_rank,
            num_modules=len(adapter.modules),
            pool_slots=self.residency.slots_needed(adapter),
            resident=resident is not None,
            pinned=bool(resident and resident.pinned),
        )


def _shape(shape) -> str:
    return f"{shape.in_features} -> {shape.out_features}"


def _side_by_side(collection: CompressedCollection) -> dict[str, tuple]:
    """Per linear, ``(U [out, K c], V [in, K c], c)``: the K groups' bases in blocks of ``c`` = the widest
    group's rank, narrower ones zero-padded (zero columns add nothing)."""
    out = {}
    for module in collection.modules:
        pairs = [group.bases[module] for group in collection.groups]
        c = max(u.shape[1] for u, _ in pairs)
        pad = lambda t: torch.nn.functional.pad(t, (0, c - t.shape[1]))  # noqa: E731
        out[module] = (torch.cat([pad(u) for u, _ in pairs], 1), torch.cat([pad(v) for _, v in pairs], 1), c)
    return out


def _padded(core: torch.Tensor, c: int) -> torch.Tensor:
    """``core`` zero-padded to ``[c, c]``."""
    return torch.nn.functional.pad(core, (0, c - core.shape[1], 0, c - core.shape[0])).contiguous()
