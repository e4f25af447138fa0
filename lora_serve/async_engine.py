"""``AsyncEngine``: stream tokens from an ``Engine`` to asyncio code (e.g. a FastAPI server).

A daemon thread runs ``engine.step()`` while there is work and sleeps otherwise; each step's outputs
are handed to the waiting coroutines through ``loop.call_soon_threadsafe``. Closing or cancelling a
stream (a client disconnecting) aborts its request, which frees its pool pages at the next step.

If a step raises, the thread logs the traceback, fails every open stream with ``EngineDeadError``,
calls ``on_failure`` (a server uses it to shut down, so a supervisor restarts the process) and stops.

The thread owns the engine's stepping: do not call ``engine.step()`` or ``engine.generate()`` yourself
while an ``AsyncEngine`` wraps it, or outputs meant for the streams are consumed there.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from .engine import AdapterInfo, Engine, EngineStats
from .request import RequestOutput
from .sampling import SamplingParams

logger = logging.getLogger(__name__)

class EngineDeadError(RuntimeError):
    """The step loop failed; the original exception is the ``__cause__``."""


class AsyncEngine:
    """Runs ``engine`` in a background thread; ``stream()`` yields each request's outputs as they come.

    ``on_failure(error)`` is called from the engine thread if the step loop dies.
    """

    def __init__(self, engine: Engine, on_failure: Callable[[BaseException], None] | None = None):
        self.engine = engine
        self._on_failure = on_failure
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._wake = threading.Event()
        self._closed = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="lora_serve-engine", daemon=True)
        self._thread.start()

    async def stream(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        adapter: str | None = None,
        request_id: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Submit a request and yield its ``RequestOutput``s until the one with ``finished=True``.

        Bad input raises at once (``KeyError`` / ``ValueError`` as in ``Engine.submit``). Leaving the
        loop early, or cancelling the task, aborts the request.
        """
        self._check_alive()
        request_id = request_id or f"req-{uuid.uuid4().hex}"
        queue: asyncio.Queue = asyncio.Queue()
        # Register before submitting: the engine thread may produce the first output immediately.
        self._streams[request_id] = (asyncio.get_running_loop(), queue)
        submitted = finished = False
        try:
            self.engine.submit(prompt, params, adapter, request_id)
            submitted = True
            self._wake.set()
            while not finished:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise EngineDeadError("the engine step loop failed") from item
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

    def abort(self, request_id: str) -> None:
        """Abort a request (its stream ends with finish reason ``abort``)."""
        self.engine.abort(request_id)
        self._wake.set()

    async def add_adapter(self, name: str, path: str | Path) -> AdapterInfo:
        """``Engine.add_adapter`` off the event loop (it reads files and waits for the current step)."""
        return await asyncio.to_thread(self.engine.add_adapter, name, path)

    async def remove_adapter(self, name: str, abort_requests: bool = False) -> None:
        """``Engine.remove_adapter`` off the event loop."""
        await asyncio.to_thread(self.engine.remove_adapter, name, abort_requests)
        self._wake.set()

    # What a server needs from the engine, without reaching through ``.engine``.
    @property
    def tokenizer(self):
        """The engine's tokenizer (None if it has none)."""
        return self.engine.tokenizer

    @property
    def vocab_size(self) -> int:
        """``Engine.vocab_size``."""
        return self.engine.vocab_size

    @property
    def max_context(self) -> int | None:
        """``Engine.max_context``."""
        return self.engine.max_context

    def has_adapter(self, name: str) -> bool:
        """``Engine.has_adapter`` (does not wait for a running step)."""
        return self.engine.has_adapter(name)

    def list_adapters(self) -> list[AdapterInfo]:
        """``Engine.list_adapters``; waits for a running step's lock, so call it off the event loop."""
        return self.engine.list_adapters()

    def stats(self) -> EngineStats:
        """``Engine.stats``; waits for a running step's lock."""
        return self.engine.stats()

    def close(self) -> None:
        """Stop the step loop (in-flight requests stay unfinished) and wait for the thread."""
        self._closed = True
        self._wake.set()
        self._thread.join()

    @property
    def error(self) -> BaseException | None:
        """The exception that stopped the step loop, or None while it runs (for health checks)."""
        return self._error

    def _check_alive(self) -> None:
        if self._error is not None:
            raise EngineDeadError("the engine step loop failed") from self._error
        if self._closed:
            raise RuntimeError("AsyncEngine is closed")

    def _deliver(self, request_id: str, item) -> None:
        entry = self._streams.get(request_id)
        if entry is not None:
            loop, queue = entry
            loop.call_soon_threadsafe(queue.put_nowait, item)

    def _loop(self) -> None:
        while not self._closed:
            if not self.engine.has_unfinished():
                self._wake.wait()
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except BaseException as err:  # a bug in a step: fail every stream loudly, not hang them
                logger.exception("the engine step loop failed; every request now fails")
                self._error = err
                for request_id in list(self._streams):
                    self._deliver(request_id, err)
                if self._on_failure is not None:
                    self._on_failure(err)
                return
            for output in outputs:
                self._deliver(output.request_id, output)
