"""Iteration-level scheduler: which requests run this step, with how many tokens, and their pool pages.

Every step, running requests get their next token (decode) or their next prompt chunk (chunked
prefill), then waiting requests are admitted while the step's token budget, the batch-size bound and
the pool allow. Waiting requests queue per adapter and are admitted round-robin across adapters, so one
adapter's burst cannot starve the others; within an adapter, order is first come, first served.

Memory: admission promises a request all the KV it can ever need (``max_kv_tokens``), as S-LoRA and
LightLLM do, but slots are taken from the pool only as tokens arrive. ``reserved`` counts promised but
not yet taken slots; adapters may only use free slots beyond it. So a running request never runs out of
memory and nothing is ever preempted: when the pool is full, requests simply wait.
"""

from __future__ import annotations

from collections import OrderedDict, deque

import torch

from .adapter_store import AdapterStore
from .kv_layout import KVLayout
from .pool import PagePool, SlotOwner
from .request import Request, RequestTooLargeError
from .residency import AdapterResidency


class Scheduler:
    """Owns the waiting queues, the running set and every request's pool pages."""

    def __init__(
        self,
        pool: PagePool,
        layout: KVLayout,
        store: AdapterStore,
        residency: AdapterResidency,
        max_batch_tokens: int,
        max_batch_size: int,
    ):
        self.pool = pool
        self.layout = layout
        self.store = store
        self.residency = residency
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_size = max_batch_size
        self.waiting: OrderedDict[str | None, deque[Request]] = OrderedDict()  # adapter -> FIFO; order = turn
        self.running: list[Request] = []
        self.reserved = 0

    def kv_slots(self, request: Request) -> int:
        """Slots the request's KV can ever take."""
        return request.max_kv_tokens * self.layout.slots_per_token

    def check_fits(self, request: Request) -> None:
        """Raise ``RequestTooLargeError`` if ``request`` could never run, even alone in an empty pool."""
        adapter_slots = self.residency.slots_needed(self.store.get(request.adapter)) if request.adapter else 0
        needed = self.kv_slots(request) + adapter_slots
        if needed > self.pool.num_slots:
            raise RequestTooLargeError(
                f"request needs {needed} pool slots ({request.max_kv_tokens} KV tokens x "
                f"{self.layout.slots_per_token} slots + {adapter_slots} for adapter {request.adapter!r}) but the "
                f"pool has {self.pool.num_slots}; shorten the prompt or max_tokens, or enlarge the pool"
            )

    def add(self, request: Request) -> None:
        """Queue ``request`` behind its adapter's earlier requests."""
        self.waiting.setdefault(request.adapter, deque()).append(request)

    def uses_adapter(self, name: str) -> list[Request]:
        """Running and waiting requests for adapter ``name``."""
        return [r for r in self.running if r.adapter == name] + list(self.waiting.get(name, ()))

    def schedule(self) -> list[tuple[Request, int]]:
        """Pick this step's ``(request, num_new_tokens)`` and give their new tokens pool pages."""
        budget = self.max_batch_tokens
        batch = []
        for request in self.running:
            if budget == 0:
                break
            count = min(len(request.all_ids) - request.num_computed, budget)
            batch.append((request, count))
            budget -= count
        while budget and len(self.running) < self.max_batch_size and self._admit_next():
            request = self.running[-1]
            count = min(len(request.prompt_ids), budget)
            batch.append((request, count))
            budget -= count
        for request, count in batch:
            self._page(request, request.num_computed + count)
        return batch

    def _admit_next(self) -> bool:
        """Admit the head of the next adapter's queue in round-robin order; False if it must wait."""
        if not self.waiting:
            return False
        adapter, queue = next(iter(self.waiting.items()))
        request = queue[0]
        kv = self.kv_slots(request)
        usable = self.pool.num_free - self.reserved - kv
        if usable < 0:
            return False
        if adapter is not None:
            adapter_weights = self.store.get(adapter)
            if not self.residency.can_acquire(adapter_weights, usable):
                return False
            self.residency.acquire(adapter_weights, usable)
        queue.popleft()
        # This adapter's turn is used: move it to the back (or drop it when its queue is empty).
        del self.waiting[adapter]
        if queue:
            self.waiting[adapter] = queue
        request.pages = torch.empty(request.max_kv_tokens, self.layout.slots_per_token, dtype=torch.long)
        self.reserved += kv
        self.running.append(request)
        return True

    def _page(self, request: Request, num_tokens: int) -> None:
        """Make sure the first ``num_tokens`` tokens of ``request`` have slots (taken from its reservation)."""
        new = num_tokens - request.num_paged
        if new <= 0:
            return
        slots = self.pool.allocate(new * self.layout.slots_per_token, SlotOwner.KV)
        request.pages[request.num_paged : num_tokens] = slots.view(new, -1)
        request.num_paged = num_tokens
        self.reserved -= slots.numel()

    def finish(self, request: Request) -> None:
        """Remove a finished or aborted request and return its pages and promised slots to the pool."""
        if request in self.running:
            self.running.remove(request)
            self.pool.release(request.pages[: request.num_paged], SlotOwner.KV)
            self.reserved -= (request.max_kv_tokens - request.num_paged) * self.layout.slots_per_token
            if request.adapter is not None:
                self.residency.release(request.adapter)
        elif request.adapter in self.waiting:
            queue = self.waiting[request.adapter]
            queue.remove(request)
            if not queue:
                del self.waiting[request.adapter]
