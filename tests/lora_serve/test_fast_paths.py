"""The engine's fast paths against their oracles: pool-view vs gathered LoRA weights, the SGMV (Triton)
path, unmasked equal-length decodes, and the pool's run allocator."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from kernels import LoRASegments, PagedLoRA, use_backend
from lora_serve import Engine, EngineConfig, SamplingParams
from lora_serve.kv_layout import KVLayout
from lora_serve.lora_layers import BatchedLoRALinear
from lora_serve.paged_attention import AttentionBatch, ScheduledSequence
from lora_serve.pool import PagePool, PoolExhausted, SlotOwner
from lora_serve.step_batch import ActiveStep

TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]  # down_proj: 96 inputs span two 64-wide slots
PROMPTS = [[5, 17, 33, 9, 41, 77, 12], [8, 19, 3], [120, 44, 45, 46], [7, 90, 91, 92, 93]]
NEW_TOKENS = 6


def _weight_kinds(engine: Engine) -> set[str]:
    """How the torch implementation reads the resident adapters' weights: 'view' (of the pool) and/or 'gather'."""
    pool = engine.runner.pool.slots.untyped_storage().data_ptr()
    kinds = set()
    for layer in engine.runner.lora_layers.values():
        for index in range(layer.capacity):
            weights = layer.adapter_weights(index)
            for matrix in weights[:2] if weights else ():
                kinds.add("view" if matrix.untyped_storage().data_ptr() == pool else "gather")
    return kinds


@pytest.mark.parametrize("scatter", [False, True], ids=["pool-views", "scattered-slots"])
def test_lora_weights_as_views_or_gathered_match_peft(scatter, tmp_path, lora):
    """Adapters in one run of slots are used as pool views, scattered ones are gathered: both equal PEFT."""
    base = lora.tiny_model("llama")
    for seed, rank in enumerate((3, 8)):
        lora.save_adapter(base, tmp_path / f"r{rank}", rank, TARGETS, seed=seed)
    engine = Engine(copy.deepcopy(base), config=EngineConfig(pool_slots=6000, max_batch_tokens=9))
    if scatter:  # hand adapters shuffled slots, as a long-running pool with churned KV pages might
        pool = engine.runner.pool
        pool.allocate_run = lambda n, owner: pool.allocate(n, owner)[torch.randperm(n)]
    for rank in (3, 8):
        engine.add_adapter(f"r{rank}", tmp_path / f"r{rank}")
    adapters = ["r3", "r8", None, "r8"]
    results = engine.generate(PROMPTS, SamplingParams(max_tokens=NEW_TOKENS, temperature=0), adapters)
    assert _weight_kinds(engine) == ({"gather"} if scatter else {"view"})
    for prompt, adapter, result in zip(PROMPTS, adapters, results):
        expected = (
            lora.hf_generate(base, prompt, NEW_TOKENS)
            if adapter is None
            else lora.peft_generate(base, tmp_path / adapter, prompt, NEW_TOKENS)
        )
        assert result.token_ids == expected, f"adapter={adapter}"


@pytest.mark.parametrize("a_run", [True, False])
@pytest.mark.parametrize("b_run", [True, False])
def test_layer_with_any_mix_of_viewed_and_gathered_weights(a_run, b_run):
    """One wrapped layer (in 70 > D=32: A spans 3 slots per rank-row, with a ragged last one) against the
    dense formula y = x W^T + b + scale * x A^T B^T, rows of two adapters interleaved with base rows."""
    torch.manual_seed(0)
    base = torch.nn.Linear(70, 40)
    pool = torch.zeros(400, 32)
    active = ActiveStep()
    layer = BatchedLoRALinear(base, active, PagedLoRA(pool, 70, 40, capacity=3))
    tables, weights = layer.lora, {}
    for index, (rank, first) in enumerate([(2, 10), (5, 200)]):
        a, b = torch.randn(rank, 70), torch.randn(40, rank)
        slots = torch.arange(first, first + tables.slots_needed(rank))
        split = rank * tables.chunks_in
        if not a_run:
            slots[:split] = slots[:split].flip(0)
        if not b_run:
            slots[split:] = slots[split:].flip(0)
        pool[slots] = tables.pack(a, b)
        tables.set_adapter(index, slots, rank, scale=0.5 + index)
        weights[index] = (a, b, 0.5 + index)
    rows = [1, 1, -1, 0, 0, 0, -1, 1]  # not packed by adapter: the segments gather and scatter rows
    x = torch.randn(len(rows), 70)
    with torch.no_grad(), active.running(SimpleNamespace(lora=LoRASegments(rows, 3))):
        got = layer(x)
        expected = base(x)
        for row, adapter in enumerate(rows):
            if adapter >= 0:
                a, b, scale = weights[adapter]
                expected[row] += scale * (x[row] @ a.t() @ b.t())
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)  # fp32, sums of 70 terms


def test_sgmv_backend_in_the_engine_matches_peft(tmp_path, lora):
    """The GPU path (one lora_shrink/lora_expand per layer over the row -> adapter map), run by the Triton
    interpreter on CPU, in the engine against PEFT (the CPU path never calls it)."""
    base = lora.tiny_model("llama", num_hidden_layers=1)
    lora.save_adapter(base, tmp_path / "r4", 4, ["q_proj", "v_proj"], seed=3)
    engine = Engine(copy.deepcopy(base), config=EngineConfig(pool_slots=3000))
    engine.add_adapter("r4", tmp_path / "r4")
    prompts = PROMPTS[:3]
    with use_backend("triton"):
        results = engine.generate(prompts, SamplingParams(max_tokens=3, temperature=0), ["r4", None, "r4"])
    assert results[0].token_ids == lora.peft_generate(base, tmp_path / "r4", prompts[0], 3)
    assert results[1].token_ids == lora.hf_generate(base, prompts[1], 3)
    assert results[2].token_ids == lora.peft_generate(base, tmp_path / "r4", prompts[2], 3)


@pytest.mark.parametrize("family", ["llama", "mistral"])  # mistral: sliding window 6 < context, mask needed
def test_equal_length_decodes_match_hf(family, lora):
    """Same-length prompts decode without a mask (all keys visible), unless a window cuts in."""
    base = lora.tiny_model(family)
    engine = Engine(copy.deepcopy(base), config=EngineConfig(pool_slots=3000))
    prompts = [[5, 17, 33, 9, 41, 77, 12, 150], [8, 19, 3, 4, 5, 6, 7, 8], [120, 44, 45, 46, 47, 48, 49, 50]]
    results = engine.generate(prompts, SamplingParams(max_tokens=NEW_TOKENS, temperature=0))
    for prompt, result in zip(prompts, results):
        assert result.token_ids == lora.hf_generate(base, prompt, NEW_TOKENS)


def test_decode_mask_is_none_only_when_every_key_is_visible():
    layout = KVLayout(num_layers=2, kv_dim=8, slot_width=16)
    pool = torch.zeros(100, 16)
    pages = torch.arange(40).view(20, 2)

    def batch(*lengths):
        return AttentionBatch.build(pool, layout, [ScheduledSequence(n - 1, 1, pages) for n in lengths])

    assert batch(5, 5).decode_mask(None) is None
    assert batch(5, 5).decode_mask(5) is None  # a window as long as the context hides nothing
    windowed = batch(5, 5).decode_mask(3)
    assert windowed[:, 0, 0].tolist() == [[False, False, True, True, True]] * 2
    padded = batch(5, 3).decode_mask(None)
    assert padded[:, 0, 0].tolist() == [[True] * 5, [True, True, True, False, False]]


def test_allocate_run_prefers_one_ascending_run():
    pool = PagePool(20, 4, torch.float32, "cpu")
    taken = pool.allocate(20, SlotOwner.KV)
    # Free slots 0-2, 5, 9-13 and 17, returned in a scrambled order: the runs are 0-2 and 9-13.
    freed = torch.tensor([12, 0, 17, 10, 2, 5, 13, 1, 9, 11])
    pool.release(freed, SlotOwner.KV)
    run = pool.allocate_run(4, SlotOwner.ADAPTER)
    assert run.tolist() == [9, 10, 11, 12]  # the first run that is long enough
    assert pool.allocate_run(3, SlotOwner.ADAPTER).tolist() == [0, 1, 2]
    rest = pool.allocate_run(3, SlotOwner.ADAPTER)  # 5, 13, 17 left: no run of 3, any three slots
    assert sorted(rest.tolist()) == [5, 13, 17]
    assert (pool.stats().adapters, pool.stats().free) == (10, 0)
    pool.release(torch.cat([run, rest]), SlotOwner.ADAPTER)
    assert pool.allocate_run(4, SlotOwner.ADAPTER).tolist() == [9, 10, 11, 12]
    assert len(set(taken.tolist())) == 20
    with pytest.raises(PoolExhausted, match="asked for 9 slots"):
        pool.allocate_run(9, SlotOwner.ADAPTER)
