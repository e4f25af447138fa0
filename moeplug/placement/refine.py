"""Local search on a placement: swap two experts of one layer between ranks while the objective falls.

Greedy packing places each copy once and never revisits it; a pass over all cross-rank slot pairs
of every layer, keeping each swap that lowers `cost.objective` (traffic + balance_weight * the
layers' busiest-rank loads), fixes much of what that order got wrong. A swap is refused when it
would make its layer's busiest rank heavier than in the starting plan (so the balance the packing
guaranteed is kept) or put two copies of one expert on one rank. Stops after a pass with no gain,
after `max_passes` passes, or at `time_limit` seconds. A wall-clock limit makes the result depend on the
machine's speed; for a reproducible plan pass `time_limit=None` and (if needed) `max_passes`.
`info["refine"]` says which of the three stopped it.
"""

from __future__ import annotations

import itertools
import time

import torch

from .cost import objective_of_share, rank_load
from .plan import Placement, rank_share
from .trace import RoutingTrace


def refine_plan(trace: RoutingTrace, plan: Placement, traffic_model: str, balance_weight: float = 1.0,
                time_limit: float | None = 10.0, max_passes: int | None = None,
                ranks_per_node: int | None = None) -> Placement:
    """`plan` improved by pairwise swaps (see the module docstring); `info["refine"]` says what changed.

    `time_limit=None` removes the wall-clock limit; `max_passes=None` allows passes until one finds no gain;
    `ranks_per_node` makes the objective node-aware (`cost.objective`).
    """
    if max_passes is not None and max_passes < 1:
        raise ValueError(f"max_passes={max_passes!r} must be a positive integer or None")
    limit = float("inf") if time_limit is None else time_limit
    slots = plan.slots.clone()
    experts, layers = plan.num_experts, plan.num_layers
    peak = rank_load(trace, plan).max(1).values  # [L]: no layer may end heavier than this
    share = plan.rank_share()
    start = best = objective_of_share(trace, share, traffic_model, balance_weight, ranks_per_node)
    places = [(r, s) for r in range(plan.ep_size) for s in range(plan.slots_per_rank)]
    swaps, passes, started = 0, 0, time.perf_counter()
    improved = True
    timed_out = False
    while improved and not timed_out and (max_passes is None or passes < max_passes):
        improved, passes = False, passes + 1
        for layer, ((r1, s1), (r2, s2)) in itertools.product(range(layers), itertools.combinations(places, 2)):
            table = slots[layer]
            a, b = int(table[r1, s1]), int(table[r2, s2])
            if r1 == r2 or a == b or bool((table[r2] == a).any()) or bool((table[r1] == b).any()):
                continue
            table[r1, s1], table[r2, s2] = b, a
            kept = share[layer].clone()
            share[layer] = rank_share(table, experts)
            value = objective_of_share(trace, share, traffic_model, balance_weight, ranks_per_node)
            if value < best - 1e-9 and float((trace.counts[layer] @ share[layer]).max()) <= float(peak[layer]) + 1e-9:
                best, swaps, improved = value, swaps + 1, True
            else:
                table[r1, s1], table[r2, s2] = a, b
                share[layer] = kept
            if time.perf_counter() - started > limit:
                timed_out = True
                break
    stopped = "time_limit" if timed_out else "converged" if not improved else "max_passes"
    info = dict(plan.info, refine={"swaps": swaps, "passes": passes, "objective_before": start,
                                   "objective_after": best, "stopped": stopped,
                                   "seconds": round(time.perf_counter() - started, 3)})
    return Placement(slots, experts, list(plan.layer_names), info)
