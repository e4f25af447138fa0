"""Expert parallelism under DeepSpeed ZeRO-1/2 trains exactly like the unsharded model.

Oracle: the same tiny Mixtral trained with plain torch AdamW on the same global batch (the mean of
every rank's micro-batch losses, with gradient accumulation and the same gradient clipping), and,
as a check on that oracle, DeepSpeed itself with ep_size=1. After a few optimizer steps every
rank's losses and its full weights (expert shards gathered over the EP group) must match.
ZeRO-3 is checked without expert parallelism (with it, it is refused with the reason).
World 2 (one EP group) and world 4 (two EP groups x two expert-data-parallel ranks, which is where
a wrong reduction group would show); DeepSpeed's engine start is slow, so each world runs all its
cases, including the error cases, in one set of processes.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from lora_serve.testing import free_port
import moeplug
from moeplug.tiny import tiny_model
from tests import launch

pytestmark = [pytest.mark.distributed, pytest.mark.slow, pytest.mark.timeout(600)]
ROOT = Path(__file__).resolve().parents[2]
EXPERTS, STEPS, ACCUMULATION, BATCH, LENGTH, LR, CLIP = 4, 3, 2, 2, 9, 1e-2, 0.5
# Adam's eps, raised from torch's 1e-8 so that the check holds on any CPU. Adam moves a weight by
# lr·m/(sqrt(v) + eps): with eps = 1e-8 a near-zero gradient whose sign depends on the summation order
# (sharded experts, ZeRO partitions, the CPU's SIMD width) moves it by ±lr, and an AMD EPYC put 3 weights
# 1.01-1.05e-4 from the oracle. With eps the update changes by at most lr·|dg|/eps for a gradient change dg,
# so fp32 order noise (dg <~ 1e-8 on these gradients of norm <= CLIP) moves a weight by at most
# STEPS·lr·dg/eps = 3e-6 over the run, well inside the 1e-4 below, while real gradients (|g| >> eps)
# still take Adam's steps (the losses must fall).
EPS = 1e-4
OPTIONS = dict(balance="micro", aux_loss_coef=0.01)
# (ZeRO stage, ep_size) per world; ep_size 1 is DeepSpeed's own data parallelism (a second oracle).
# ZeRO-3 runs without expert parallelism only (with it, initialize refuses: see _error_cases).
CASES = {2: [(1, 2), (2, 2), (3, 1)], 4: [(1, 2), (2, 2), (2, 4)]}


def _batch(step: int, micro: int, rank: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1000 * step + 10 * micro + rank)
    return torch.randint(3, 96, (BATCH, LENGTH), generator=generator)


def _model() -> torch.nn.Module:
    return tiny_model("mixtral", num_local_experts=EXPERTS).train()


def _config(stage: int) -> dict:
    return {"train_micro_batch_size_per_gpu": BATCH, "gradient_accumulation_steps": ACCUMULATION,
            "gradient_clipping": CLIP, "zero_optimization": {"stage": stage}, "steps_per_print": 10**9}


def reference_run(world: int) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Plain torch: AdamW steps on the mean of all ranks' and micro-batches' losses."""
    model = _model()
    moeplug.patch_model(model, **OPTIONS)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, eps=EPS)
    losses = []
    for step in range(STEPS):
        total = 0.0
        for micro in range(ACCUMULATION):
            for rank in range(world):
                ids = _batch(step, micro, rank)
                loss = model(ids, labels=ids).loss / (world * ACCUMULATION)
                loss.backward()
                total += loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(total)
    return losses, {n: p.detach().clone() for n, p in model.named_parameters()}


def _mean_over_ranks(value: float) -> float:
    tensor = torch.tensor(value, dtype=torch.float64)
    dist.all_reduce(tensor)
    return tensor.item() / dist.get_world_size()


def _deepspeed_run(stage: int, ep_size: int, save_dir: str | None = None) -> dict:
    from moeplug.dispatch import expert_parallel_parameters
    from moeplug.integrations import deepspeed as mds

    rank = dist.get_rank()
    model = _model()
    mds.patch_model(model, ep_size=ep_size, **OPTIONS)
    optimizer = torch.optim.AdamW(mds.param_groups(model), lr=LR, eps=EPS)
    groups = [(g["name"], bool(g.get("moe")), len(g["params"])) for g in optimizer.param_groups]
    engine, *_ = mds.initialize(model=model, optimizer=optimizer, config=_config(stage))
    losses = []
    for step in range(STEPS):
        total = 0.0
        for micro in range(ACCUMULATION):
            ids = _batch(step, micro, rank)
            loss = engine(ids, labels=ids).loss
            engine.backward(loss)
            engine.step()
            total += loss.item() / ACCUMULATION
        losses.append(_mean_over_ranks(total))
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(model.parameters()), enabled=stage == 3):  # ZeRO-3 partitions
        weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    for name, (param, ep) in expert_parallel_parameters(model).items():
        parts = [torch.empty_like(param) for _ in range(ep.ep_size)]
        dist.all_gather(parts, param.detach().contiguous(), group=ep.group)
        weights[name] = torch.cat(parts)
    result = {"losses": losses, "weights": weights, "groups": groups, "has_moe_layers": engine.has_moe_layers}
    if save_dir is not None:  # every rank is an expert-data-parallel writer at world 2, so all refuse alike
        result["engine_save_checkpoint"] = _error(lambda: engine.save_checkpoint(save_dir), RuntimeError)
    return result


def _error(call, expected=(ValueError, AssertionError)) -> str:
    try:
        call()
    except expected as error:
        return f"{type(error).__name__}: {error}"
    return "no error"


def _warnings(call) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call()
    return [str(w.message) for w in caught if "moeplug" in str(w.message)]


def _error_cases() -> dict:
    """Bad set-ups, each expected to fail with a message naming the cause (world 4)."""
    from deepspeed.utils import groups

    from moeplug.integrations import deepspeed as mds

    errors = {}
    # DeepSpeed's data-before-expert layout: EP groups [0, 2], [1, 3] do not match moeplug's [0, 1], [2, 3].
    groups._create_expert_and_data_parallel(2, use_data_before_expert_parallel_=True)
    errors["mismatched_groups"] = _error(lambda: mds.patch_model(_model(), ep_size=2))
    for table in (groups._EXPERT_PARALLEL_GROUP, groups._EXPERT_PARALLEL_GROUP_RANKS,
                  groups._EXPERT_DATA_PARALLEL_GROUP, groups._EXPERT_DATA_PARALLEL_GROUP_RANKS):
        table.pop("ep_size_2")  # let the training cases create the default layout under the same name
    errors["ep_not_dividing_world"] = _error(lambda: mds.patch_model(_model(), ep_size=3))
    errors["ep_not_dividing_experts"] = _error(
        lambda: mds.patch_model(tiny_model("mixtral", num_local_experts=6), ep_size=4))
    # A plain moeplug.patch_model under DeepSpeed warns (ZeRO would average the shards); the integration's does not.
    errors["plain_patch_warnings"] = _warnings(lambda: moeplug.patch_model(_model(), ep_size=2))
    model = _model()
    errors["integration_patch_warnings"] = _warnings(lambda: mds.patch_model(model, ep_size=2))
    errors["data_before_expert"] = _error(lambda: model.model.layers[0].mlp.experts.deepspeed_moe_marker
                                          .set_deepspeed_parallelism(use_data_before_expert_parallel_=True))
    mixed = torch.optim.AdamW(model.parameters(), lr=LR)
    errors["mixed_param_groups"] = _error(lambda: mds.initialize(model=model, optimizer=mixed, config=_config(2)))
    optimizer = torch.optim.AdamW(mds.param_groups(model), lr=LR)
    errors["zero3"] = _error(lambda: mds.initialize(model=model, optimizer=optimizer, config=_config(3)))
    # DeepSpeed's own verdict on ZeRO-3 for MoE layers that are not its AutoEP layers (the reason we refuse).
    import deepspeed

    errors["zero3_deepspeed"] = _error(lambda: deepspeed.initialize(model=model, optimizer=optimizer,
                                                                    config=_config(3)))
    return errors


def _worker(rank: int, port: int, world: int, path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".venv" / "torch_extensions"))
    torch.set_num_threads(1)
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    result = {"errors": _error_cases()} if world == 4 else {}
    for stage, ep_size in CASES[world]:
        save_dir = f"{path}.engine-checkpoint" if world == 2 and stage == 2 else None
        result[(stage, ep_size)] = _deepspeed_run(stage, ep_size, save_dir)
    torch.save(result, f"{path}.{rank}")
    dist.barrier()


@pytest.mark.parametrize("world", [2, 4])
def test_deepspeed_zero_with_expert_parallelism_matches_plain_training(tmp_path, world):
    port = free_port()
    launch.spawn(_worker, world, (port, world, str(tmp_path / "result")))  # preloaded fork server
    results = [torch.load(tmp_path / f"result.{rank}") for rank in range(world)]
    ref_losses, ref_weights = reference_run(world)
    initial = dict(_model().named_parameters())
    moved = max((ref_weights[n] - initial[n]).abs().max().item() for n in ref_weights)
    assert moved > 10 * 1e-4, moved  # the weights moved far more than the tolerance: the check can fail
    for rank, result in enumerate(results):
        for (stage, ep_size), run in ((k, v) for k, v in result.items() if k != "errors"):
            case = f"world {world} rank {rank} ZeRO-{stage} ep_size {ep_size}"
            if "engine_save_checkpoint" in run:  # DeepSpeed would keep one rank's experts: refused
                assert "moeplug.checkpoint.save_checkpoint" in run["engine_save_checkpoint"], case
            assert run["has_moe_layers"] == (ep_size > 1), case
            expected_groups = [("dense-params", False, 21)]
            if ep_size > 1:  # the 2 layers' gate_up_proj and down_proj in DeepSpeed's expert group
                expected_groups = [("dense-params", False, 17), (f"ep_size_{ep_size}", True, 4)]
            assert run["groups"] == expected_groups, case
            # fp32; the sums run in another order (sharded experts, ZeRO partitions): 1e-5 on losses,
            # 1e-4 on weights after 3 Adam steps (order noise bounded by STEPS·lr·dg/EPS, see EPS).
            torch.testing.assert_close(run["losses"], ref_losses, atol=1e-5, rtol=0, msg=case)
            assert run["losses"][-1] < run["losses"][0], case  # it trained
            for name, weight in ref_weights.items():
                torch.testing.assert_close(run["weights"][name], weight, atol=1e-4, rtol=0, msg=f"{case} {name}")
    if world == 4:
        errors = results[0]["errors"]
        assert "expert-parallel group of rank 0 holds ranks [0, 2]" in errors["mismatched_groups"]
        assert "expects [0, 1]" in errors["mismatched_groups"]
        assert "ep_size=3 must be a positive integer dividing the world size (4)" in errors["ep_not_dividing_world"]
        assert "ep_size=4 must divide the number of experts (6)" in errors["ep_not_dividing_experts"]
        assert len(errors["plain_patch_warnings"]) == 1, errors["plain_patch_warnings"]
        assert "moeplug.integrations.deepspeed.patch_model" in errors["plain_patch_warnings"][0]
        assert errors["integration_patch_warnings"] == []
        assert "EP-major" in errors["data_before_expert"]
        assert "mixes expert-parallel and replicated parameters" in errors["mixed_param_groups"]
        assert errors["zero3"].startswith("ValueError: ZeRO stage 3 with expert parallelism")
        assert "not supported with ZeRO Stage 3" in errors["zero3_deepspeed"]
