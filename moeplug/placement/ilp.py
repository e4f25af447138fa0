"""Joint placement of all layers by mixed-integer programming (scipy.optimize.milp, HiGHS).

Variables: x[l, e, r] = 1 when expert e of layer l lives on rank r (one copy per expert, exactly
S = E/P experts per rank and layer); M[l] >= every rank's load in layer l; and for each affine
pair (weight w > 0) a co-location indicator c[pair, r] <= both x's, which the objective pushes up:
  - context_coherent: pairs (e at l, e' at l+1) weighted by the trace's transitions;
  - standard: pairs (e, e') of one layer weighted by tokens choosing both, times (P-1)/P.
Minimise  sum(w) - sum(w * c) + balance_weight * sum_l M[l]  -- the same number as
`cost.objective` (exact for top_k <= 2), so the result (refined by `refine_plan`) is compared with
the greedy plan on it and the better one returned: the ILP never does worse than greedy. Pairs
lighter than `min_pair_share` of a layer's weight are left out to keep the model small (they count
as always apart).

Reproducibility: HiGHS stopped by `time_limit` returns whatever incumbent it had at that moment, which
depends on the machine's speed and load. `time_limit=None, node_limit=N` stops it after N branch-and-bound
nodes instead (and runs the local searches without a clock): the same trace gives the same plan on any
machine with the same scipy/HiGHS. `info["status"]` says why the solver stopped and `info["mip_gap"]` how far
from proven optimal the incumbent was.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import coo_matrix

from .cost import TRAFFIC_MODELS, objective
from .greedy import greedy_plan
from .node_ilp import node_milp_problem, node_slots
from .plan import Placement
from .refine import refine_plan
from .trace import RoutingTrace


def _pairs(trace: RoutingTrace, traffic_model: str, ranks: int, min_pair_share: float):
    """(layer_a, e, layer_b, e', weight) for the affine pairs kept in the model."""
    found = []
    if traffic_model == "context_coherent":
        for layer, moves in enumerate(trace.transitions):
            found += [(layer, e, layer + 1, f, w) for (e, f), w in _heavy(moves, min_pair_share)]
    else:
        for layer, together in enumerate(trace.pairs):
            upper = torch.triu(together, diagonal=1) * (ranks - 1) / ranks
            found += [(layer, e, layer, f, w) for (e, f), w in _heavy(upper, min_pair_share)]
    return found


def _heavy(matrix: torch.Tensor, min_share: float):
    keep = matrix > min_share * float(matrix.sum())
    return [((int(e), int(f)), float(matrix[e, f])) for e, f in keep.nonzero().tolist()]


def _milp_problem(trace: RoutingTrace, ep_size: int, pairs: list, balance_weight: float,
                  max_imbalance: float | None) -> tuple:
    """(cost, constraints, integrality, bounds) of the placement MILP (see the module docstring).

    Columns: x[layer, expert, rank] (binary), then one c per (pair, rank), then M[layer].
    """
    layers, experts = trace.num_layers, trace.num_experts
    per_rank = experts // ep_size
    num_x = layers * experts * ep_size
    num_c = len(pairs) * ep_size
    num_vars = num_x + num_c + layers

    def x(layer: int, expert: int, rank: int) -> int:  # column of x[layer, expert, rank]
        return (layer * experts + expert) * ep_size + rank

    def m_var(layer: int) -> int:  # column of M[layer]
        return num_x + num_c + layer

    cost = np.zeros(num_vars)
    rows, cols, vals, lower, upper = [], [], [], [], []

    def constraint(entries, lo, hi):
        row = len(lower)
        for col, val in entries:
            rows.append(row)
            cols.append(col)
            vals.append(val)
        lower.append(lo)
        upper.append(hi)

    for l in range(layers):
        for e in range(experts):  # each expert on exactly one rank
            constraint([(x(l, e, r), 1.0) for r in range(ep_size)], 1, 1)
        for r in range(ep_size):  # S experts per rank; the layer's bottleneck M[l] >= every rank's load
            constraint([(x(l, e, r), 1.0) for e in range(experts)], per_rank, per_rank)
            constraint([(x(l, e, r), float(trace.counts[l, e])) for e in range(experts)] + [(m_var(l), -1.0)],
                       -np.inf, 0)
        cost[m_var(l)] = balance_weight
    for index, (la, e, lb, f, weight) in enumerate(pairs):
        for r in range(ep_size):
            c = num_x + index * ep_size + r
            cost[c] = -weight
            constraint([(c, 1.0), (x(la, e, r), -1.0)], -np.inf, 0)
            constraint([(c, 1.0), (x(lb, f, r), -1.0)], -np.inf, 0)
    matrix = coo_matrix((vals, (rows, cols)), shape=(len(lower), num_vars)).tocsr()
    integrality = np.zeros(num_vars)
    integrality[:num_x] = 1
    low, high = np.zeros(num_vars), np.ones(num_vars)
    mean_load = trace.counts.sum(1) / ep_size
    high[num_x + num_c:] = np.inf if max_imbalance is None else (max_imbalance * mean_load).numpy()
    low[x(0, 0, 0)] = 1  # ranks are interchangeable: pin expert 0 of layer 0 to rank 0
    return cost, LinearConstraint(matrix, lower, upper), integrality, Bounds(low, high)


def ilp_plan(trace: RoutingTrace, ep_size: int, traffic_model: str = "context_coherent", balance_weight: float = 1.0,
             time_limit: float | None = 10.0, min_pair_share: float = 1e-3, max_imbalance: float | None = None,
             node_limit: int | None = None, refine_passes: int | None = None, ranks_per_node: int | None = None,
             replicas: int = 0) -> Placement:
    """Solve the placement MILP (see the module docstring); returns the better of it and greedy.

    `max_imbalance` (optional) caps every layer's busiest rank at that multiple of the mean rank
    load; when the cap is infeasible (one expert heavier than it) the greedy plan comes back.

    `ranks_per_node` (hosts of that many consecutive ranks) and/or `replicas` (extra copies per layer)
    solve the node-aware MILP of `node_ilp` instead (standard traffic model only): rows across hosts
    first, rows inside hosts second, under the same balance terms, with the replicas placed by the
    solver. Every plan is then scored by `cost.objective(..., ranks_per_node)`.

    `time_limit` (seconds, None: none) and `node_limit` (branch-and-bound nodes, None: none) bound the
    solver; with `time_limit=None` the local searches (`refine_plan`, at most `refine_passes` passes) run
    without a clock too, so the plan is reproducible (see the module docstring).

    `info` of the result reports the solver status, its optimality gap (`mip_gap`, relative; 0 when
    proven optimal), both objectives and which plan won (`used`); when greedy wins, its own `info`
    comes back with the solver's under `info["ilp"]`.
    """
    if time_limit is None and node_limit is None:
        raise ValueError("ilp_plan needs time_limit or node_limit (node_limit alone gives a reproducible plan)")
    if traffic_model not in TRAFFIC_MODELS:
        raise ValueError(f"traffic_model={traffic_model!r}; expected one of {TRAFFIC_MODELS}")
    experts = trace.num_experts
    pairs, (cost, constraints, integrality, bounds) = _problem(
        trace, ep_size, traffic_model, balance_weight, min_pair_share, max_imbalance, ranks_per_node, replicas)
    limits = {k: v for k, v in (("time_limit", time_limit), ("node_limit", node_limit)) if v is not None}
    started = time.perf_counter()
    result = milp(cost, constraints=constraints, integrality=integrality, bounds=bounds, options=limits)
    seconds = time.perf_counter() - started

    refine_seconds = None if time_limit is None else min(time_limit, 10.0)
    search = dict(time_limit=refine_seconds, max_passes=refine_passes, ranks_per_node=ranks_per_node)
    greedy = greedy_plan(trace, ep_size, replicas, traffic_model=traffic_model, refine_seconds=refine_seconds,
                         refine_passes=refine_passes)
    if ranks_per_node is not None:
        greedy = refine_plan(trace, greedy, traffic_model, balance_weight, **search)
    greedy_value = objective(trace, greedy, traffic_model, balance_weight, ranks_per_node)
    info = {"planner": "ilp", "traffic_model": traffic_model, "balance_weight": balance_weight,
            "max_imbalance": max_imbalance, "time_limit": time_limit, "node_limit": node_limit,
            "ranks_per_node": ranks_per_node, "replicas": replicas,
            "status": result.message, "solve_s": round(seconds, 3), "pairs": len(pairs),
            "mip_gap": getattr(result, "mip_gap", None), "greedy_objective": greedy_value}
    if result.x is None:
        greedy.info.update(ilp=info, used="greedy (the ILP found no solution: infeasible or out of time)")
        return greedy
    per_rank = (experts + replicas) // ep_size
    plan = Placement(node_slots(result.x, trace, ep_size, per_rank), experts, list(trace.layer_names), info)
    info["ilp_objective"] = objective(trace, plan, traffic_model, balance_weight, ranks_per_node)
    # An incumbent short of optimal may still improve by local search (which keeps every layer's peak).
    plan = refine_plan(trace, plan, traffic_model, balance_weight, **search)
    info = plan.info
    value = objective(trace, plan, traffic_model, balance_weight, ranks_per_node)
    if value > greedy_value:
        greedy.info.update(ilp=info, used="greedy (better than the ILP's incumbent)")
        return greedy
    info["used"] = "ilp"
    return plan


def _problem(trace: RoutingTrace, ep_size: int, traffic_model: str, balance_weight: float, min_pair_share: float,
             max_imbalance: float | None, ranks_per_node: int | None, replicas: int) -> tuple[list, tuple]:
    """``(pairs, (cost, constraints, integrality, bounds))``: the node-aware MILP (`node_ilp`) when hosts or
    replicas are given, else the one-copy-per-expert MILP."""
    experts = trace.num_experts
    if ranks_per_node is not None or replicas != 0:
        _check_node_options(traffic_model, ep_size, ranks_per_node, replicas, experts)
        pairs = [(l, e, f, w) for l, together in enumerate(trace.pairs)
                 for (e, f), w in _heavy(torch.triu(together, diagonal=1), min_pair_share)]
        *problem, _ = node_milp_problem(trace, ep_size, ranks_per_node or ep_size, replicas, pairs,
                                        balance_weight, max_imbalance)
        return pairs, tuple(problem)
    if experts % ep_size:
        raise ValueError(f"ep_size={ep_size} must divide num_experts={experts} (the ILP places one copy per expert)")
    pairs = _pairs(trace, traffic_model, ep_size, min_pair_share)
    return pairs, _milp_problem(trace, ep_size, pairs, balance_weight, max_imbalance)


def _check_node_options(traffic_model: str, ep_size: int, ranks_per_node: int | None, replicas: int,
                        experts: int) -> None:
    if traffic_model != "standard":
        raise ValueError(f"ranks_per_node/replicas in the ILP need traffic_model='standard', got {traffic_model!r}")
    if ranks_per_node is not None and (not isinstance(ranks_per_node, int) or ranks_per_node < 1
                                       or ep_size % ranks_per_node):
        raise ValueError(f"ranks_per_node={ranks_per_node!r} must be a positive integer dividing ep_size={ep_size}")
    if replicas < 0 or (experts + replicas) % ep_size:
        raise ValueError(f"num_experts + replicas = {experts} + {replicas} must be a multiple of ep_size={ep_size}")
