"""The character tokenizer (``lora_serve.testing.char_tokenizer``) and a real uvicorn server on 127.0.0.1 run in a
background thread (so tests can read the engine's pool accounting directly).

Under ``--import-mode=importlib`` test modules cannot import this file, so helpers come as fixtures.
"""

from __future__ import annotations

import socket
import threading
import time
import types
from dataclasses import dataclass

import httpx
import openai
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from lora_serve import Engine
from lora_serve.server import ServerConfig, create_app
from lora_serve.testing import char_tokenizer

API_KEY = "test-key"


@dataclass
class RunningServer:
    """A uvicorn server serving ``engine`` on ``url`` from a daemon thread."""

    url: str
    engine: Engine
    server: uvicorn.Server
    thread: threading.Thread

    def openai(self, api_key: str = API_KEY) -> openai.OpenAI:
        """An ``openai`` client for this server (bounded: no retries, 60 s timeout)."""
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=60)

    def async_openai(self) -> openai.AsyncOpenAI:
        """The asyncio ``openai`` client, for many concurrent requests."""
        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)

    def http(self) -> httpx.Client:
        """A plain HTTP client (no credentials) for what the openai client cannot send."""
        return httpx.Client(base_url=self.url, timeout=60)

    def metric(self, name: str, **labels: str) -> float:
        """One sample of ``/metrics`` (0 when absent, as for a counter never incremented)."""
        with self.http() as http:
            text = http.get("/metrics").text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    return sample.value
        return 0.0

    def wait_until_idle(self, timeout: float = 30) -> None:
        """Wait until the engine has no request and no KV page in use (aborts land at the next step)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            stats = self.engine.stats()
            if (stats.running, stats.waiting, stats.pool.kv) == (0, 0, 0) and not self.engine.has_unfinished():
                return
            time.sleep(0.02)
        raise AssertionError(f"engine still busy after {timeout} s: {self.engine.stats()}")

    def stop(self) -> None:
        """Shut down (as on SIGTERM) and wait for the thread."""
        self.server.should_exit = True
        self.thread.join(timeout=30)
        assert not self.thread.is_alive(), "server did not stop"


def start_server(engine: Engine, config: ServerConfig, shutdown_timeout: float = 5) -> RunningServer:
    """Serve ``engine`` on a free loopback port; returns once the server accepts connections.

    On ``stop()`` in-flight requests get ``shutdown_timeout`` seconds to finish before they are cancelled.
    """
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # bound before uvicorn starts, so no other process can take the port
    server = uvicorn.Server(
        uvicorn.Config(create_app(engine, config), log_level="warning", timeout_graceful_shutdown=shutdown_timeout)
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    host, port = sock.getsockname()
    return RunningServer(f"http://{host}:{port}", engine, server, thread)


@pytest.fixture(scope="session")
def serve():
    """Helpers: ``serve.char_tokenizer()``, ``serve.start_server(engine, config)``, ``serve.API_KEY``."""
    return types.SimpleNamespace(
        char_tokenizer=char_tokenizer, start_server=start_server, API_KEY=API_KEY, ServerConfig=ServerConfig
    )
