"""Greedy placement: EPLB-style replicas and balanced packing, steered by routing affinity.

Per layer: (1) hand the `replicas` extra slots one at a time to the expert with the highest load
per copy (DeepSeek EPLB's rule); (2) pack the copies for balance alone (EPLB's balanced packing:
heaviest first, each on the least loaded rank with a free slot), which gives the layer's best
busiest-rank load B; (3) pack again, heaviest first, each copy on a rank with a free slot that holds
no copy of it yet (if any) and stays within (1 + `tolerance`) * B (or the least loaded rank when none
does), preferring the rank where the copy saves most traffic:
  - context_coherent: tokens arriving from the previous layer's experts already on that rank;
  - standard: tokens of this layer whose other choice is already on that rank.
If that affinity packing ends above (1 + tolerance) * B (greedy order can paint itself into a
corner), the balanced packing of (2) is used for the layer instead, so the busiest rank never
exceeds (1 + tolerance) times what balance alone reaches. Finally (4) `refine_plan` swaps experts
between ranks while the planners' objective falls, never making a layer's busiest rank heavier.
"""

from __future__ import annotations

import torch

from .cost import TRAFFIC_MODELS
from .plan import Placement
from .refine import refine_plan
from .trace import RoutingTrace


def replica_counts(load: torch.Tensor, slots: int, max_copies: int) -> torch.Tensor:
    """Copies per expert: one each, then extra ones to the highest load per copy, until `slots`."""
    copies = torch.ones(len(load), dtype=torch.long)
    if slots < len(load) or slots > len(load) * max_copies:
        raise ValueError(f"{slots} slots cannot hold {len(load)} experts with at most {max_copies} copies each")
    for _ in range(slots - len(load)):
        per_copy = torch.where(copies < max_copies, load / copies, -1.0)
        copies[int(per_copy.argmax())] += 1
    return copies


def _affinity(trace: RoutingTrace, layer: int, previous: torch.Tensor | None, copies: torch.Tensor,
              traffic_model: str, ranks: int):
    """affinity(expert, table) -> [P] tokens a copy of `expert` saves on each rank, given the slots so far."""
    if traffic_model == "standard":
        together = trace.pairs[layer].clone().fill_diagonal_(0)

        def colocated(expert: int, table: torch.Tensor) -> torch.Tensor:
            held = torch.where(table >= 0, table, expert)  # empty slots point at the expert: weight 0
            return together[expert][held].sum(1)
        return colocated
    if previous is None:  # context-coherent, first layer: nothing to follow yet
        return lambda expert, table: torch.zeros(ranks, dtype=torch.float64)
    share = Placement(previous.unsqueeze(0), trace.num_experts).rank_share()[0]  # [E, P]
    arriving = trace.transitions[layer - 1].T @ share  # [E, P] tokens reaching e from each rank

    def followed(expert: int, table: torch.Tensor) -> torch.Tensor:
        return arriving[expert] / copies[expert]  # each copy serves its share of the arrivals
    return followed


def _no_affinity(expert: int, table: torch.Tensor) -> torch.Tensor:
    return torch.zeros(table.shape[0], dtype=torch.float64)


def _pack(units: list[tuple[float, int]], ranks: int, per_rank: int, cap: float, affinity, total: float):
    """(table [P, S], busiest rank's load): place `units` (weight, expert) in order (see the module docstring)."""
    table = torch.full((ranks, per_rank), -1, dtype=torch.long)
    filled = torch.zeros(ranks, dtype=torch.long)
    rank_load = torch.zeros(ranks, dtype=torch.float64)
    for weight, expert in units:
        open_ = filled < per_rank
        fresh = open_ & ~(table == expert).any(1)
        if bool(fresh.any()):  # two copies on one rank balance nothing; only when no other rank is free
            open_ = fresh
        within = open_ & (rank_load + weight <= cap)
        if not bool(within.any()):  # nothing fits under the cap: the least loaded open rank
            within = open_ & (rank_load == rank_load[open_].min())
        gain = affinity(expert, table)
        # Most traffic saved first, then the least loaded rank (lexicographic through a large offset).
        score = torch.where(within, gain * (1 + total) - rank_load, float("-inf"))
        rank = int(score.argmax())
        table[rank, filled[rank]] = expert
        filled[rank] += 1
        rank_load[rank] += weight
    return table, float(rank_load.max())


def _pack_layer(load: torch.Tensor, copies: torch.Tensor, ranks: int, per_rank: int, tolerance: float,
                affinity) -> torch.Tensor:
    """[P, S] slots for one layer: affinity packing within (1 + tolerance) x the balanced packing's peak."""
    units = [(float(load[e]) / int(copies[e]), e) for e in range(len(load)) for _ in range(int(copies[e]))]
    units.sort(key=lambda unit: (-unit[0], unit[1]))
    total = float(load.sum())
    # A cap of 0 leaves no rank "within": every copy goes to the least loaded open rank (EPLB packing).
    balanced, peak = _pack(units, ranks, per_rank, 0.0, _no_affinity, total)
    cap = (1 + tolerance) * peak
    table, affine_peak = _pack(units, ranks, per_rank, cap, affinity, total)
    return table if affine_peak <= cap * (1 + 1e-12) else balanced


def greedy_plan(trace: RoutingTrace, ep_size: int, replicas: int = 0, traffic_model: str = "context_coherent",
                tolerance: float = 0.05, refine_seconds: float | None = 10.0,
                refine_passes: int | None = None) -> Placement:
    """Place every layer's experts on `ep_size` ranks, layer by layer (see the module docstring).

    Args:
        replicas: extra expert copies per layer; (num_experts + replicas) must divide by ep_size.
        traffic_model: which traffic the affinity term saves ("context_coherent" or "standard").
        tolerance: a rank may exceed the balanced packing's busiest rank by this fraction (of its load)
            to save traffic; 0 keeps each layer as balanced as EPLB's packing.
        refine_seconds: time for the local search (`refine_plan`, balance_weight 1); 0 skips it; None
            removes the wall-clock limit (a plan that does not depend on the machine's speed).
        refine_passes: at most this many local-search passes (None: until a pass finds no gain).
    """
    if traffic_model not in TRAFFIC_MODELS:
        raise ValueError(f"traffic_model={traffic_model!r}; expected one of {TRAFFIC_MODELS}")
    experts = trace.num_experts
    if (experts + replicas) % ep_size or replicas < 0:
        raise ValueError(f"num_experts + replicas = {experts} + {replicas} must be a multiple of ep_size={ep_size}")
    per_rank = (experts + replicas) // ep_size
    layers: list[torch.Tensor] = []
    for layer in range(trace.num_layers):
        load = trace.counts[layer]
        copies = replica_counts(load, experts + replicas, ep_size)
        previous = layers[-1] if layers else None
        affinity = _affinity(trace, layer, previous, copies, traffic_model, ep_size)
        layers.append(_pack_layer(load, copies, ep_size, per_rank, tolerance, affinity))
    plan = Placement(torch.stack(layers), experts, list(trace.layer_names),
                     {"planner": "greedy", "replicas": replicas, "traffic_model": traffic_model,
                      "tolerance": tolerance})
    if refine_seconds is not None and refine_seconds <= 0:
        return plan
    return refine_plan(trace, plan, traffic_model, time_limit=refine_seconds, max_passes=refine_passes)
