"""A request's life in the engine, and the outputs it streams."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from .detokenizer import Detokenizer
from .sampling import SamplingParams


class RequestTooLargeError(ValueError):
    """A request that can never run here: prompt + max_tokens exceed the model's context or the pool."""


class FinishReason(str, enum.Enum):
    """Why a request ended (OpenAI's names; ``abort`` for cancelled requests, ``error`` for a request the
    engine failed to serve: ``error`` on its output says why)."""

    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"
    ERROR = "error"


@dataclass
class RequestOutput:
    """What one step produced for one request: new token ids and the text that became safe to show."""

    request_id: str
    token_ids: list[int]
    text: str
    finished: bool
    finish_reason: FinishReason | None = None
    error: str | None = None  # with finish reason ``error``: what went wrong


@dataclass
class Completion:
    """A finished request as returned by ``Engine.generate``."""

    request_id: str
    adapter: str | None
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: FinishReason
    first_token_latency: float  # seconds from submission to the first token
    latency: float  # seconds from submission to the end
    error: str | None = None  # with finish reason ``error``: what went wrong


@dataclass(eq=False)
class Request:
    """Engine-internal state of one request. ``pages`` is its KV page table (``kv_layout.py``)."""

    request_id: str
    adapter: str | None
    prompt_ids: list[int]
    params: SamplingParams
    stop_ids: frozenset[int]
    detokenizer: Detokenizer
    generator: torch.Generator | None
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose keys/values are in the pool
    pages: torch.Tensor | None = None  # [max_kv_tokens, slots_per_token] once admitted
    num_paged: int = 0  # rows of ``pages`` that hold allocated slots
    finish_reason: FinishReason | None = None
    error: str | None = None
    arrival: float = field(default_factory=time.perf_counter)
    first_token_time: float | None = None

    @property
    def all_ids(self) -> list[int]:
        """Prompt followed by the generated tokens."""
        return self.prompt_ids + self.output_ids

    @property
    def max_kv_tokens(self) -> int:
        """Most tokens this request can ever have in the KV cache (its last token is never fed back)."""
        return len(self.prompt_ids) + self.params.max_tokens - 1

    @property
    def finished(self) -> bool:
        """Whether the request has ended."""
        return self.finish_reason is not None

    def append(self, token: int) -> RequestOutput:
        """Record a sampled token, decide whether the request is done, return this step's output."""
        if self.first_token_time is None:
            self.first_token_time = time.perf_counter()
        self.output_ids.append(token)
        if self.detokenizer.update(self.output_ids) or token in self.stop_ids:
            self.finish_reason = FinishReason.STOP
        elif len(self.output_ids) >= self.params.max_tokens:
            self.finish_reason = FinishReason.LENGTH
        return RequestOutput(
            self.request_id, [token], self.detokenizer.delta(self.finished), self.finished, self.finish_reason
        )

    def abort(self) -> RequestOutput:
        """Mark the request aborted; returns its final output (no new tokens)."""
        self.finish_reason = FinishReason.ABORT
        return RequestOutput(self.request_id, [], "", True, FinishReason.ABORT)

    def fail(self, error: Exception) -> RequestOutput:
        """Mark the request failed by ``error``; returns its final output (no new tokens)."""
        self.finish_reason = FinishReason.ERROR
        self.error = f"{type(error).__name__}: {error}"
        return RequestOutput(self.request_id, [], "", True, FinishReason.ERROR, self.error)

    def completion(self) -> Completion:
        """The finished request as a ``Completion``."""
        now = time.perf_counter()
        return Completion(
            request_id=self.request_id,
            adapter=self.adapter,
            prompt_token_ids=self.prompt_ids,
            token_ids=self.output_ids,
            text=self.detokenizer.text,
            finish_reason=self.finish_reason,
            first_token_latency=(self.first_token_time or now) - self.arrival,
            latency=now - self.arrival,
            error=self.error,
        )
