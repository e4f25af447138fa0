"""The placement recipe on a live EP model: trace -> plan -> apply -> predicted and measured change.

Runs inside an initialised process group (every rank calls `run_recipe` with its own batches).
"Measured" numbers come from the real all-to-alls (`moeplug.dispatch.count_traffic`): rows each
rank sent to every other rank, and rows each rank's experts processed, summed over ranks.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.distributed as dist
from torch import nn

from ..dispatch import count_traffic
from .apply import apply_placement, current_placement
from .cost import evaluate
from .greedy import greedy_plan
from .ilp import ilp_plan
from .plan import Placement
from ..state import moe_modules
from .trace import RoutingTrace, record_routing

PLANNERS = ("greedy", "ilp")


def collect_trace(model: nn.Module, batches: list[torch.Tensor], sample_tokens: int = 0) -> RoutingTrace:
    """Trace this rank's `batches` (no grad) and sum the counts over all ranks (collective)."""
    with torch.no_grad(), record_routing(model, sample_tokens) as trace:
        for ids in batches:
            model(ids)
    return trace.reduce_() if dist.is_initialized() else trace


def measure(model: nn.Module, batches: list[torch.Tensor], ep_size: int) -> dict:
    """Forward+backward each batch: median step seconds, cross-rank rows and per-rank load (all ranks).

    Load = (token, choice) assignments each rank's experts processed, summed over layers and batches.
    """
    rows = torch.zeros(ep_size, ep_size, dtype=torch.float64)  # [source, destination], all layers
    load = torch.zeros(ep_size, dtype=torch.float64)
    seconds = []
    for ids in batches:
        model.zero_grad(set_to_none=True)
        with count_traffic(assignments=True) as sent:
            started = time.perf_counter()
            model(ids, labels=ids).loss.backward()
            seconds.append(time.perf_counter() - started)
        for rank, counts, work in sent:
            rows[rank] += counts.double()
            load += work.double()
    dist.all_reduce(rows)
    dist.all_reduce(load)
    step = torch.tensor([statistics.median(seconds)])
    dist.all_reduce(step, op=dist.ReduceOp.MAX)  # a step ends when its slowest rank does
    return {"cross_rank_rows": float(rows.sum() - rows.diagonal().sum()), "max_mean_load": float(load.max() / load.mean()),
            "step_s": float(step)}


def make_plan(trace: RoutingTrace, ep_size: int, planner: str, replicas: int, traffic_model: str,
              time_limit: float, ranks_per_node: int | None = None) -> Placement:
    """Plan on rank 0 (the ILP's time limit makes it nondeterministic) and broadcast the plan.

    With `ranks_per_node` (hosts of that many ranks) and the standard traffic model the ILP is node-aware.
    """
    if planner not in PLANNERS:
        raise ValueError(f"planner={planner!r}; expected one of {PLANNERS}")
    node_aware = ranks_per_node if traffic_model == "standard" else None
    box = [None]
    if not dist.is_initialized() or dist.get_rank() == 0:
        plan = (greedy_plan(trace, ep_size, replicas, traffic_model) if planner == "greedy"
                else ilp_plan(trace, ep_size, traffic_model, time_limit=time_limit, replicas=replicas,
                              ranks_per_node=node_aware))
        box = [plan.to_json()]
    if dist.is_initialized():
        dist.broadcast_object_list(box, src=0)
    return Placement.from_json(box[0])


def run_recipe(model: nn.Module, batches: list[torch.Tensor], held_out: list[torch.Tensor], ep_size: int,
               planner: str = "greedy", replicas: int = 0, traffic_model: str = "context_coherent",
               time_limit: float = 30.0, optimizer: torch.optim.Optimizer | None = None,
               bandwidth: float = 50e9) -> tuple[Placement, dict]:
    """Trace `batches`, plan, apply; report predicted (on `batches`) and measured (on `held_out`) change.

    Predicted all-to-all times use rows of hidden_size values in the model's dtype and `bandwidth`
    bytes/s per rank. When the model's EP groups span hosts (hierarchical dispatch), the ILP planner
    with the standard traffic model places experts knowing the hosts (`ilp_plan(ranks_per_node=...)`).
    """
    before = current_placement(model)
    trace = collect_trace(model, batches)
    layout = next((layer.state.ep for layer in moe_modules(model)), None)
    ranks_per_node = layout.ranks_per_node if layout is not None and layout.hierarchical else None
    plan = make_plan(trace, ep_size, planner, replicas, traffic_model, time_limit, ranks_per_node)
    measured_before = measure(model, held_out, ep_size)
    apply_placement(model, plan, optimizer)
    measured_after = measure(model, held_out, ep_size)
    weight = next(model.parameters())
    row_bytes = model.config.hidden_size * weight.element_size()
    costs = [evaluate(trace, layout, row_bytes, bandwidth) for layout in (before, plan)]
    predicted = {name: {"before": costs[0][name].summary(), "after": costs[1][name].summary()} for name in costs[0]}
    return plan, {"plan": plan.info, "trace_tokens": trace.tokens, "predicted": predicted,
                  "measured": {"before": measured_before, "after": measured_after}}
