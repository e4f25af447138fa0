"""Node-aware placement: the cost model against a per-token count, the MILP against exhaustive search."""

from __future__ import annotations

import itertools

import pytest
import torch

from moeplug.placement import Placement, RoutingTrace, ilp_plan, objective, rank_load
from moeplug.placement.cost import node_rows
from tests.placement.test_planners import _trace


def _choices(tokens: int, experts: int, seed: int, pairs: list[tuple[int, int]] | None = None) -> torch.Tensor:
    """[T, 1, 2] distinct top-2 choices: from `pairs` (when given) for 3 tokens in 4, uniform otherwise."""
    generator = torch.Generator().manual_seed(seed)
    choices = torch.stack([torch.randperm(experts, generator=generator)[:2] for _ in range(tokens)])
    if pairs:
        chosen = torch.tensor(pairs)[torch.randint(len(pairs), (tokens,), generator=generator)]
        keep = torch.rand(tokens, generator=generator) < 0.75
        choices = torch.where(keep[:, None], chosen, choices)
    return choices.unsqueeze(1)


def _counted_rows(choices: torch.Tensor, slots: torch.Tensor, ranks_per_node: int, hierarchical: bool) -> dict:
    """Rows per the dispatch rules, counted token by token and averaged over every source rank."""
    ranks = slots.shape[0]
    rank_of = {int(e): r for r in range(ranks) for e in slots[r]}
    inter = intra = 0.0
    for source, (first, second) in itertools.product(range(ranks), choices[:, 0].tolist()):
        dest = {rank_of[first], rank_of[second]}
        host = source // ranks_per_node
        if hierarchical:  # one row per remote host to the peer (same local index), then spread there
            hosts = {d // ranks_per_node for d in dest}
            inter += len(hosts - {host})
            peers = {h * ranks_per_node + source % ranks_per_node for h in hosts}
            intra += len([d for d in dest if d not in peers])
        else:
            inter += len([d for d in dest if d // ranks_per_node != host])
            intra += len([d for d in dest if d // ranks_per_node == host and d != source])
    return {"inter": inter / ranks, "intra": intra / ranks}


@pytest.mark.parametrize("hierarchical", [False, True])
@pytest.mark.parametrize("ranks_per_node", [1, 2])
def test_node_rows_equal_a_per_token_count(hierarchical, ranks_per_node):
    choices = _choices(60, 8, seed=3)
    slots = torch.tensor([[0, 5], [1, 2], [3, 7], [4, 6]])
    plan = Placement(slots.unsqueeze(0), 8)
    predicted = node_rows(_trace(choices, 8), plan.rank_share(), ranks_per_node, hierarchical)
    counted = _counted_rows(choices, slots, ranks_per_node, hierarchical)
    for key in ("inter", "intra"):  # float64 sums of ~100 terms
        assert predicted[key] == pytest.approx(counted[key], abs=1e-9), key


def _all_plans(experts: int, ranks: int):
    """Every way to put `experts` experts on `ranks` ranks (E/P each), up to the order inside a rank."""
    per_rank = experts // ranks
    seen = set()
    for order in itertools.permutations(range(experts)):
        table = tuple(tuple(sorted(order[r * per_rank:(r + 1) * per_rank])) for r in range(ranks))
        if table not in seen:
            seen.add(table)
            yield torch.tensor(table)


def test_node_aware_milp_finds_the_exhaustive_optimum():
    """8 experts, 2 hosts x 2 ranks; pairs chosen together cross hosts unless the planner knows the hosts."""
    choices = _choices(400, 8, seed=5, pairs=[(0, 4), (1, 5), (2, 6), (3, 7)])
    trace = _trace(choices, 8)
    best = min(objective(trace, Placement(t.unsqueeze(0), 8), "standard", 1.0, ranks_per_node=2)
               for t in _all_plans(8, 4))
    plan = ilp_plan(trace, 4, "standard", ranks_per_node=2, time_limit=None, node_limit=10_000, refine_passes=5)
    assert plan.info["used"] == "ilp"
    # Exact for one copy per expert and top-2 (node_ilp's docstring); float64 sums of ~10^3 terms.
    assert objective(trace, plan, "standard", 1.0, ranks_per_node=2) == pytest.approx(best, rel=1e-9)
    contiguous = Placement.contiguous(1, 8, 4)
    assert node_rows(trace, plan.rank_share(), 2)["inter"] < node_rows(trace, contiguous.rank_share(), 2)["inter"]


def test_milp_places_replicas_to_balance_a_hot_expert():
    """Expert 0 takes a third of the tokens: one copy per expert cannot get max/mean under 1.1; 4 replicas can."""
    generator = torch.Generator().manual_seed(7)
    choices = _choices(600, 8, seed=7)
    hot = torch.rand(600, generator=generator) < 0.6
    choices[:, 0, 0] = torch.where(hot & (choices[:, 0, 1] != 0), 0, choices[:, 0, 0])
    trace = _trace(choices, 8)
    options = dict(traffic_model="standard", ranks_per_node=2, max_imbalance=1.1, time_limit=None, node_limit=2000,
                   refine_passes=3)
    single = ilp_plan(trace, 4, **options)
    replicated = ilp_plan(trace, 4, replicas=4, **options)
    assert replicated.info["used"] == "ilp" and replicated.num_replicas == 4
    imbalance = lambda plan: float((rank_load(trace, plan).max(1).values / rank_load(trace, plan).mean(1)).max())  # noqa: E731
    assert imbalance(single) > 1.1 >= imbalance(replicated)
    for table in replicated.slots[0]:  # two copies on one rank would balance nothing
        assert len(set(table.tolist())) == len(table)


def test_node_aware_options_are_checked():
    trace = _trace(_choices(20, 8, seed=1), 8)
    with pytest.raises(ValueError, match="ranks_per_node=3 must be a positive integer dividing ep_size=4"):
        ilp_plan(trace, 4, "standard", ranks_per_node=3)
    with pytest.raises(ValueError, match="need traffic_model='standard'"):
        ilp_plan(trace, 4, "context_coherent", ranks_per_node=2)
    with pytest.raises(ValueError, match="8 \\+ 2 must be a multiple of ep_size=4"):
        ilp_plan(trace, 4, "standard", replicas=2)
