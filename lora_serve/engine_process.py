"""``EngineProcess``: the engine's step loop in its own process, streamed to asyncio code in this one.

Why a process: an engine thread shares the GIL with the server's event loop, so every millisecond of HTTP
work (parsing, validation, JSON, SSE) is a millisecond the engine does not step, and the two convoy on the
GIL at every torch op (``benchmarks/results/serve_http_profile.md``). In its own process the engine steps
on its own core while the API process serves HTTP, as vLLM's engine core does.

The wire: two one-way pipes. Commands go to the engine process (``submit``, ``abort``, ``call`` for adapter
management and stats, ``close``); it answers with one message per step holding every output of that step,
plus replies, rejections and, if a step raises, ``dead``. A reader thread here receives them and hands a
step's outputs to the event loop in one callback (``OutputStreams.publish``). Detokenisation and stop
strings stay in the engine (they end requests there, freeing their pages in the same step; the profile
puts them under 1% of its time).

Failure: if the engine process dies (a step raises, it is killed, it runs out of memory) every open stream
raises ``EngineDeadError``, pending calls raise it, and ``on_failure`` is called, so a server answers 503
and shuts down instead of hanging. The engine process ignores SIGINT/SIGTERM (the API process drains
requests, then closes it) and exits when the API process goes away (its command pipe closes).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import multiprocessing
import os
import pickle
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import tqdm

from .engine import AdapterInfo, Engine, EngineStats
from .output_streams import EngineDeadError, OutputStreams, Rejected
from .sampling import SamplingParams

logger = logging.getLogger(__name__)

__all__ = ["EngineProcess"]

_CALLS = frozenset({"add_adapter", "remove_adapter", "list_adapters", "stats", "wake_background"})  # what ``call`` may run


@dataclass(frozen=True)
class _EngineInfo:
    """What the API process needs to know about the engine without asking it each time."""

    tokenizer: object
    vocab_size: int
    max_context: int | None
    adapters: tuple[str, ...]


def _portable(error: BaseException) -> BaseException:
    """``error`` if it survives pickling (to be raised as itself in the API process), else a RuntimeError."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:  # noqa: BLE001 - any exception type may refuse to pickle
        return RuntimeError(f"{type(error).__name__}: {error}")


def _handle(engine: Engine, message: tuple, outputs) -> bool:
    """Carry out one command; False for ``close``."""
    kind = message[0]
    if kind == "submit":
        _, request_id, prompt, params, adapter = message
        try:
            engine.submit(prompt, params, adapter, request_id)
        except Exception as err:  # bad input: that request alone is refused
            outputs.send(("rejected", request_id, _portable(err)))
    elif kind == "abort":
        engine.abort(message[1])
    elif kind == "call":
        _, call_id, method, args = message
        try:
            outputs.send(("reply", call_id, True, getattr(engine, method)(*args)))
        except Exception as err:  # the caller gets it raised (AdapterError, AdapterInUseError, KeyError...)
            outputs.send(("reply", call_id, False, _portable(err)))
    elif kind == "close":
        return False
    return True


def _exit_at_once() -> None:
    """End the engine process without the interpreter's teardown, which garbage-collects the whole engine
    (3.9 s for SmolLM2 on a loaded 2-core machine; once in ``make demo`` longer than ``close``'s 30 s):
    nothing here needs finalising, and the OS takes the memory back at once."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _engine_main(factory: Callable[[], Engine], commands, outputs) -> None:
    """The engine process: build the engine, then step while there is work and serve commands between steps."""
    # The API process owns shutdown (it drains requests first): a Ctrl-C or a SIGTERM sent to the whole
    # process group must not kill the engine under requests that are still being drained.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # tqdm's default lock (for the weight-loading bars) holds a multiprocessing semaphore that only the
    # interpreter's teardown releases; _exit_at_once skips that teardown, so use a thread lock instead.
    tqdm.tqdm.set_lock(threading.RLock())
    try:
        engine = factory()
        names = tuple(a.name for a in engine.list_adapters())
        outputs.send(("ready", _EngineInfo(engine.tokenizer, engine.vocab_size, engine.max_context, names)))
    except BaseException as err:  # noqa: BLE001 - startup failures, SystemExit included, go to the parent
        outputs.send(("failed", _portable(err)))
        return
    while True:
        try:
            # Background work (a fine-tuning job) keeps the loop stepping, between commands, like requests.
            if not engine.wants_step() or commands.poll():
                if not _handle(engine, commands.recv(), outputs):  # blocks only when there is no work
                    _exit_at_once()
                continue  # every queued command before the next step
            step = engine.step()
        except EOFError:  # the API process is gone
            _exit_at_once()
        except BaseException as err:  # noqa: BLE001 - a step failed: the engine's state is unknown
            logger.exception("the engine step loop failed; every request now fails")
            outputs.send(("dead", _portable(err)))
            return
        if step:
            outputs.send(("step", step))


class EngineProcess(OutputStreams):
    """An ``AsyncEngine`` whose engine runs in a child process built by ``factory()`` (picklable, e.g. a
    module-level function or a ``functools.partial`` of one; it is called in the child).

    Blocks until the engine is ready; raises what ``factory`` raised (``SystemExit`` included) or
    ``RuntimeError`` if the process dies first, ``TimeoutError`` after ``start_timeout`` seconds.
    ``on_failure(error)`` is called from the reader thread if the engine process dies.
    """

    def __init__(self, factory: Callable[[], Engine], on_failure: Callable[[BaseException], None] | None = None,
                 start_timeout: float = 600):
        super().__init__(on_failure)
        context = multiprocessing.get_context("spawn")  # no fork of a process that has threads and torch state
        command_reader, self._commands = context.Pipe(duplex=False)
        self._outputs, output_writer = context.Pipe(duplex=False)
        self.process = context.Process(target=_engine_main, args=(factory, command_reader, output_writer),
                                       name="lora_serve-engine", daemon=True)
        self.process.start()
        # Our copies of the child's ends closed: EOF reaches each side as soon as the other one exits.
        command_reader.close()
        output_writer.close()
        self._info = self._wait_ready(start_timeout)
        self._adapters = set(self._info.adapters)  # kept here: has_adapter is asked on the event loop
        self._send_lock = threading.Lock()
        self._calls: dict[int, concurrent.futures.Future] = {}
        self._call_ids = itertools.count()
        self._reader = threading.Thread(target=self._read, name="lora_serve-engine-outputs", daemon=True)
        self._reader.start()

    def _wait_ready(self, timeout: float) -> _EngineInfo:
        try:
            if not self._outputs.poll(timeout):
                raise TimeoutError(f"the engine process was not ready within {timeout} s")
            kind, payload = self._outputs.recv()
        except (EOFError, OSError, TimeoutError) as err:
            self._stop_process(0)
            if isinstance(err, TimeoutError):
                raise
            code = self.process.exitcode
            raise RuntimeError(f"the engine process exited (code {code}) before it was ready") from None
        if kind == "failed":
            self._stop_process(5)
            raise payload
        return payload

    # ------------------------------------------------------------------ requests
    def _submit(self, prompt, params: SamplingParams, adapter: str | None, request_id: str) -> None:
        self._send(("submit", request_id, prompt, params, adapter))

    def abort(self, request_id: str) -> None:
        """Abort a request (its stream ends with finish reason ``abort``); ignored once the engine is gone."""
        try:
            self._send(("abort", request_id))
        except EngineDeadError:
            pass

    # ------------------------------------------------------------------ adapters and monitoring
    async def add_adapter(self, name: str, path: str | Path) -> AdapterInfo:
        """``Engine.add_adapter`` in the engine process (between two steps)."""
        info = await asyncio.wrap_future(self._call("add_adapter", name, path))
        self._adapters.add(name)
        return info

    async def remove_adapter(self, name: str, abort_requests: bool = False) -> None:
        """``Engine.remove_adapter`` in the engine process."""
        await asyncio.wrap_future(self._call("remove_adapter", name, abort_requests))
        self._adapters.discard(name)

    def wake_background(self) -> None:
        """``Engine.wake_background`` in the engine process (not waited for)."""
        self._call("wake_background")

    def list_adapters(self, timeout: float | None = 60) -> list[AdapterInfo]:
        """``Engine.list_adapters``; blocks for a round trip (and a running step), so call it off the event loop."""
        return self._call("list_adapters").result(timeout)

    def stats(self, timeout: float | None = 60) -> EngineStats:
        """``Engine.stats``; blocks like ``list_adapters``."""
        return self._call("stats").result(timeout)

    def has_adapter(self, name: str) -> bool:
        """Whether ``name`` is registered (answered here, without a round trip)."""
        return name in self._adapters

    @property
    def tokenizer(self):
        """The engine's tokenizer, a copy in this process (None if it has none)."""
        return self._info.tokenizer

    @property
    def vocab_size(self) -> int:
        """``Engine.vocab_size``."""
        return self._info.vocab_size

    @property
    def max_context(self) -> int | None:
        """``Engine.max_context``."""
        return self._info.max_context

    # ------------------------------------------------------------------ lifecycle
    def close(self, timeout: float = 30) -> None:
        """Stop the engine process (in-flight requests stay unfinished) and the reader thread."""
        self._closed = True
        try:
            self._send(("close",))
        except EngineDeadError:
            pass
        self._stop_process(timeout)
        self._reader.join(timeout=timeout)

    def _stop_process(self, timeout: float) -> None:
        self.process.join(timeout)
        if self.process.is_alive():
            logger.warning("the engine process did not stop within %s s; terminating it", timeout)
            self.process.kill()
            self.process.join()
        self._commands.close()

    def _send(self, message: tuple) -> None:
        if self._error is not None:
            raise EngineDeadError("the engine failed") from self._error
        try:
            with self._send_lock:  # the event loop and worker threads (stats, list_adapters) all send
                self._commands.send(message)
        except (OSError, ValueError) as err:  # broken pipe, or closed by close()
            raise EngineDeadError("the engine process is not running") from err

    def _call(self, method: str, *args) -> concurrent.futures.Future:
        assert method in _CALLS, method
        future: concurrent.futures.Future = concurrent.futures.Future()
        call_id = next(self._call_ids)
        self._calls[call_id] = future
        try:
            self._send(("call", call_id, method, args))
        except EngineDeadError as err:
            self._calls.pop(call_id, None)
            future.set_exception(err)
        return future

    def _read(self) -> None:
        """Reader thread: one message per step (or reply) from the engine process, dispatched at once."""
        cause: BaseException | None = None
        try:
            while True:
                kind, *payload = self._outputs.recv()
                if kind == "step":
                    self.publish(payload[0])
                elif kind == "rejected":
                    self.publish([(payload[0], Rejected(payload[1]))])
                elif kind == "reply":
                    call_id, ok, value = payload
                    future = self._calls.pop(call_id)
                    future.set_result(value) if ok else future.set_exception(value)
                elif kind == "dead":
                    cause = payload[0]
                    return
        except (EOFError, OSError):  # the process exited or was killed
            self.process.join(5)
            cause = RuntimeError(f"the engine process exited with code {self.process.exitcode}")
        except Exception as err:  # noqa: BLE001 - a message this side cannot handle: fail loudly, not hang
            logger.exception("lost the connection to the engine process")
            cause = err
        finally:
            if not self._closed and cause is not None:
                dead = EngineDeadError(f"the engine failed: {cause!r}")
                dead.__cause__ = cause
                for future in list(self._calls.values()):
                    future.set_exception(dead)
                self._calls.clear()
                self.fail(cause)
