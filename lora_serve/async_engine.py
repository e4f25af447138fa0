"""``AsyncEngine``: stream tokens from an ``Engine`` to asyncio code, the engine stepping in a thread.

A daemon thread runs ``engine.step()`` while there is work and sleeps otherwise; each step's outputs reach
the waiting coroutines in one event-loop callback (``OutputStreams.publish``). Closing or cancelling a
stream (a client disconnecting) aborts its request, which frees its pool pages at the next step.

The thread shares the GIL with the event loop; a server that must not lose engine throughput to its HTTP
work runs the engine in its own process instead (``EngineProcess``, what ``lora-serve`` does).

If a step raises, the thread logs the traceback, fails every open stream with ``EngineDeadError``,
calls ``on_failure`` (a server uses it to shut down, so a supervisor restarts the process) and stops.

The thread owns the engine's stepping: do not call ``engine.step()`` or ``engine.generate()`` yourself
while an ``AsyncEngine`` wraps it, or outputs meant for the streams are consumed there.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from pathlib import Path

from .engine import AdapterInfo, Engine, EngineStats
from .output_streams import EngineDeadError, OutputStreams
from .sampling import SamplingParams

logger = logging.getLogger(__name__)

__all__ = ["AsyncEngine", "EngineDeadError"]


class AsyncEngine(OutputStreams):
    """Runs ``engine`` in a background thread; ``stream()`` yields each request's outputs as they come.

    ``on_failure(error)`` is called from the engine thread if the step loop dies.
    """

    def __init__(self, engine: Engine, on_failure: Callable[[BaseException], None] | None = None):
        super().__init__(on_failure)
        self.engine = engine
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="lora_serve-engine", daemon=True)
        self._thread.start()

    def _submit(self, prompt, params: SamplingParams, adapter: str | None, request_id: str) -> None:
        self.engine.submit(prompt, params, adapter, request_id)
        self._wake.set()

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

    def wake_background(self) -> None:
        """``Engine.wake_background``, and wake the step loop so it scans at once."""
        self.engine.wake_background()
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

    def _loop(self) -> None:
        while not self._closed:
            if not self.engine.wants_step():
                self._wake.wait()
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except BaseException as err:  # a bug in a step: fail every stream loudly, not hang them
                logger.exception("the engine step loop failed; every request now fails")
                self.fail(err)
                return
            if outputs:
                self.publish(outputs)
