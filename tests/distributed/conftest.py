"""Fixtures for multi-process tests: spawn N gloo-ready workers on a free loopback port."""

from __future__ import annotations

import pytest

from lora_serve.testing import free_port
from tests import launch


@pytest.fixture
def spawn():
    """`spawn(worker, nprocs, *args)` runs `worker(rank, port, *args)` in `nprocs` processes and waits.

    Workers must be module-level functions (they are pickled by name) and call
    `dist.init_process_group("gloo", ...)` with MASTER_ADDR=127.0.0.1 and the given port.
    """
    def run(worker, nprocs: int, *args) -> None:
        launch.spawn(worker, nprocs, (free_port(), *args))  # from a preloaded fork server (tests/launch.py)

    return run
