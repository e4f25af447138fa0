"""AsyncEngine: concurrent streams equal the blocking engine; leaving a stream aborts it and frees its pages."""

from __future__ import annotations

import asyncio
import copy

import pytest

from lora_serve import AsyncEngine, Engine, EngineConfig, FinishReason, SamplingParams

PROMPTS = [[5, 17, 33, 9, 41, 77], [8, 19], [44, 45, 46, 47, 48, 49, 50, 51, 52]]


@pytest.fixture
def engines(tmp_path, lora):
    base = lora.tiny_model("qwen2")
    lora.save_adapter(base, tmp_path / "a", 8, ["q_proj", "v_proj", "up_proj"], seed=3)

    def make():
        engine = Engine(copy.deepcopy(base), config=EngineConfig(pool_slots=5000, max_batch_tokens=16))
        engine.add_adapter("a", tmp_path / "a")
        return engine

    blocking, streaming = make(), AsyncEngine(make())
    yield blocking, streaming
    streaming.close()


def test_concurrent_streams_match_generate(engines):
    blocking, streaming = engines
    greedy = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    adapters = ["a", None, "a"]
    expected = [c.token_ids for c in blocking.generate(PROMPTS, greedy, adapters)]

    async def run():
        results = await asyncio.gather(*(streaming.generate(p, greedy, a) for p, a in zip(PROMPTS, adapters)))
        return [tokens for tokens, _, _ in results]

    assert asyncio.run(run()) == expected


def test_leaving_a_stream_aborts_the_request_and_frees_its_pages(engines):
    _, streaming = engines
    long = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)

    async def run():
        outputs = []
        stream = streaming.stream(PROMPTS[0], long, "a")
        async for output in stream:
            outputs.append(output)
            if len(outputs) == 3:
                break
        await stream.aclose()  # what a server does when the client disconnects
        # The abort takes effect at the next step, which this second request forces.
        finished = [o async for o in streaming.stream(PROMPTS[1], SamplingParams(max_tokens=2), None)]
        return outputs, finished

    outputs, finished = asyncio.run(run())
    assert len(outputs) == 3 and not outputs[-1].finished
    assert finished[-1].finish_reason == FinishReason.LENGTH
    stats = streaming.engine.stats()
    assert (stats.running, stats.waiting, stats.pool.kv) == (0, 0, 0)
    assert not streaming.engine.has_unfinished()


def test_bad_request_raises_in_the_caller(engines):
    _, streaming = engines

    async def run():
        async for _ in streaming.stream(PROMPTS[0], None, "missing"):
            pass

    with pytest.raises(KeyError, match="unknown adapter"):
        asyncio.run(run())
