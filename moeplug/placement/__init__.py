"""Expert placement: routing traces -> placement plan -> applied to a live expert-parallel model.

    with torch.no_grad(), record_routing(model) as trace:   # a model patched with ep_size > 1
        for batch in batches: model(batch)
    trace.reduce_()                                        # sum over ranks
    plan = ilp_plan(trace, ep_size)                        # or greedy_plan(trace, ep_size, replicas=8)
    # across hosts: ilp_plan(trace, ep_size, "standard", ranks_per_node=8, replicas=8) (node-aware)
    evaluate(trace, plan)                                  # predicted load and traffic, both traffic models
    apply_placement(model, plan, optimizer)                # collective; outputs and gradients unchanged
"""

from .apply import apply_placement, current_placement
from .checkpoint import load_placed_checkpoint, save_placed_checkpoint
from .cost import (TRAFFIC_MODELS, Cost, context_coherent_cost, evaluate, node_rows, objective, objective_of_share,
                   rank_load, standard_cost)
from .greedy import greedy_plan, replica_counts
from .ilp import ilp_plan
from .plan import Placement
from .refine import refine_plan
from .trace import RoutingTrace, record_routing

__all__ = [
    "Cost", "Placement", "RoutingTrace", "TRAFFIC_MODELS", "apply_placement", "context_coherent_cost",
    "current_placement", "evaluate", "greedy_plan", "ilp_plan", "load_placed_checkpoint", "node_rows", "objective",
    "objective_of_share", "rank_load", "record_routing", "refine_plan", "replica_counts", "save_placed_checkpoint", "standard_cost",
]
