"""Run ``lora-serve`` in a subprocess and find free ports: shared by benchmarks, recipes and tests.

    with serve_in_subprocess(["--model", path, "--served-model-name", "base"]) as server:
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="none")...

The server is stopped on exit from the block, also after an error or Ctrl-C: nothing is left running.
``char_tokenizer()`` is a one-token-per-character tokenizer with a ChatML template, for tiny random models.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

__all__ = [
    "ServerProcess", "char_tokenizer", "free_port", "serve_in_subprocess", "start_server_process",
    "stop_server_process",
]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (a process started next may still lose it to another)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@dataclass
class ServerProcess:
    """A ``python -m lora_serve`` subprocess answering on ``url``."""

    process: subprocess.Popen
    url: str


def start_server_process(
    args: list[str], host: str = "127.0.0.1", timeout: float = 180, env: dict | None = None, stdout=None
) -> ServerProcess:
    """Start ``python -m lora_serve <args>`` on ``host`` and a free port; return once ``/health`` answers 200.

    ``env`` and ``stdout`` go to ``subprocess.Popen``. Raises ``RuntimeError`` if the process exits first
    and ``TimeoutError`` after ``timeout`` seconds; the process is stopped in both cases.
    """
    port = free_port(host)
    command = [sys.executable, "-m", "lora_serve", *args, "--host", host, "--port", str(port)]
    process = subprocess.Popen(command, env=env, stdout=stdout, stderr=subprocess.STDOUT if stdout else None)
    server = ServerProcess(process, f"http://{host}:{port}")
    deadline = time.monotonic() + timeout
    try:
        while process.poll() is None:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{server.url}/health", timeout=2).status_code == 200:
                    return server
            if time.monotonic() > deadline:
                raise TimeoutError(f"lora-serve did not answer {server.url}/health within {timeout} s")
            time.sleep(0.2)
        raise RuntimeError(f"lora-serve exited with code {process.returncode} before it was ready")
    except BaseException:
        stop_server_process(process)
        raise


def stop_server_process(process: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM (uvicorn's graceful shutdown), then SIGKILL if it is still running after ``timeout`` seconds."""
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextlib.contextmanager
def serve_in_subprocess(args: list[str], **options) -> Iterator[ServerProcess]:
    """``start_server_process(args, **options)`` for the duration of a ``with`` block, stopped on exit."""
    server = start_server_process(args, **options)
    try:
        yield server
    finally:
        stop_server_process(server.process)


SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2 as in the tiny configs
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def char_tokenizer(vocab_size: int = 211) -> PreTrainedTokenizerFast:
    """One token per character (newline, then printable characters) filling ``vocab_size``, plus ChatML markers.

    Every id decodes to text, so whatever a random model generates can be compared as text.
    """
    printable = (c for c in map(chr, range(32, 0x30000)) if c.isprintable())
    chars = ["\n"] + [next(printable) for _ in range(vocab_size - len(SPECIALS) - 1)]
    vocab = {token: i for i, token in enumerate(SPECIALS + chars)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        additional_special_tokens=SPECIALS[4:], chat_template=CHAT_TEMPLATE,
    )
