"""Fixtures for multi-process tests: spawn N gloo-ready workers on a free loopback port."""

from __future__ import annotations

import socket

import pytest

from tests import launch


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def spawn():
    """`spawn(worker, nprocs, *args)` runs `worker(rank, port, *args)` in `nprocs` processes and waits.

    Workers must be module-level functions (they are pickled by name) and call
    `dist.init_process_group("gloo", ...)` with MASTER_ADDR=127.0.0.1 and the given port.
    """
    def run(worker, nprocs: int, *args) -> None:
        launch.spawn(worker, nprocs, (_free_port(), *args))  # from a preloaded fork server (tests/launch.py)

    return run
