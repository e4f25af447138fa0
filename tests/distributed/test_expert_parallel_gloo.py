"""Expert parallelism over gloo: EP=2 and EP=4 give the EP=1 outputs and gradients on the same tokens."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

import moeplug
from moeplug import MoEConfig, MoELayer
from moeplug.dispatch import allreduce_gradients
from moeplug.tiny import tiny_model

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(300)]
HIDDEN, EXPERTS = 20, 8


def _layer(ep_size: int, **options) -> MoELayer:
    torch.manual_seed(0)  # the same init on every rank: the shards are slices of the EP=1 weights
    layer = MoELayer(MoEConfig(num_experts=EXPERTS, top_k=2, hidden_size=HIDDEN, intermediate_size=12,
                               ep_size=ep_size, **options))
    with torch.no_grad():
        layer.router.weight.normal_(0, 0.5)
    return layer


def _rank_tokens(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Different token counts per rank (including 1), and the upstream gradient."""
    generator = torch.Generator().manual_seed(10 + rank)
    count = [7, 1, 13, 4][rank]
    return torch.randn(count, HIDDEN, generator=generator), torch.randn(count, HIDDEN, generator=generator)


def _grads(module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def _layer_case(world: int, ep_size: int, options: dict) -> dict:
    rank = dist.get_rank()
    starve = options.pop("starve_last_rank", False)
    per_choice = options.pop("per_choice_rows", False)
    if "ranks_per_node" in options:  # simulated hosts: hierarchical dispatch by default
        os.environ["MOEPLUG_RANKS_PER_NODE"] = str(options.pop("ranks_per_node"))
        os.environ["MOEPLUG_DISPATCH"] = options.pop("dispatch", "auto")
    layer = _layer(ep_size, **options)
    layer.moeplug.ep.dedup = not per_choice
    if starve:
        # Experts of the last EP rank are never chosen: that rank receives no rows at all.
        with torch.no_grad():
            layer.selection_bias[EXPERTS - EXPERTS // ep_size:] = -1e4
    x, grad = _rank_tokens(rank)
    x.requires_grad_(True)
    out = layer(x)
    out.backward(grad)
    grads = _grads(layer)
    dist.all_reduce(grads["router.weight"])  # replicated parameters: sum over ranks
    local = layer.moeplug.ep.local_experts
    return {"out": out.detach(), "dx": x.grad, "grads": grads, "local_experts": (local.start, local.stop),
            "hierarchical": layer.moeplug.ep.hierarchical}


def _worker(rank: int, port: int, world: int, case: str, ep_size: int, options: dict, path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        if case == "layer":
            result = _layer_case(world, ep_size, dict(options))
        elif case == "sync":
            result = _sync_case(ep_size)
        else:
            result = _hf_case(ep_size)
        torch.save(result, f"{path}.{rank}")
    finally:
        dist.destroy_process_group()


def _sync_case(ep_size: int) -> dict:
    layer = _layer(ep_size)
    x, grad = _rank_tokens(dist.get_rank())
    layer(x).backward(grad)
    allreduce_gradients(layer)
    return {"grads": _grads(layer), "local_experts": tuple(layer.moeplug.ep.local_experts[i] for i in (0, -1))}


def _hf_case(ep_size: int) -> dict:
    rank = dist.get_rank()
    model = tiny_model("mixtral").train()
    moeplug.patch_model(model, ep_size=ep_size)
    ids = torch.randint(3, 96, (2, 6 + rank), generator=torch.Generator().manual_seed(rank))
    out = model(ids, labels=ids)
    out.loss.backward()
    return {"logits": out.logits.detach(), "loss": out.loss.detach(), "grads": _grads(model)}


def check_against_ep1(results: list[dict], reference: MoELayer, ep_size: int) -> None:
    """Each rank's output and input gradient, and the experts' and router's gradients, equal one process
    running `reference` (EP=1, same init) on every rank's tokens (also used by the multi-host test)."""
    world = len(results)
    for rank, result in enumerate(results):
        x, grad = _rank_tokens(rank)
        x.requires_grad_(True)
        out = reference(x)
        out.backward(grad)  # accumulates: after the loop, grads of the sum over ranks' losses
        torch.testing.assert_close(result["out"], out.detach(), atol=1e-5, rtol=0, msg=f"rank {rank} output")
        torch.testing.assert_close(result["dx"], x.grad, atol=1e-5, rtol=0, msg=f"rank {rank} input grad")
    ref = _grads(reference)
    for rank, result in enumerate(results[:ep_size]):  # one EP group holds every expert once
        local = slice(*result["local_experts"])
        expert_grads = {n: g for n, g in result["grads"].items() if n.startswith("experts.")}
        if world > ep_size:  # the other EP group holds the same experts: sum over expert-data-parallel ranks
            twin = results[rank + ep_size]["grads"]
            expert_grads = {n: g + twin[n] for n, g in expert_grads.items()}
        for name, g in expert_grads.items():
            torch.testing.assert_close(g, ref[name][local], atol=1e-4, rtol=0, msg=f"rank {rank} {name}")
        torch.testing.assert_close(result["grads"]["router.weight"], ref["router.weight"], atol=1e-4, rtol=0)


def _run(spawn, world: int, case: str, ep_size: int, options: dict, tmp_path) -> list[dict]:
    path = str(tmp_path / "result")
    spawn(_worker, world, world, case, ep_size, options, path)
    return [torch.load(f"{path}.{rank}") for rank in range(world)]


@pytest.mark.parametrize("world,ep_size,options", [
    (2, 2, {}),
    (4, 4, {}),
    (4, 2, {"capacity_factor": 0.75}),
    (2, 2, {"starve_last_rank": True}),
    (4, 4, {"per_choice_rows": True}),  # the non-deduplicating baseline dispatch
    (4, 4, {"ranks_per_node": 2}),  # hierarchical: 2 hosts x 2 ranks
    # 2 EP groups of 2 hosts x 1 rank; hierarchical asked for (the default there is flat: nothing to spread)
    (4, 2, {"ranks_per_node": 1, "dispatch": "hierarchical", "capacity_factor": 0.75}),
])
def test_moe_layer_expert_parallel_matches_ep1(tmp_path, spawn, world, ep_size, options):
    results = _run(spawn, world, "layer", ep_size, options, tmp_path)
    hierarchical = options.get("dispatch") == "hierarchical" or 1 < options.get("ranks_per_node", ep_size) < ep_size
    assert [r["hierarchical"] for r in results] == [hierarchical] * world
    test_only = ("starve_last_rank", "per_choice_rows", "ranks_per_node", "dispatch")
    reference = _layer(1, **{k: v for k, v in options.items() if k not in test_only})
    if options.get("starve_last_rank"):
        with torch.no_grad():
            reference.selection_bias[EXPERTS - EXPERTS // ep_size:] = -1e4
    check_against_ep1(results, reference, ep_size)


def test_allreduce_gradients_gives_the_mean_objective(tmp_path, spawn):
    """World 4 = 2 EP groups x 2: after the sync every rank holds grads of mean_r(loss_r)."""
    world, ep_size = 4, 2
    results = _run(spawn, world, "sync", ep_size, {}, tmp_path)
    reference = _layer(1)
    for rank in range(world):
        x, grad = _rank_tokens(rank)
        reference(x).backward(grad / world)
    ref = _grads(reference)
    for rank, result in enumerate(results):
        first, last = result["local_experts"]
        for name, g in result["grads"].items():
            expected = ref[name][first: last + 1] if name.startswith("experts.") else ref[name]
            torch.testing.assert_close(g, expected, atol=1e-5, rtol=0, msg=f"rank {rank} {name}")


def test_patched_hf_model_expert_parallel_matches_transformers(tmp_path, spawn):
    results = _run(spawn, 2, "hf", 2, {}, tmp_path)
    for rank, result in enumerate(results):
        reference = tiny_model("mixtral").train()
        ids = torch.randint(3, 96, (2, 6 + rank), generator=torch.Generator().manual_seed(rank))
        out = reference(ids, labels=ids)
        torch.testing.assert_close(result["logits"], out.logits.detach(), atol=1e-5, rtol=0)
        torch.testing.assert_close(result["loss"], out.loss.detach(), atol=1e-5, rtol=0)
        # Attention and router weights are replicated: this rank's own loss only.
        out.loss.backward()
        ref = _grads(reference)
        name = "model.layers.0.mlp.gate.weight"
        torch.testing.assert_close(result["grads"][name], ref[name], atol=1e-4, rtol=0)


def test_bad_ep_size_is_a_clear_error():
    with pytest.raises(ValueError, match="ep_size=3 must divide num_experts=8"):
        MoEConfig(num_experts=8, ep_size=3)
    with pytest.raises(ValueError, match="needs torch.distributed initialised"):
        _layer(2)
    model = tiny_model("mixtral")
    with pytest.raises(ValueError, match="ep_size=4 must divide the number of experts \\(6\\)"):
        moeplug.patch_model(model, ep_size=4)
    assert not hasattr(model, "_moeplug")  # nothing was changed
    assert all(type(m).__name__.startswith("MoEPlug") is False for m in model.modules())
