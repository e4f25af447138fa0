"""``python -m lora_serve`` as a user runs it: a YAML config plus flags, an adapter root, a startup log,
the openai client, and a SIGTERM that lets the in-flight stream finish before the process exits.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import openai
import pytest

from lora_serve.cli import parse_args
from lora_serve.server.adapters import find_adapters
from tests.lora_serve.server.step_injection import FAILING_STEP, SLOW_STEP, inject

REPO = Path(__file__).resolve().parents[3]


def test_config_file_gives_defaults_that_flags_override(tmp_path):
    config = tmp_path / "serve.yaml"
    config.write_text("model: /models/x.gguf\nmax-batch-tokens: 512\nport: 9000\nadapters:\n  sql: /a/sql\n")
    args = parse_args(["--config", str(config), "--port", "9100", "--adapter", "chat=/a/chat"])
    assert (args.model, args.max_batch_tokens, args.port) == ("/models/x.gguf", 512, 9100)
    assert args.adapters == [("sql", "/a/sql"), ("chat", "/a/chat")]
    config.write_text("max_batch_tokenz: 5\n")
    with pytest.raises(SystemExit):
        parse_args(["--config", str(config)])


def test_engine_threads_default_leaves_a_core_to_the_server_and_follows_omp(monkeypatch, capsys):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cores = len(os.sched_getaffinity(0))
    assert parse_args(["--model", "m"]).engine_threads == max(1, cores - 1)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert parse_args(["--model", "m"]).engine_threads == 3
    with pytest.raises(SystemExit):
        parse_args(["--model", "m", "--engine-threads", "0"])
    assert "--engine-threads 0: expected at least 1" in capsys.readouterr().err


def test_find_adapters_names_them_by_relative_path(tmp_path):
    for name in ("a", "team/b", "team/c/v2"):
        (tmp_path / name).mkdir(parents=True)
        (tmp_path / name / "adapter_config.json").write_text("{}")
    (tmp_path / "not-an-adapter").mkdir()
    assert list(find_adapters(tmp_path)) == ["a", "team/b", "team/c/v2"]


def _read_lines(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line)


def _launch(command: list[str], pythonpath: str = str(REPO)) -> tuple[subprocess.Popen, queue.Queue, list[str], int]:
    """Start a lora-serve command line and wait for uvicorn: (process, output lines, log so far, port)."""
    process = subprocess.Popen(command, cwd=REPO, env={**os.environ, "PYTHONPATH": pythonpath},
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_read_lines, args=(process.stdout, lines), daemon=True).start()
    log, port, deadline = [], None, time.monotonic() + 120
    try:
        while port is None:
            log.append(lines.get(timeout=max(deadline - time.monotonic(), 0.1)))
            port = re.search(r"Uvicorn running on http://127\.0\.0\.1:(\d+)", log[-1])
    except BaseException:
        process.kill()
        process.wait()
        raise
    return process, lines, log, int(port[1])


def _stop(process: subprocess.Popen, lines: queue.Queue, log: list[str]) -> str:
    """Kill `process` if it still runs; the whole log."""
    if process.poll() is None:
        process.kill()
        process.wait()
    while not lines.empty():
        log.append(lines.get())
    return "".join(log)


@pytest.mark.slow  # a lora-serve process
def test_cli_serves_adapters_and_shuts_down_gracefully(tmp_path, lora, serve):
    base = lora.tiny_model("llama")
    base.save_pretrained(tmp_path / "model")
    tokenizer = serve.char_tokenizer()
    tokenizer.save_pretrained(tmp_path / "model")
    lora.save_adapter(base, tmp_path / "root" / "a", 8, ["q_proj", "v_proj"], seed=1)
    lora.save_adapter(base, tmp_path / "elsewhere" / "b", 4, ["o_proj"], seed=2)
    config = tmp_path / "serve.yaml"
    config.write_text(
        f"model: {tmp_path / 'model'}\npool_slots: 4000\nadapters:\n  b: {tmp_path / 'elsewhere' / 'b'}\n"
    )

    command = [sys.executable, "-m", "lora_serve", "--config", str(config), "--adapter-root", str(tmp_path / "root"),
               "--port", "0", "--api-key", "secret", "--served-model-name", "tiny"]
    process, lines, log, port = _launch(command)
    try:
        startup = "".join(log)
        assert "2 adapters registered" in startup and "pool 4000 slots" in startup, startup

        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="secret", max_retries=0, timeout=60)
        assert {m.id for m in client.models.list()} == {"tiny", "a", "b"}
        prompt_ids = tokenizer("Hi")["input_ids"]
        expected = lora.peft_generate(base, tmp_path / "root" / "a", prompt_ids, 8)
        answer = client.completions.create(model="a", prompt="Hi", max_tokens=8, temperature=0)
        assert answer.choices[0].text == tokenizer.decode(expected, skip_special_tokens=True)

        stream = client.completions.create(model="b", prompt="Hi", max_tokens=240, temperature=0, stream=True,
                                           extra_body={"ignore_eos": True}, stream_options={"include_usage": True})
        next(stream)
        process.send_signal(signal.SIGTERM)
        chunks = list(stream)
        assert chunks[-1].usage.completion_tokens == 240  # finished, not cut off
        # uvicorn re-raises the signal once its graceful shutdown is done, so the exit status is SIGTERM's.
        assert process.wait(timeout=60) == -signal.SIGTERM
    finally:
        shutdown = _stop(process, lines, log)
    assert "Waiting for connections to close" in shutdown  # the stream was in flight at SIGTERM
    assert "Application shutdown complete" in shutdown  # the lifespan stopped the engine process


def test_a_bad_adapter_under_the_root_is_skipped_unless_strict(tmp_path, lora, caplog):
    from lora_serve.cli import build_engine

    base = lora.tiny_model("llama")
    base.save_pretrained(tmp_path / "model")
    lora.save_adapter(base, tmp_path / "root" / "good", 4, ["q_proj"], seed=1)
    (tmp_path / "root" / "bad").mkdir()
    (tmp_path / "root" / "bad" / "adapter_config.json").write_bytes(b"[1, 2]")
    argv = ["--model", str(tmp_path / "model"), "--adapter-root", str(tmp_path / "root"), "--pool-slots", "4000"]
    with caplog.at_level("WARNING", logger="lora_serve"):
        engine = build_engine(parse_args(argv))
    assert [a.name for a in engine.list_adapters()] == ["good"]
    assert "skipping adapter 'bad'" in caplog.text and "must hold a JSON object" in caplog.text
    with pytest.raises(SystemExit, match="cannot serve adapter 'bad'.*must hold a JSON object"):
        build_engine(parse_args([*argv, "--strict-adapters"]))


@pytest.mark.slow  # a lora-serve process
@pytest.mark.parametrize("mode", [[], ["--engine-thread"]], ids=["engine-process", "engine-thread"])
def test_the_process_exits_non_zero_with_a_traceback_when_the_step_loop_dies(tmp_path, lora, mode):
    base = lora.tiny_model("llama")
    base.save_pretrained(tmp_path / "model")
    command = [sys.executable, "-m", "lora_serve", "--model", str(tmp_path / "model"), "--pool-slots", "4000",
               "--port", "0", "--served-model-name", "tiny", *mode]
    process, lines, log, port = _launch(command, pythonpath=inject(tmp_path, FAILING_STEP))
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=60)
        with pytest.raises(openai.APIStatusError) as failed:
            client.completions.create(model="tiny", prompt=[5, 6, 7], max_tokens=2)
        assert failed.value.status_code == 503 and "engine has failed" in str(failed.value)
        assert process.wait(timeout=60) == 1  # a supervisor sees the failure and restarts the server
    finally:
        output = _stop(process, lines, log)
    assert "Traceback" in output and "RuntimeError: injected step failure" in output, output
    assert "exiting: the engine failed" in output, output


def _spawned_children(pid: int) -> list[int]:
    """The multiprocessing children ``pid`` started, other than its resource tracker (Linux ``/proc``)."""
    tasks = Path(f"/proc/{pid}/task")
    children = [int(child) for task in tasks.iterdir() for child in (task / "children").read_text().split()]
    return [c for c in children if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]


@pytest.mark.slow  # a lora-serve process
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the engine process through Linux /proc")
def test_a_killed_engine_process_gives_503s_and_the_server_exits(tmp_path, lora, serve):
    base = lora.tiny_model("llama")
    base.save_pretrained(tmp_path / "model")
    serve.char_tokenizer().save_pretrained(tmp_path / "model")  # text, so that every token streams a chunk
    command = [sys.executable, "-m", "lora_serve", "--model", str(tmp_path / "model"), "--pool-slots", "4000",
               "--port", "0", "--served-model-name", "tiny", "--shutdown-timeout", "5"]
    process, lines, log, port = _launch(command, pythonpath=inject(tmp_path, SLOW_STEP))
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=60)
        stream = client.completions.create(model="tiny", prompt=[5, 6, 7], max_tokens=240, stream=True,
                                           extra_body={"ignore_eos": True})
        next(stream)
        (engine_pid,) = _spawned_children(process.pid)
        os.kill(engine_pid, signal.SIGKILL)  # as the OOM killer would
        with pytest.raises(openai.APIError, match="engine has failed"):  # an error event ends the stream
            list(stream)
        assert process.wait(timeout=60) == 1  # no hang: the server shuts itself down
    finally:
        output = _stop(process, lines, log)
    assert "exiting: the engine failed" in output and "exited with code -9" in output, output
