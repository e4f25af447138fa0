"""Cost model: load per rank and cross-rank token traffic of a placement on a routing trace.

Two traffic models (the numbers they give are not comparable with each other):

- "standard" dispatch: every token starts on its data-parallel rank, is sent to the ranks of its k
  experts and comes back, in every MoE layer. Choices of one token on one rank count once (one
  send per (token, destination rank)), which is what moeplug's all-to-all sends; with `dedup=False`
  every (token, choice) row counts, as in a dispatch that does not deduplicate
  (`ExpertParallel.dedup = False`, and most MoE frameworks). Unless `source_rank` is given, a token's starting rank
  is uniform over the P ranks (data parallel), so a send leaves its rank with probability (P-1)/P.
  Placement helps here only by co-locating a token's k experts of one layer and by balancing load.
- "context_coherent" (ExFlow): a token stays on its expert's rank between layers and pays a hop
  when its next layer's expert lives on another rank. With top-k every (choice at l, choice at
  l+1) pair of a token counts (k^2 pairs), the first dispatch and last combine are left out.

A replicated expert's tokens are split evenly over its copies (`moeplug.dispatch`), so with
replicas these are expectations. Sends counted from pairs are exact for k <= 2; for k > 2 they
are estimated from the trace's raw sample. Traffic is in tokens (rows); bytes = rows * row_bytes;
time = per exchange, the busiest rank's max(sent, received) bytes / bandwidth, summed over
exchanges (dispatch and combine for standard, one hop per layer boundary for context-coherent).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .plan import Placement
from .trace import RoutingTrace

TRAFFIC_MODELS = ("standard", "context_coherent")


@dataclass
class Cost:
    """What a placement costs on a trace under one traffic model."""

    traffic_model: str
    rank_load: torch.Tensor  # [L, P] assignments (token, choice) processed per rank
    traffic: float  # cross-rank rows, one direction, summed over layers
    traffic_per_layer: torch.Tensor  # [L] standard, [L-1] context-coherent
    bytes: float
    time_s: float

    @property
    def max_mean_load(self) -> torch.Tensor:
        """[L] busiest rank's load over the mean rank load (1.0 = perfectly balanced)."""
        return self.rank_load.max(1).values / self.rank_load.mean(1).clamp_min(1e-12)

    def summary(self) -> dict:
        """Plain numbers for printing and JSON."""
        imbalance = self.max_mean_load
        return {"traffic_model": self.traffic_model, "traffic_rows": round(self.traffic, 3),
                "bytes": self.bytes, "time_s": self.time_s, "max_mean_load_mean": float(imbalance.mean()),
                "max_mean_load_max": float(imbalance.max())}


def _check(trace: RoutingTrace, plan: Placement) -> None:
    if (trace.num_layers, trace.num_experts) != (plan.num_layers, plan.num_experts):
        raise ValueError(f"trace has {trace.num_layers} layers x {trace.num_experts} experts, plan has "
                         f"{plan.num_layers} x {plan.num_experts}")


def rank_load(trace: RoutingTrace, plan: Placement) -> torch.Tensor:
    """[L, P] expected assignments per rank per layer."""
    _check(trace, plan)
    return torch.einsum("le,lep->lp", trace.counts, plan.rank_share())


def _destinations(trace: RoutingTrace, share: torch.Tensor) -> torch.Tensor:
    """[L, P] tokens with at least one choice on rank r (expected), per layer."""
    load = torch.einsum("le,lep->lp", trace.counts, share)
    if trace.top_k == 1:
        return load
    if trace.top_k == 2:  # inclusion-exclusion: a token whose two choices share a rank is sent once
        off = trace.pairs - torch.diag_embed(torch.diagonal(trace.pairs, dim1=1, dim2=2))
        return load - 0.5 * torch.einsum("lef,lep,lfp->lp", off, share, share)
    sample = trace.sample_rows()
    if sample is None or len(sample) == 0:
        raise ValueError(f"top_k={trace.top_k} > 2: deduplicated sends need a raw sample; record the trace "
                         "with sample_tokens > 0 or use dedup=False")
    padded = torch.cat([share, share.new_zeros(share.shape[0], 1, share.shape[2])], 1)  # row E: dropped
    ids = torch.where(sample < 0, trace.num_experts, sample)  # [N, L, k]
    per_choice = padded[torch.arange(trace.num_layers)[None, :, None], ids]  # [N, L, k, P]
    reached = 1 - (1 - per_choice).prod(2)  # [N, L, P]
    return reached.sum(0) * (trace.tokens / len(sample))


def _exchange_time(sent: torch.Tensor, received: torch.Tensor, row_bytes: float, bandwidth: float) -> float:
    """Sum over exchanges ([X, P] rows per rank) of the busiest rank's time."""
    return float(torch.maximum(sent, received).max(-1).values.sum()) * row_bytes / bandwidth


def standard_cost(trace: RoutingTrace, plan: Placement, row_bytes: float = 1.0, bandwidth: float = 1.0,
                  source_rank: int | None = None, dedup: bool = True) -> Cost:
    """Standard dispatch (see the module docstring); `source_rank`: all traced tokens start there."""
    load = rank_load(trace, plan)
    destinations = _destinations(trace, plan.rank_share()) if dedup else load
    ranks = plan.ep_size
    if source_rank is None:
        received = destinations * (ranks - 1) / ranks
        sent = (destinations.sum(1, keepdim=True) - destinations) / ranks
    else:
        if not 0 <= source_rank < ranks:
            raise ValueError(f"source_rank={source_rank} is not a rank of ep_size={ranks}")
        received = destinations.clone()
        received[:, source_rank] = 0
        sent = torch.zeros_like(received)
        sent[:, source_rank] = received.sum(1)
    per_layer = received.sum(1)
    traffic = float(per_layer.sum())
    # Dispatch and combine move the same rows in opposite directions.
    time_s = 2 * _exchange_time(sent, received, row_bytes, bandwidth)
    return Cost("standard" if dedup else "standard_rows", load, traffic, per_layer, 2 * traffic * row_bytes, time_s)


def context_coherent_cost(trace: RoutingTrace, plan: Placement, row_bytes: float = 1.0,
                          bandwidth: float = 1.0) -> Cost:
    """Context-coherent dispatch (ExFlow; see the module docstring)."""
    load = rank_load(trace, plan)
    share = plan.rank_share()
    before, after = share[:-1], share[1:]  # [L-1, E, P]
    moves = trace.transitions
    stay = torch.einsum("lef,lep,lfp->l", moves, before, after)
    per_layer = moves.sum((1, 2)) - stay
    sent = torch.einsum("lef,lep->lp", moves, before) - torch.einsum("lef,lep,lfp->lp", moves, before, after)
    received = torch.einsum("lef,lfp->lp", moves, after) - torch.einsum("lef,lep,lfp->lp", moves, before, after)
    traffic = float(per_layer.sum())
    return Cost("context_coherent", load, traffic, per_layer, traffic * row_bytes,
                _exchange_time(sent, received, row_bytes, bandwidth))


def node_share(share: torch.Tensor, ranks_per_node: int) -> torch.Tensor:
    """[L, E, N] share of expert e's tokens served by host n, from [L, E, P] rank shares."""
    layers, experts, ranks = share.shape
    if ranks_per_node < 1 or ranks % ranks_per_node:
        raise ValueError(f"ranks_per_node={ranks_per_node} must be a positive integer dividing ep_size={ranks}")
    return share.view(layers, experts, ranks // ranks_per_node, ranks_per_node).sum(-1)


def node_rows(trace: RoutingTrace, share: torch.Tensor, ranks_per_node: int, hierarchical: bool = True) -> dict:
    """Expected standard-dispatch rows (one direction, summed over layers) across hosts and inside hosts.

    Tokens start on a uniform random rank. Flat dispatch sends a row per (token, destination rank):
    it crosses hosts unless the source shares the rank's host ((N-1)/N of rows), and crosses ranks
    inside a host otherwise (the source is another rank of that host: (L-1)/P). Hierarchical dispatch
    (`moeplug.dispatch`) sends a row per (token, destination host) across ((N-1)/N of them), then the
    receiving peer spreads one row per (token, destination rank) to the other ranks of its host
    ((L-1)/L: the peer is one of the L ranks). Bytes = 2 x rows x row bytes (dispatch + combine).
    """
    ranks = share.shape[-1]
    nodes = ranks // ranks_per_node
    per_rank = float(_destinations(trace, share).sum())
    if not hierarchical:
        return {"inter": per_rank * (nodes - 1) / nodes, "intra": per_rank * (ranks_per_node - 1) / ranks}
    per_node = float(_destinations(trace, node_share(share, ranks_per_node)).sum())
    return {"inter": per_node * (nodes - 1) / nodes, "intra": per_rank * (ranks_per_node - 1) / ranks_per_node}


def evaluate(trace: RoutingTrace, plan: Placement, row_bytes: float = 1.0, bandwidth: float = 1.0) -> dict[str, Cost]:
    """Both traffic models, plus "standard_rows": the rows a non-deduplicating dispatch would send."""
    return {"standard": standard_cost(trace, plan, row_bytes, bandwidth),
            "standard_rows": standard_cost(trace, plan, row_bytes, bandwidth, dedup=False),
            "context_coherent": context_coherent_cost(trace, plan, row_bytes, bandwidth)}


# Node-aware objectives price a row across hosts like this many rows inside one: inter-host rows first.
INTER_NODE_WEIGHT = 100.0


def objective(trace: RoutingTrace, plan: Placement, traffic_model: str, balance_weight: float,
              ranks_per_node: int | None = None) -> float:
    """What the planners minimise: cross-rank rows + balance_weight * sum over layers of the busiest
    rank's load (both in tokens, so balance_weight = 1 prices a token of bottleneck compute like a
    token moved). With `ranks_per_node` (standard model only) the rows are those of hierarchical
    dispatch (`node_rows`): INTER_NODE_WEIGHT x rows across hosts + rows inside hosts."""
    _check(trace, plan)
    return objective_of_share(trace, plan.rank_share(), traffic_model, balance_weight, ranks_per_node)


def objective_of_share(trace: RoutingTrace, share: torch.Tensor, traffic_model: str, balance_weight: float,
                       ranks_per_node: int | None = None) -> float:
    """`objective` from the [L, E, P] rank shares of a plan (`Placement.rank_share`): cheap to re-evaluate
    after changing one layer's share, which is what local search does."""
    if traffic_model not in TRAFFIC_MODELS:
        raise ValueError(f"traffic_model={traffic_model!r}; expected one of {TRAFFIC_MODELS}")
    peaks = float(torch.einsum("le,lep->lp", trace.counts, share).max(1).values.sum())
    if ranks_per_node is not None:
        if traffic_model != "standard":
            raise ValueError(f"ranks_per_node needs traffic_model='standard' (hierarchical dispatch), "
                             f"got {traffic_model!r}")
        rows = node_rows(trace, share, ranks_per_node)
        return INTER_NODE_WEIGHT * rows["inter"] + rows["intra"] + balance_weight * peaks
    if traffic_model == "standard":
        ranks = share.shape[-1]
        traffic = float(_destinations(trace, share).sum()) * (ranks - 1) / ranks  # uniform source rank
    else:
        moves = trace.transitions
        traffic = float(moves.sum() - torch.einsum("lef,lep,lfp->", moves, share[:-1], share[1:]))
    return traffic + balance_weight * peaks
