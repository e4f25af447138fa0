"""Routing traces against transformers' own router logits, and the cost model against brute force."""

from __future__ import annotations

import pytest
import torch

import moeplug
from moeplug.placement import (Placement, RoutingTrace, context_coherent_cost, evaluate, rank_load,
                               record_routing, standard_cost)
from moeplug.tiny import tiny_model


def _trace_from_choices(choices: torch.Tensor, num_experts: int, sample: int = 0) -> RoutingTrace:
    """A trace of [T, L, k] choices (-1: dropped), fed layer by layer like the recorder does."""
    tokens, layers, top_k = choices.shape
    trace = RoutingTrace.empty(layers, num_experts, top_k, sample_tokens=sample)
    ids = torch.where(choices < 0, num_experts, choices)
    for layer in range(layers):
        trace.add(layer, ids[:, layer], ids[:, layer - 1] if layer else None)
    return trace


def test_trace_matches_router_logits_of_transformers(tmp_path):
    model = tiny_model("mixtral", num_hidden_layers=3)
    reference = tiny_model("mixtral", num_hidden_layers=3)
    moeplug.patch_model(model)
    batches = [torch.randint(3, 96, (2, 7), generator=torch.Generator().manual_seed(s)) for s in range(2)]
    with torch.no_grad(), record_routing(model, sample_tokens=20) as trace:
        for ids in batches:
            model(ids)
    # Oracle: transformers' own router logits -> top-k, counted token by token in Python.
    experts, top_k = 6, 2
    counts = torch.zeros(3, experts, dtype=torch.float64)
    pairs = torch.zeros(3, experts, experts, dtype=torch.float64)
    moves = torch.zeros(2, experts, experts, dtype=torch.float64)
    rows = []
    with torch.no_grad():
        for ids in batches:
            logits = reference(ids, output_router_logits=True).router_logits
            choice = torch.stack([layer.reshape(-1, experts).topk(top_k).indices for layer in logits], 1)  # [T, L, k]
            rows.append(choice)
            for token in choice.tolist():
                for layer, chosen in enumerate(token):
                    for e in chosen:
                        counts[layer, e] += 1
                        for f in chosen:
                            pairs[layer, e, f] += 1
                        if layer + 1 < len(token):
                            for f in token[layer + 1]:
                                moves[layer, e, f] += 1
    assert trace.tokens == 28 and trace.layer_names == [f"model.layers.{i}.mlp.experts" for i in range(3)]
    torch.testing.assert_close(trace.counts, counts, atol=0, rtol=0)
    torch.testing.assert_close(trace.pairs, pairs, atol=0, rtol=0)
    torch.testing.assert_close(trace.transitions, moves, atol=0, rtol=0)
    sample = trace.sample_rows()
    assert sample.shape == (20, 3, 2)  # capped at 20 of 28 tokens
    assert torch.equal(sample.sort(-1).values, torch.cat(rows)[:20].sort(-1).values)
    trace.save(tmp_path / "trace.safetensors")
    loaded = RoutingTrace.load(tmp_path / "trace.safetensors")
    assert torch.equal(loaded.transitions, trace.transitions) and torch.equal(loaded.sample_rows(), sample)
    assert (loaded.tokens, loaded.top_k, loaded.layer_names) == (trace.tokens, trace.top_k, trace.layer_names)


def _rank_of(plan: Placement, layer: int) -> dict[int, int]:
    return {e: r for r in range(plan.ep_size) for e in plan.slots[layer, r].tolist()}


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_cost_model_matches_brute_force(top_k):
    experts, layers, ranks = 6, 3, 3
    generator = torch.Generator().manual_seed(top_k)
    choices = torch.stack([torch.stack([torch.randperm(experts, generator=generator)[:top_k] for _ in range(layers)])
                           for _ in range(50)])
    choices[3, 1, 0] = -1  # a dropped slot counts nowhere
    trace = _trace_from_choices(choices, experts, sample=50)
    plan = Placement(torch.stack([torch.randperm(experts, generator=generator).view(ranks, 2) for _ in range(layers)]),
                     experts)
    ranks_of = [_rank_of(plan, layer) for layer in range(layers)]
    load = torch.zeros(layers, ranks, dtype=torch.float64)
    sends, hops, sends_from_0 = 0.0, 0.0, 0.0
    for token in choices.tolist():
        for layer, chosen in enumerate(token):
            kept = [e for e in chosen if e >= 0]
            for e in kept:
                load[layer, ranks_of[layer][e]] += 1
            destinations = {ranks_of[layer][e] for e in kept}
            sends += len(destinations) * (ranks - 1) / ranks  # uniform source rank
            sends_from_0 += len(destinations - {0})
            if layer + 1 < layers:
                hops += sum(ranks_of[layer][e] != ranks_of[layer + 1][f] for e in kept for f in token[layer + 1] if f >= 0)
    torch.testing.assert_close(rank_load(trace, plan), load)
    assert standard_cost(trace, plan).traffic == pytest.approx(sends, rel=1e-12)
    assert standard_cost(trace, plan, source_rank=0).traffic == pytest.approx(sends_from_0, rel=1e-12)
    assert context_coherent_cost(trace, plan).traffic == pytest.approx(hops, rel=1e-12)
    rows = standard_cost(trace, plan, dedup=False).traffic
    assert rows == pytest.approx(float(load.sum()) * (ranks - 1) / ranks)  # independent of the placement


def test_replicas_split_load_and_time_follows_the_busiest_rank():
    # One layer, 4 experts, 2 ranks; expert 0 takes 60 tokens, the others 20 (top-1).
    choices = torch.tensor([0] * 60 + [1] * 20 + [2] * 20 + [3] * 20).view(-1, 1, 1)
    trace = _trace_from_choices(choices, 4)
    plain = Placement(torch.tensor([[[0, 1], [2, 3]]]), 4)
    replicated = Placement(torch.tensor([[[0, 1, 2], [0, 3, 2]]]), 4)
    torch.testing.assert_close(rank_load(trace, plain), torch.tensor([[80.0, 40.0]], dtype=torch.float64))
    torch.testing.assert_close(rank_load(trace, replicated), torch.tensor([[60.0, 60.0]], dtype=torch.float64))
    cost = evaluate(trace, plain, row_bytes=8.0, bandwidth=4.0)["standard"]
    # Uniform source: rank 0 receives 80/2 rows and sends 40/2 -> 40 rows, twice (dispatch, combine).
    assert cost.time_s == pytest.approx(2 * 40 * 8.0 / 4.0)
    assert float(cost.max_mean_load[0]) == pytest.approx(80 / 60)


def test_placement_validation_and_json_roundtrip(tmp_path):
    with pytest.raises(ValueError, match="layer 0: slots must hold each of experts 0..3"):
        Placement(torch.tensor([[[0, 1], [1, 2]]]), 4)
    with pytest.raises(ValueError, match="expected \\[layers, ranks, slots per rank\\]"):
        Placement(torch.tensor([[0, 1], [2, 3]]), 4)
    plan = Placement(torch.tensor([[[3, 0, 1], [2, 3, 1]]]), 4, ["a"], {"planner": "test"})
    assert plan.num_replicas == 2
    plan.save(tmp_path)
    again = Placement.load(tmp_path)
    assert torch.equal(again.slots, plan.slots) and again.info == plan.info and again.layer_names == ["a"]
    assert torch.equal(Placement.contiguous(2, 6, 3).slots[1], torch.tensor([[0, 1], [2, 3], [4, 5]]))
