"""``EngineProcess``: the engine in a spawned process streams the same greedy tokens as the in-process
``Engine``; bad requests raise the engine's own errors here; leaving a stream aborts it; adapters load and
unload across the process boundary; a dead engine process fails streams and calls instead of hanging.
"""

from __future__ import annotations

import asyncio
import functools
import os
import signal
import time

import pytest

from lora_serve import (
    AdapterError,
    AdapterInUseError,
    Engine,
    EngineConfig,
    EngineDeadError,
    EngineProcess,
    FinishReason,
    SamplingParams,
)
from lora_serve.cli import parse_args, start_engine
from lora_serve.request import RequestTooLargeError

pytestmark = pytest.mark.slow  # starts server or engine processes: `make test`, not `make test-fast`

PROMPTS = [[5, 17, 33, 9, 41, 77], [8, 19], [44, 45, 46, 47, 48, 49, 50, 51, 52]]
GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
LONG = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def files(tmp_path_factory, lora):
    """A tiny Llama saved as an HF directory and two PEFT adapters (``b`` is only loaded at run time)."""
    root = tmp_path_factory.mktemp("engine_process")
    base = lora.tiny_model("llama")
    base.save_pretrained(root / "model")
    lora.save_adapter(base, root / "a", 8, ["q_proj", "v_proj", "up_proj"], seed=3)
    lora.save_adapter(base, root / "b", 4, ["o_proj"], seed=4)
    return root


def _factory(root, *extra: str):
    """What ``lora-serve`` hands its engine process: ``start_engine`` of parsed command-line options."""
    args = parse_args(["--model", str(root / "model"), "--pool-slots", "4000", "--max-batch-tokens", "16",
                       "--log-level", "warning", *extra])
    return functools.partial(start_engine, args, "tiny")


@pytest.fixture(scope="module")
def remote(files):
    engine = EngineProcess(_factory(files, f"--adapter=a={files / 'a'}"), start_timeout=300)
    yield engine
    engine.close()


def _oracle(files, prompts, adapters) -> list[list[int]]:
    """The same engine options in this process, run with the blocking ``Engine.generate``."""
    engine = Engine(str(files / "model"), config=EngineConfig(pool_slots=4000, max_batch_tokens=16))
    for name in {a for a in adapters if a}:
        engine.add_adapter(name, files / name)
    return [c.token_ids for c in engine.generate(prompts, GREEDY, adapters)]


def _wait_idle(engine: EngineProcess, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while (stats := engine.stats()).running or stats.waiting or stats.pool.kv:
        assert time.monotonic() < deadline, f"engine still busy: {stats}"
        time.sleep(0.05)


def test_concurrent_streams_equal_the_in_process_engine(remote, files):
    adapters = ["a", None, "a"]
    expected = _oracle(files, PROMPTS, adapters)
    assert expected[0] != _oracle(files, PROMPTS[:1], [None])[0]  # the adapter matters

    async def run():
        return await asyncio.gather(*(remote.generate(p, GREEDY, a) for p, a in zip(PROMPTS, adapters)))

    results = asyncio.run(run())
    assert [tokens for tokens, _, _ in results] == expected
    assert all(last.finish_reason is FinishReason.LENGTH for _, _, last in results)


def test_bad_requests_raise_the_engines_errors(remote):
    async def consume(prompt, params, adapter):
        async for _ in remote.stream(prompt, params, adapter):
            pass

    with pytest.raises(KeyError, match="unknown adapter 'missing'"):
        asyncio.run(consume(PROMPTS[0], GREEDY, "missing"))
    with pytest.raises(RequestTooLargeError, match="exceeds the model's context length"):
        asyncio.run(consume(PROMPTS[0], SamplingParams(max_tokens=10_000), None))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        asyncio.run(consume([10**6], GREEDY, None))
    assert remote.error is None  # refusing requests does not hurt the engine


def test_leaving_a_stream_aborts_the_request_and_frees_its_pages(remote):
    async def run():
        outputs = []
        stream = remote.stream(PROMPTS[0], LONG, "a")
        async for output in stream:
            outputs.append(output)
            if len(outputs) == 3:
                break
        await stream.aclose()  # what a server does when the client disconnects
        return outputs

    outputs = asyncio.run(run())
    assert len(outputs) == 3 and not outputs[-1].finished
    _wait_idle(remote)


def test_adapters_load_and_unload_across_the_process_boundary(remote, files):
    info = asyncio.run(remote.add_adapter("b", files / "b"))
    assert (info.name, info.max_rank) == ("b", 4) and remote.has_adapter("b")
    assert {a.name for a in remote.list_adapters()} == {"a", "b"}
    tokens, _, _ = asyncio.run(remote.generate(PROMPTS[1], GREEDY, "b"))
    assert tokens == _oracle(files, PROMPTS[1:2], ["b"])[0]
    with pytest.raises(AdapterError, match="already registered|taken|exists"):
        asyncio.run(remote.add_adapter("b", files / "b"))

    async def unload_while_running():
        stream = remote.stream(PROMPTS[0], LONG, "b")
        await anext(stream)
        with pytest.raises(AdapterInUseError, match="used by 1 request"):
            await remote.remove_adapter("b")
        await remote.remove_adapter("b", abort_requests=True)
        return [output async for output in stream]

    rest = asyncio.run(unload_while_running())
    assert rest[-1].finish_reason is FinishReason.ABORT
    assert not remote.has_adapter("b") and {a.name for a in remote.list_adapters()} == {"a"}
    _wait_idle(remote)


async def _drain(stream) -> None:
    async for _ in stream:
        pass


def test_a_killed_engine_process_fails_streams_and_calls_instead_of_hanging(files):
    failures = []
    engine = EngineProcess(_factory(files), on_failure=failures.append, start_timeout=300)
    try:
        async def run():
            stream = engine.stream(PROMPTS[0], SamplingParams(max_tokens=240, ignore_eos=True), None)
            await anext(stream)
            os.kill(engine.process.pid, signal.SIGKILL)  # as the OOM killer would
            with pytest.raises(EngineDeadError):  # after the outputs that were already on their way
                await asyncio.wait_for(_drain(stream), 60)  # fails, does not hang

        asyncio.run(run())
        assert len(failures) == 1 and "exited with code -9" in str(failures[0]), failures
        with pytest.raises(EngineDeadError):
            engine.stats(timeout=60)
        with pytest.raises(EngineDeadError):
            asyncio.run(engine.generate(PROMPTS[1], GREEDY))
    finally:
        start = time.monotonic()
        engine.close()
        assert time.monotonic() - start < 30  # closing a dead engine does not wait for it


def test_a_factory_that_fails_raises_its_error_here(files):
    with pytest.raises(SystemExit, match="cannot serve adapter 'x'"):
        EngineProcess(_factory(files, f"--adapter=x={files / 'nowhere'}"), start_timeout=300)
