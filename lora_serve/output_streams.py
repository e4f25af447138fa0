"""``OutputStreams``: the asyncio side of an engine that steps elsewhere (a thread or a process).

Whatever drives the steps hands each step's outputs to ``publish`` (from any thread); they reach the
waiting coroutines in one event-loop callback per step and loop, not one wake-up per token: with 32 or
256 requests in a batch, per-token ``call_soon_threadsafe`` calls cost the engine a self-pipe write and the
event loop a wake-up each (measured in ``benchmarks/results/serve_http_profile.md``).

Subclasses (``AsyncEngine``, ``EngineProcess``) say how a request is submitted and aborted; this class owns
the per-request queues, ``stream()``, and failing every stream when the engine dies.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable, Iterable

from .request import RequestOutput
from .sampling import SamplingParams


class EngineDeadError(RuntimeError):
    """The engine's step loop (or its process) failed; the original exception is the ``__cause__``."""


class Rejected:
    """A submission the engine refused (unknown adapter, prompt too long...): ``stream()`` raises ``error``."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException):
        self.error = error


def _put_all(items: list[tuple[asyncio.Queue, object]]) -> None:
    for queue, item in items:
        queue.put_nowait(item)


class OutputStreams:
    """Per-request output queues fed by ``publish``; ``stream()`` submits a request and yields its outputs.

    ``on_failure(error)`` is called once (from the thread that noticed) if the engine dies.
    """

    def __init__(self, on_failure: Callable[[BaseException], None] | None = None):
        self.on_failure = on_failure
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._closed = False
        self._error: BaseException | None = None

    # ------------------------------------------------------------------ what subclasses provide
    def _submit(self, prompt, params: SamplingParams, adapter: str | None, request_id: str) -> None:
        """Hand the request to the engine; raise at once for bad input, or publish a ``Rejected`` later."""
        raise NotImplementedError

    def abort(self, request_id: str) -> None:
        """Abort a request (its stream ends with finish reason ``abort``)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ streams
    async def stream(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        adapter: str | None = None,
        request_id: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Submit a request and yield its ``RequestOutput``s until the one with ``finished=True``.

        Bad input raises ``KeyError`` / ``ValueError`` as in ``Engine.submit`` (before the first output).
        Leaving the loop early, or cancelling the task, aborts the request.
        """
        self._check_alive()
        request_id = request_id or f"req-{uuid.uuid4().hex}"
        queue: asyncio.Queue = asyncio.Queue()
        # Register before submitting: the engine may produce the first output immediately.
        self._streams[request_id] = (asyncio.get_running_loop(), queue)
        submitted = finished = False
        try:
            self._submit(prompt, params or SamplingParams(), adapter, request_id)
            submitted = True
            while not finished:
                item = await queue.get()
                if isinstance(item, Rejected):
                    submitted = False  # nothing to abort
                    raise item.error
                if isinstance(item, BaseException):
                    raise EngineDeadError("the engine failed") from item
                finished = item.finished
                yield item
        finally:
            self._streams.pop(request_id, None)
            if submitted and not finished:
                self.abort(request_id)

    async def generate(
        self, prompt: str | list[int], params: SamplingParams | None = None, adapter: str | None = None
    ) -> tuple[list[int], str, RequestOutput]:
        """Run one request to the end; return ``(token_ids, text, last_output)``."""
        token_ids, text = [], []
        async for output in self.stream(prompt, params, adapter):
            token_ids += output.token_ids
            text.append(output.text)
        return token_ids, "".join(text), output

    @property
    def error(self) -> BaseException | None:
        """The exception that stopped the engine, or None while it runs (for health checks)."""
        return self._error

    # ------------------------------------------------------------------ called by the stepping side
    def publish(self, outputs: Iterable[RequestOutput | tuple[str, Rejected]]) -> None:
        """Deliver one step's outputs (thread-safe): one ``call_soon_threadsafe`` per event loop.

        An item is a ``RequestOutput`` or ``(request_id, Rejected(error))``.
        """
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for item in outputs:
            request_id = item[0] if isinstance(item, tuple) else item.request_id
            entry = self._streams.get(request_id)
            if entry is not None:
                by_loop.setdefault(entry[0], []).append((entry[1], item[1] if isinstance(item, tuple) else item))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # that loop has closed: nobody is waiting there any more
                pass

    def fail(self, error: BaseException) -> None:
        """The engine died: every open stream raises ``EngineDeadError`` and ``on_failure`` is called."""
        if self._error is not None:
            return
        self._error = error
        if self.on_failure is not None:  # first: whoever sees a failed stream may look for the shutdown
            self.on_failure(error)
        for loop, queue in list(self._streams.values()):
            try:
                loop.call_soon_threadsafe(queue.put_nowait, error)
            except RuntimeError:
                pass

    def _check_alive(self) -> None:
        if self._error is not None:
            raise EngineDeadError("the engine failed") from self._error
        if self._closed:
            raise RuntimeError(f"{type(self).__name__} is closed")
