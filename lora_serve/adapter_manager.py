"""``AdapterManager``: one engine's adapters, from registration on the host to residency in the pool.

Registration validates an adapter's files against the base model and keeps its weights on the host
(``AdapterStore``); the first adapter to target a linear makes the runner wrap it. Residency
(``AdapterResidency``) copies adapters into the pool's slots on demand and evicts idle ones. The engine
calls these under its lock; only ``load`` (file IO and validation) runs outside it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .adapter_store import Adapter, AdapterError, AdapterStore
from .config import EngineConfig
from .model_runner import ModelRunner
from .residency import AdapterResidency


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
        self.residency = AdapterResidency(runner.pool, runner.lora_layers, config.max_resident_adapters)
        self._runner = runner

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
        """Free adapter ``name``'s pool slots and forget it (no request may use it any more)."""
        self.residency.evict(name)
        self.store.remove(name)

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
