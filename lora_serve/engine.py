"""``Engine``: one base model, many LoRA adapters, continuous batching over one unified page pool.

Each ``step()`` schedules a mixed batch (any adapters, base-model rows, prefill chunks and decodes),
has the ``ModelRunner`` (``model_runner.py``) run the Hugging Face model once on the packed tokens —
paged attention and batched LoRA are plugged into the model's own modules — samples one token for every
sequence that reached its end, and returns the per-request outputs. Adapters are the
``AdapterManager``'s (``adapter_manager.py``); the engine owns the requests and the step loop.
``generate()`` drives steps until its requests finish; ``AsyncEngine`` (``async_engine.py``) drives them
from a background thread for streaming.

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
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .adapter_manager import AdapterInfo, AdapterManager
from .collection import CompressedCollection
from .config import EngineConfig
from .detokenizer import Detokenizer
from .model_loading import load_base_model
from .model_runner import ModelRunner
from .pool import PoolStats
from .request import Completion, Request, RequestOutput, RequestTooLargeError
from .sampling import SamplingParams, make_generator, sample
from .scheduler import Scheduler

logger = logging.getLogger(__name__)

__all__ = ["AdapterInUseError", "AdapterInfo", "Engine", "EngineStats", "StepReport"]


@dataclass(frozen=True)
class StepReport:
    """A step's inference work, for background work that runs after it (``Engine.attach_background``)."""

    inference_tokens: int  # tokens the step's forward processed
    inference_seconds: float  # time the forward, sampling and detokenizing took
    running: int  # requests running after the step
    waiting: int  # requests that could not be admitted
    max_batch_tokens: int


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
        self.runner = ModelRunner(model, config)
        self.adapters = AdapterManager(self.runner, config)
        pool = self.runner.pool
        self.scheduler = Scheduler(
            pool, self.runner.layout, self.adapters.store, self.adapters.residency,
            config.max_batch_tokens, config.max_batch_size,
        )  # fmt: skip
        eos = model.generation_config.eos_token_id if model.generation_config is not None else None
        if eos is None and tokenizer is not None:
            eos = tokenizer.eos_token_id
        self.eos_token_ids = frozenset([eos] if isinstance(eos, int) else (eos or []))

        self._lock = threading.RLock()
        self._inbox: deque[Request] = deque()  # deque append/popleft are atomic: safe across threads
        self._abort_ids: deque[str] = deque()
        self._pending: list[RequestOutput] = []  # outputs of requests ended outside a step (aborts)
        self._live: dict[str, Request] = {}
        self._ids = itertools.count()
        self.background = None  # e.g. a fine_tuning.FineTuner: run after each step's inference work

    # ------------------------------------------------------------------ what a server needs
    @property
    def model(self) -> nn.Module:
        """The served base model (owned by the engine: attention switched, adapted linears wrapped)."""
        return self.runner.model

    @property
    def vocab_size(self) -> int:
        """Size of the input vocabulary: valid token ids are ``[0, vocab_size)``."""
        return self.runner.vocab_size

    @property
    def max_context(self) -> int | None:
        """The model's context length (prompt + generated tokens), None if its config does not say."""
        return self.runner.max_context

    def has_adapter(self, name: str) -> bool:
        """Whether an adapter is registered as ``name``."""
        return name in self.adapters

    # ------------------------------------------------------------------ adapters
    def add_adapter(self, name: str, path: str | Path) -> AdapterInfo:
        """Register the PEFT LoRA adapter in directory ``path`` as ``name`` (validated against the base model).

        Raises ``AdapterError`` (a ``ValueError``) for a bad adapter, a taken name, or one that would exceed
        ``adapter_host_mb``; registered adapters are unaffected. Identical files share one copy in memory.
        """
        adapter = self.adapters.load(name, path)  # file IO and validation outside the lock
        with self._lock:
            return self.adapters.register(adapter)

    def add_adapter_collection(self, path: str | Path) -> list[AdapterInfo]:
        """Register every adapter of the compressed collection in directory ``path`` (``python -m
        lora_serve.compress``) under its own name, served from its group's shared bases.

        Raises ``AdapterError`` for a bad collection, one compressed for another base, a taken name or no
        room in the pool for the bases; nothing is registered then.
        """
        collection = CompressedCollection.load(path)  # file IO outside the lock
        with self._lock:
            return self.adapters.register_collection(
                collection, str(path), self.runner.pool.num_free - self.scheduler.reserved
            )

    def remove_adapter(self, name: str, abort_requests: bool = False) -> None:
        """Unregister adapter ``name`` and free its pool slots.

        If requests use it, raise ``AdapterInUseError``, or with ``abort_requests=True`` abort them first
        (their streams end with finish reason ``abort``).
        """
        with self._lock:
            self.adapters.info(name)  # KeyError for an unknown name
            self._drain_inbox()
            users = self.scheduler.uses_adapter(name)
            if users and not abort_requests:
                raise AdapterInUseError(f"adapter {name!r} is used by {len(users)} request(s); abort them first")
            for request in users:
                self._end(request, aborted=True)
            self.adapters.unregister(name)

    def pin_adapter(self, name: str, pinned: bool = True) -> None:
        """Load adapter ``name`` into the pool now and keep it there (``pinned=False`` makes it evictable)."""
        with self._lock:
            self.adapters.pin(name, pinned, self.runner.pool.num_free - self.scheduler.reserved)

    def list_adapters(self) -> list[AdapterInfo]:
        """All registered adapters with their rank, size and residency."""
        with self._lock:
            return [self.adapters.info(name) for name in self.adapters.names()]

    def pool_stats(self) -> PoolStats:
        """Pool accounting: slots used by KV, by adapters, and free."""
        return self.runner.pool.stats()

    def stats(self) -> EngineStats:
        """Queue lengths, pool accounting and adapter-cache counters."""
        with self._lock:
            residency = self.adapters.residency
            return EngineStats(
                running=len(self.scheduler.running),
                waiting=sum(len(q) for q in self.scheduler.waiting.values()) + len(self._inbox),
                pool=self.runner.pool.stats(),
                adapters_registered=len(self.adapters.names()),
                adapters_resident=len(residency.resident_names()),
                adapter_host_bytes=self.adapters.store.host_bytes,
                adapter_loads=residency.loads,
                adapter_evictions=residency.evictions,
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
        vocab = self.vocab_size
        bad = [t for t in prompt_ids if not 0 <= t < vocab]
        if bad:  # checked here: an out-of-range id would fail the whole step, and every request with it
            raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
        if adapter is not None and adapter not in self.adapters:
            raise KeyError(f"unknown adapter {adapter!r}; registered: {self.adapters.names()[:20]}")
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
            generator=make_generator(params, self.runner.pool.slots.device),
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

    # ------------------------------------------------------------------ background work
    def attach_background(self, worker) -> None:
        """Run ``worker.after_step(StepReport)`` at the end of every step, under the engine's lock (so it may
        use the model between forwards); ``worker.has_work()`` makes step loops step without requests (``wants_step``), and
        ``wake_background`` calls ``worker.wake()``."""
        self.background = worker

    def wants_step(self) -> bool:
        """Whether a step loop should step: a request is unfinished, or the background worker has work."""
        return self.has_unfinished() or (self.background is not None and self.background.has_work())

    def wake_background(self) -> None:
        """Tell the background worker there is news (e.g. a new fine-tuning job); no-op without one."""
        if self.background is not None:
            self.background.wake()

    # ------------------------------------------------------------------ stepping
    def step(self) -> list[RequestOutput]:
        """Run one iteration: admit, run the model once on the mixed batch, sample, retire finished requests;
        then the background worker's turn, if one is attached."""
        with self._lock:
            self._drain_inbox()
            outputs, self._pending = self._pending, []
            batch = self.scheduler.schedule()
            start = time.perf_counter()
            if batch:
                outputs += self._run(batch)
            if self.background is not None:
                waiting = sum(len(q) for q in self.scheduler.waiting.values())
                self.background.after_step(StepReport(
                    sum(count for _, count in batch), time.perf_counter() - start, len(self.scheduler.running),
                    waiting, self.config.max_batch_tokens,
                ))  # fmt: skip
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
        logits, sampled = self.runner.execute(batch, self.adapters.index_of)
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
