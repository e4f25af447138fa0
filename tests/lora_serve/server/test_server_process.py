"""``lora_serve.testing``: the subprocess server helper that benchmarks and the demo share."""

from __future__ import annotations

import httpx
import pytest

from lora_serve.testing import free_port, serve_in_subprocess, start_server_process

pytestmark = pytest.mark.slow  # starts server or engine processes: `make test`, not `make test-fast`


def test_serve_in_subprocess_answers_then_leaves_nothing_running(tmp_path, lora, serve):
    base = lora.tiny_model("llama")
    base.save_pretrained(tmp_path / "model")
    serve.char_tokenizer().save_pretrained(tmp_path / "model")
    lora.save_adapter(base, tmp_path / "a", 4, ["q_proj"], seed=1)
    args = ["--model", str(tmp_path / "model"), "--pool-slots", "4000", "--served-model-name", "tiny",
            f"--adapter=a={tmp_path / 'a'}", "--log-level", "warning"]
    with serve_in_subprocess(args, timeout=120) as server:
        models = httpx.get(f"{server.url}/v1/models", timeout=30).json()
        assert [m["id"] for m in models["data"]] == ["tiny", "a"]
        assert server.process.poll() is None
    assert server.process.poll() is not None  # stopped on leaving the block
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{server.url}/health", timeout=2)


def test_a_server_that_cannot_start_raises_and_is_reaped(tmp_path):
    with pytest.raises(RuntimeError, match="lora-serve exited with code 2 before it was ready"):
        start_server_process(["--no-such-flag"], timeout=60)
    port = free_port()
    assert 0 < port < 65536
