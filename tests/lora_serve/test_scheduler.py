"""Continuous batching: the token budget holds every step, adapters take turns, requests join and leave."""

from __future__ import annotations

import copy

import pytest

from lora_serve import Engine, EngineConfig, SamplingParams


@pytest.fixture
def engine(tmp_path, lora):
    base = lora.tiny_model("llama")
    for name in ("busy", "quiet"):
        lora.save_adapter(base, tmp_path / name, 4, ["q_proj"], seed=len(name))
    engine = Engine(copy.deepcopy(base), config=EngineConfig(pool_slots=8000, max_batch_tokens=12, max_batch_size=3))
    engine.add_adapter("busy", tmp_path / "busy")
    engine.add_adapter("quiet", tmp_path / "quiet")
    return engine


def _run_recording(engine: Engine) -> list[list[tuple[str, int]]]:
    """Step to the end, recording each step's (request id, tokens) as the scheduler picked them."""
    steps, schedule = [], engine.scheduler.schedule

    def recording():
        batch = schedule()
        steps.append([(r.request_id, n) for r, n in batch])
        return batch

    engine.scheduler.schedule = recording
    while engine.has_unfinished():
        engine.step()
    return steps


def test_token_budget_and_batch_size_hold_every_step(engine):
    ids = [engine.submit(list(range(3, 3 + n)), SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
           for n in (30, 5, 1, 9, 2)]
    steps = _run_recording(engine)
    assert all(sum(n for _, n in step) <= 12 and len(step) <= 3 for step in steps)
    # The 30-token prompt is prefilled in chunks while other requests decode beside it.
    assert [n for step in steps for rid, n in step if rid == ids[0]][:3] == [12, 12, 6]
    assert engine.pool_stats().kv == 0


def test_adapters_take_turns_at_admission(engine):
    params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    busy = [engine.submit([5, 6, 7], params, "busy") for _ in range(6)]
    quiet = engine.submit([5, 6, 7], params, "quiet")
    base = engine.submit([5, 6, 7], params, None)
    steps = _run_recording(engine)
    first_step = {rid for rid, _ in steps[0]}
    # Three slots, three adapters with waiting work (incl. the base model): one each, not three busy ones.
    assert first_step == {busy[0], quiet, base}
    assert not engine.has_unfinished()
