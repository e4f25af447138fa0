"""``Engine``: one base model, many LoRA adapters, continuous batching over one unified page pool.

Each ``step()`` schedules a mixed batch (any adapters, base-model rows, prefill chunks and decodes),
runs the Hugging Face model once on the packed tokens — paged attention and batched LoRA are plugged
into the model's own modules — samples one token for every sequence that reached its end, and returns
the per-request outputs. ``generate()`` drives steps until its requests finish; ``AsyncEngine``
(``async_engine.py``) drives them from a background thread for streaming.

Thread safety: ``submit`` and ``abort`` only queue work and may be called from any thread while another
thread runs ``step``; adapter management and ``step`` serialise on one lock.

Failures: an exception while sampling or detokenizing one request ends that request alone, with finish
reason ``error`` (its pages are freed, the traceback is logged), and the step goes on for the others.
An exception anywhere else in a step (the model's forward, scheduling) propagates from ``step()``: it
is not one request's fault, and the engine's state is no longer known to be sound.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .adapter_store import AdapterError, AdapterStore, LinearShape
from .config import EngineConfig
from .detokenizer import Detokenizer
from .kv_layout import KVLayout
from .lora_layers import BatchedLoRALinear, LoRAContext, wrap_linear
from .model_loading import load_base_model
from .paged_attention import ATTENTION_NAME, BATCH_KWARG, AttentionBatch, ScheduledSequence
from .pool import PagePool, PoolStats
from .request import Completion, Request, RequestOutput, RequestTooLargeError
from .residency import AdapterResidency
from .sampling import SamplingParams, make_generator, sample
from .scheduler import Scheduler

logger = logging.getLogger(__name__)

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


@dataclass(frozen=True)
class EngineStats:
    """A snapshot for monitoring (e.g. Prometheus gauges): queue, batch, pool and adapter cache."""

    running: int
    waiting: int
    pool: PoolStats
    adapters_registered: int
    adapters_resident: int
    adapter_host_bytes: int  # host memory of the registered adapters' weights
    adapter_loads: int  # copies into the pool since start
    adapter_evictions: int


class AdapterInUseError(RuntimeError):
    """``remove_adapter`` was asked to remove an adapter that running or waiting requests use."""


class Engine:
    """Serve ``model`` (an HF causal LM object, an HF directory or a ``.gguf`` file) with many LoRA adapters.

    The engine takes ownership of a model object: it switches its attention implementation and wraps
    the linear layers adapters target. Pass a copy if you still need the original.
    """

    def __init__(self, model, tokenizer=None, config: EngineConfig | None = None):
        config = config or EngineConfig()
        if isinstance(model, (str, Path)):
            model, loaded_tokenizer = load_base_model(model, config.dtype or torch.float32)
            tokenizer = tokenizer or loaded_tokenizer
        if not isinstance(model, nn.Module) or not hasattr(model, "config"):
            raise TypeError(f"model must be a Hugging Face causal LM, a directory or a .gguf path, got {type(model)}")
        self.config = config
        self.tokenizer = tokenizer
        self.model = model.to(device=config.device or model.device, dtype=config.dtype or model.dtype).eval()
        self.model.set_attn_implementation(ATTENTION_NAME)

        text = model.config.get_text_config()
        width = text.hidden_size
        head_dim = getattr(text, "head_dim", None) or width // text.num_attention_heads
        dtype, device = self.model.dtype, self.model.device
        self.layout = KVLayout(text.num_hidden_layers, text.num_key_value_heads * head_dim, width)
        self.pool = PagePool(config.num_slots(width, dtype), width, dtype, device)
        output_layer = model.get_output_embeddings()
        linears = {
            name: LinearShape(m.in_features, m.out_features)
            for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and m is not output_layer
        }
        host_mb = config.adapter_host_mb
        self.store = AdapterStore(linears, dtype, None if host_mb is None else int(host_mb * 2**20))
        self._context = LoRAContext()
        self._layers: dict[str, BatchedLoRALinear] = {}
        self.residency = AdapterResidency(self.pool, self._layers, config.max_resident_adapters)
        self.scheduler = Scheduler(
            self.pool, self.layout, self.store, self.residency, config.max_batch_tokens, config.max_batch_size
        )
        eos = model.generation_config.eos_token_id if model.generation_config is not None else None
        if eos is None and tokenizer is not None:
            eos = tokenizer.eos_token_id
        self.eos_token_ids = frozenset([eos] if isinstance(eos, int) else (eos or []))
        self.max_context = getattr(text, "max_position_embeddings", None)

        self._lock = threading.RLock()
        self._inbox: deque[Request] = deque()  # deque append/popleft are atomic: safe across threads
        self._abort_ids: deque[str] = deque()
        self._pending: list[RequestOutput] = []  # outputs of requests ended outside a step (aborts)
        self._live: dict[str, Request] = {}
        self._ids = itertools.count()

    # ------------------------------------------------------------------ adapters
    def add_adapter(self, name: str, path: str | Path) -> AdapterInfo:
        """Register the PEFT LoRA adapter in directory ``path`` as ``name`` (validated against the base model).

        Raises ``AdapterError`` (a ``ValueError``) for a bad adapter, a taken name, or one that would exceed
        ``adapter_host_mb``; registered adapters are unaffected. Identical files share one copy in memory.
        """
        adapter = self.store.load(name, path)  # file IO and validation outside the lock
        with self._lock:
            for module in adapter.modules:
                if module not in self._layers:
                    capacity = self.config.max_resident_adapters
                    self._layers[module] = wrap_linear(self.model, module, self._context, self.pool.slots, capacity)
            needed = self.residency.slots_needed(adapter)
            if needed > self.pool.num_slots:
                raise AdapterError(
                    f"adapter {name!r} needs {needed} pool slots but the pool has only {self.pool.num_slots}; "
                    "enlarge the pool (pool_slots / pool_mb)"
                )
            self.store.add(adapter)
            return self._info(name)

    def remove_adapter(self, name: str, abort_requests: bool = False) -> None:
        """Unregister adapter ``name`` and free its pool slots.

        If requests use it, raise ``AdapterInUseError``, or with ``abort_requests=True`` abort them first
        (their streams end with finish reason ``abort``).
        """
        with self._lock:
            self.store.get(name)  # KeyError for an unknown name
            self._drain_inbox()
            users = self.scheduler.uses_adapter(name)
            if users and not abort_requests:
                raise AdapterInUseError(f"adapter {name!r} is used by {len(users)} request(s); abort them first")
            for request in users:
                self._end(request, aborted=True)
            self.residency.evict(name)
            self.store.remove(name)

    def pin_adapter(self, name: str, pinned: bool = True) -> None:
        """Load adapter ``name`` into the pool now and keep it there (``pinned=False`` makes it evictable)."""
        with self._lock:
            free = self.pool.num_free - self.scheduler.reserved
            self.residency.set_pinned(self.store.get(name), pinned, free)

    def list_adapters(self) -> list[AdapterInfo]:
        """All registered adapters with their rank, size and residency."""
        with self._lock:
            return [self._info(name) for name in self.store.names()]

    def _info(self, name: str) -> AdapterInfo:
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

    def pool_stats(self) -> PoolStats:
        """Pool accounting: slots used by KV, by adapters, and free."""
        return self.pool.stats()

    def stats(self) -> EngineStats:
        """Queue lengths, pool accounting and adapter-cache counters."""
        with self._lock:
            return EngineStats(
                running=len(self.scheduler.running),
                waiting=sum(len(q) for q in self.scheduler.waiting.values()) + len(self._inbox),
                pool=self.pool.stats(),
                adapters_registered=len(self.store.names()),
                adapters_resident=len(self.residency.resident_names()),
                adapter_host_bytes=self.store.host_bytes,
                adapter_loads=self.residency.loads,
                adapter_evictions=self.residency.evictions,
            )

    # ------------------------------------------------------------------ requests
    def submit(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        adapter: str | None = None,
        request_id: str | None = None,
    ) -> str:
        """Queue a request (text, or token ids) for ``adapter`` (None = base model); return its id.

        Raises ``KeyError`` for an unknown adapter and ``ValueError`` for a prompt that is empty or holds
        token ids outside the vocabulary; ``RequestTooLargeError`` (a ``ValueError``) when prompt +
        ``max_tokens`` exceed the model's context or could never fit in the pool.
        """
        return self._new_request(prompt, params or SamplingParams(), adapter, request_id).request_id

    def _new_request(self, prompt, params: SamplingParams, adapter, request_id) -> Request:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("text prompts need a tokenizer; pass token ids or give the engine a tokenizer")
            prompt_ids = self.tokenizer(prompt)["input_ids"]
        else:
            prompt_ids = [int(t) for t in prompt]
        if not prompt_ids:
            raise ValueError("prompt is empty")
        vocab = self.model.get_input_embeddings().num_embeddings
        bad = [t for t in prompt_ids if not 0 <= t < vocab]
        if bad:  # checked here: an out-of-range id would fail the whole step, and every request with it
            raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
        if adapter is not None and adapter not in self.store:
            raise KeyError(f"unknown adapter {adapter!r}; registered: {self.store.names()[:20]}")
        total = len(prompt_ids) + params.max_tokens
        if self.max_context is not None and total > self.max_context:
            raise RequestTooLargeError(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) = {total} exceeds the "
                f"model's context length {self.max_context}"
            )
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self._live:
            raise ValueError(f"request id {request_id!r} is already in use")
        stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self.eos_token_ids)
        request = Request(
            request_id=request_id,
            adapter=adapter,
            prompt_ids=prompt_ids,
            params=params,
            stop_ids=stop_ids,
            detokenizer=Detokenizer(self.tokenizer, params.stop),
            generator=make_generator(params, self.pool.slots.device),
        )
        self.scheduler.check_fits(request)
        self._live[request_id] = request
        self._inbox.append(request)
        return request

    def abort(self, request_id: str) -> None:
        """Cancel a request; takes effect at the next step, which reports it finished with reason ``abort``.

        Unknown or already finished ids are ignored (a request may finish while the abort is in flight).
        """
        self._abort_ids.append(request_id)

    def has_unfinished(self) -> bool:
        """Whether any submitted request has not finished yet, or has ended without being reported
        (an abort by ``remove_adapter``: the next ``step`` delivers it)."""
        return bool(self._live or self._pending)

    def generate(
        self,
        prompts: list[str | list[int]],
        params: SamplingParams | list[SamplingParams] | None = None,
        adapters: str | None | list[str | None] = None,
    ) -> list[Completion]:
        """Run ``prompts`` to completion (batched together, and with any other submitted work); block.

        ``params`` and ``adapters`` are one value for all prompts or one per prompt.
        """
        count = len(prompts)
        params_list = params if isinstance(params, list) else [params or SamplingParams()] * count
        adapter_list = adapters if isinstance(adapters, list) else [adapters] * count
        if len(params_list) != count or len(adapter_list) != count:
            raise ValueError(f"got {count} prompts, {len(params_list)} params and {len(adapter_list)} adapters")
        requests = [self._new_request(p, s, a, None) for p, s, a in zip(prompts, params_list, adapter_list)]
        while any(not r.finished for r in requests):
            self.step()
        return [r.completion() for r in requests]

    # ------------------------------------------------------------------ stepping
    def step(self) -> list[RequestOutput]:
        """Run one iteration: admit, run the model once on the mixed batch, sample, retire finished requests."""
        with self._lock:
            self._drain_inbox()
            outputs, self._pending = self._pending, []
            batch = self.scheduler.schedule()
            if batch:
                outputs += self._run(batch)
            return outputs

    def _drain_inbox(self) -> None:
        while self._inbox:
            self.scheduler.add(self._inbox.popleft())
        while self._abort_ids:
            request = self._live.get(self._abort_ids.popleft())
            if request is not None:
                self._end(request, aborted=True)

    def _end(self, request: Request, aborted: bool = False) -> None:
        if aborted:
            self._pending.append(request.abort())
        self.scheduler.finish(request)
        self._live.pop(request.request_id, None)

    def _run(self, batch: list[tuple[Request, int]]) -> list[RequestOutput]:
        ids, positions, rows, sequences, last_rows, sampled = [], [], [], [], [], []
        # Pack each adapter's rows side by side (stable, so arrival order holds within an adapter): the
        # LoRA layers then see one contiguous run of rows per adapter.
        keyed = sorted(
            ((self.residency.index_of(r.adapter) if r.adapter else -1, r, c) for r, c in batch), key=lambda t: t[0]
        )
        for adapter, request, count in keyed:
            start = request.num_computed
            ids += request.all_ids[start : start + count]
            positions += range(start, start + count)
            rows += [adapter] * count
            sequences.append(ScheduledSequence(start, count, request.pages))
            if start + count == len(request.all_ids):  # the whole context is in: sample the next token
                last_rows.append(len(ids) - 1)
                sampled.append(request)
        device = self.pool.slots.device
        self._context.set_rows(rows, device)
        try:
            with torch.inference_mode():
                logits = self.model(
                    input_ids=torch.tensor([ids], device=device),
                    position_ids=torch.tensor([positions], device=device),
                    use_cache=False,
                    logits_to_keep=torch.tensor(last_rows, dtype=torch.long, device=device),
                    **{BATCH_KWARG: AttentionBatch.build(self.pool.slots, self.layout, sequences)},
                ).logits[0]
        finally:
            self._context.clear()
        for request, count in batch:
            request.num_computed += count
        tokens = sample(logits, [r.params for r in sampled], [r.generator for r in sampled])
        outputs = []
        for request, token in zip(sampled, tokens):
            try:
                if isinstance(token, Exception):
                    raise token
                outputs.append(request.append(token))
            except Exception as err:  # this request alone ends; the batch and the engine go on
                logger.exception("request %s failed and was removed from the batch", request.request_id)
                outputs.append(request.fail(err))
            if request.finished:
                self._end(request)
        return outputs
