"""Adapter bookkeeping of the server: finding adapters under a root directory, confining run-time loads
to it, and draining an adapter's in-flight requests before it is unloaded.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import APIError

_PEFT_CONFIG = "adapter_config.json"


def find_adapters(root: str | Path) -> dict[str, Path]:
    """Every PEFT adapter directory below ``root``, named by its path relative to ``root`` (``a``, ``team/b``)."""
    root = Path(root)
    if not root.is_dir():
        raise NotADirectoryError(f"adapter root {root} is not a directory")
    found = sorted(config.parent for config in root.rglob(_PEFT_CONFIG))
    return {path.relative_to(root).as_posix(): path for path in found if path != root}


def resolve_under_root(root: Path | None, path: str) -> Path:
    """``path`` (absolute, or relative to ``root``) as a resolved adapter directory inside ``root``.

    Resolving follows symlinks and ``..`` first, so neither can lead a client outside the root. Errors
    never name the root or echo the path: 403 when loading is disabled or the path leads outside the
    root, 400 for a NUL byte, 404 when no PEFT adapter is there (or can be: a name too long for the OS).
    """
    if root is None:
        raise APIError(
            403, "loading adapters at run time is disabled; start the server with --adapter-root",
            param="lora_path", code="adapter_loading_disabled",
        )
    root = root.resolve()
    try:
        resolved = (root / path).resolve()
        found = (resolved / _PEFT_CONFIG).is_file()
    except ValueError:  # a NUL byte
        raise APIError(400, "lora_path cannot hold a NUL byte", param="lora_path", code="invalid_path") from None
    except OSError:  # a name too long, a symlink loop...: no adapter can be there
        found = resolved = None
    if resolved is not None and not resolved.is_relative_to(root):
        raise APIError(403, "lora_path lies outside the adapter root", param="lora_path", code="path_not_allowed")
    if not found:
        raise APIError(404, f"no PEFT adapter ({_PEFT_CONFIG}) at lora_path under the adapter root",
                       param="lora_path", code="adapter_not_found")
    return resolved


class AdapterUsage:
    """The server's in-flight requests per adapter, so an unload can refuse new ones, wait for the running
    ones and abort those still running at its deadline.

    Used from the event loop only, so it needs no lock.
    """

    def __init__(self):
        self._active: dict[str, set[str]] = {}
        self._idle: dict[str, asyncio.Event] = {}
        self._draining: set[str] = set()

    @contextmanager
    def hold(self, name: str | None, request_id: str) -> Iterator[None]:
        """Mark request ``request_id`` of adapter ``name`` (None: the base model, not tracked) in flight."""
        if name is None:
            yield
            return
        if name in self._draining:
            raise APIError(404, f"adapter {name!r} is being unloaded", param="model", code="model_not_found")
        self._active.setdefault(name, set()).add(request_id)
        try:
            yield
        finally:
            self._active[name].discard(request_id)
            if not self._active[name]:
                del self._active[name]
                if name in self._idle:
                    self._idle.pop(name).set()

    @contextmanager
    def draining(self, name: str) -> Iterator[None]:
        """Refuse new requests for ``name`` while inside (claimed by one unload at a time)."""
        if name in self._draining:
            raise APIError(409, f"adapter {name!r} is already being unloaded", param="lora_name")
        self._draining.add(name)
        try:
            yield
        finally:
            self._draining.discard(name)

    async def wait_idle(self, name: str, timeout: float) -> set[str]:
        """Wait up to ``timeout`` seconds for ``name``'s requests to finish; return the ids still running."""
        if name in self._active:
            idle = self._idle.setdefault(name, asyncio.Event())
            try:
                await asyncio.wait_for(idle.wait(), timeout)
            except TimeoutError:
                pass
        return set(self._active.get(name, ()))
