"""Unified pool: accounting, pages returned after finish/abort, queueing when full, LRU, pinning, limits."""

from __future__ import annotations

import copy

import pytest
import torch

from lora_serve import AdapterError, Engine, EngineConfig, FinishReason, SamplingParams
from lora_serve.pool import PagePool, PoolExhausted, SlotOwner

GREEDY = SamplingParams(max_tokens=6, temperature=0)
PROMPTS = [[3, 4, 5, 6, 7, 8, 9, 10, 11], [20, 21], [30, 31, 32, 33, 34], [40] * 12, [50, 51, 52]]


def test_page_pool_accounting():
    pool = PagePool(10, 4, torch.float32, "cpu")
    kv = pool.allocate(3, SlotOwner.KV)
    adapter = pool.allocate(5, SlotOwner.ADAPTER)
    assert len(set(kv.tolist()) | set(adapter.tolist())) == 8  # no slot handed out twice
    stats = pool.stats()
    assert (stats.kv, stats.adapters, stats.free) == (3, 5, 2)
    with pytest.raises(PoolExhausted, match="asked for 3 slots for kv, only 2 free"):
        pool.allocate(3, SlotOwner.KV)
    pool.release(kv, SlotOwner.KV)
    pool.release(adapter, SlotOwner.ADAPTER)
    assert pool.stats().free == 10
    assert sorted(pool.allocate(10, SlotOwner.KV).tolist()) == list(range(10))


@pytest.fixture
def served(tmp_path, lora):
    """A tiny Llama, three saved adapters, and a factory for engines with a given pool size."""
    base = lora.tiny_model("llama")
    paths = {}
    for i, rank in enumerate((2, 8, 16)):
        paths[f"a{rank}"] = tmp_path / f"a{rank}"
        lora.save_adapter(base, paths[f"a{rank}"], rank, ["q_proj", "v_proj", "down_proj"], seed=i)

    def make(pool_slots: int, **options) -> Engine:
        engine = Engine(copy.deepcopy(base), config=EngineConfig(pool_slots=pool_slots, **options))
        for name, path in paths.items():
            engine.add_adapter(name, path)
        return engine

    return make, paths


def _jobs():
    names = ["a2", "a8", "a16", None]
    return [(names[i % 4], PROMPTS[i % len(PROMPTS)]) for i in range(10)]


def test_finished_and_aborted_requests_return_every_page(served):
    make, _ = served
    engine = make(20000, max_batch_size=4, max_batch_tokens=16)
    ids = [engine.submit(p, GREEDY, a) for a, p in _jobs()]
    engine.step()
    engine.step()
    engine.abort(ids[0])  # running
    engine.abort(ids[9])  # still waiting (batch size 4)
    reasons = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                reasons[out.request_id] = out.finish_reason
    assert reasons[ids[0]] == reasons[ids[9]] == FinishReason.ABORT
    assert len(reasons) == 10 and sum(r == FinishReason.ABORT for r in reasons.values()) == 2
    stats = engine.pool_stats()
    assert stats.kv == 0 and stats.free + stats.adapters == stats.total
    for info in engine.list_adapters():
        engine.remove_adapter(info.name)
    assert engine.pool_stats().free == engine.pool_stats().total


def test_pool_too_small_for_the_load_still_completes_everything(served):
    make, _ = served
    jobs = _jobs()
    roomy = make(20000).generate([p for _, p in jobs], GREEDY, [a for a, _ in jobs])
    # Slots: a16 takes 224, a request at most 34; 300 leave room for a16 and two requests at a time.
    tight = make(300, max_resident_adapters=2)
    ids = [tight.submit(p, GREEDY, a) for a, p in jobs]
    most_running, tokens = 0, {i: [] for i in ids}
    while tight.has_unfinished():
        for out in tight.step():
            tokens[out.request_id] += out.token_ids
        most_running = max(most_running, len(tight.scheduler.running))
    assert most_running < len(jobs)
    assert [tokens[i] for i in ids] == [r.token_ids for r in roomy]
    assert tight.pool_stats().kv == 0
    assert tight.stats().adapter_evictions > 0


def test_lru_eviction_spares_pinned_adapters(served):
    make, _ = served
    engine = make(20000, max_resident_adapters=2)
    engine.pin_adapter("a2")
    for name in ("a8", "a16", "a8"):
        engine.generate([PROMPTS[1]], GREEDY, name)
    # a2 is pinned; a8 and a16 took turns in the one remaining table row.
    assert engine.adapters.residency.resident_names() == ["a2", "a8"]
    assert [i.pinned for i in engine.list_adapters()] == [True, False, False]
    engine.pin_adapter("a2", pinned=False)
    engine.generate([PROMPTS[1]], GREEDY, "a16")
    assert engine.adapters.residency.resident_names() == ["a8", "a16"]  # least recently used (a2) went first


def test_adapter_larger_than_the_pool_is_rejected_clearly(served, tmp_path, lora):
    make, paths = served
    engine = make(400)  # rank 64 on q/k/v/o of 2 layers needs 64 * 2 * 4 * (1 + 1) = 1024 slots
    with pytest.raises(AdapterError, match="needs .* pool slots but the pool has only 400"):
        big = tmp_path / "big"
        lora.save_adapter(lora.tiny_model("llama"), big, 64, ["q_proj", "k_proj", "v_proj", "o_proj"], seed=9)
        engine.add_adapter("big", big)
    assert "big" not in [i.name for i in engine.list_adapters()]
    assert engine.generate([PROMPTS[0]], GREEDY, "a2")[0].finish_reason is not None


def test_request_larger_than_the_pool_is_rejected_clearly(served):
    make, _ = served
    engine = make(300)
    with pytest.raises(ValueError, match="pool has 300"):
        engine.submit(list(range(3, 153)), SamplingParams(max_tokens=50), "a16")
    assert not engine.has_unfinished()


@pytest.mark.parametrize("layers, kv_dim, width", [(3, 24, 100), (7, 48, 48), (30, 192, 576), (1, 5, 7)])
def test_kv_layout_round_trip_against_dense_storage(layers, kv_dim, width):
    """Every (token, layer, key/value) vector written through the layout reads back intact, none overlap."""
    from lora_serve.kv_layout import KVLayout

    layout = KVLayout(layers, kv_dim, width)
    tokens = 11
    pool = PagePool(tokens * layout.slots_per_token + 5, width, torch.float32, "cpu")
    pages = pool.allocate(tokens * layout.slots_per_token, SlotOwner.KV)[torch.randperm(tokens * layout.slots_per_token)]
    pages = pages.view(tokens, layout.slots_per_token)
    dense = torch.randn(layers, 2, tokens, kv_dim)  # the oracle: plain per-layer storage
    for layer in range(layers):
        layout.write(pool.slots, layer, dense[layer, 0], dense[layer, 1], pages)
    for layer in range(layers):
        key, value = layout.read(pool.slots, layer, pages[None])
        assert torch.equal(key[0], dense[layer, 0]) and torch.equal(value[0], dense[layer, 1])
    with pytest.raises(ValueError, match="exceeds the pool slot width"):
        KVLayout(2, width + 1, width)
