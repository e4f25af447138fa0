"""The placement MILP with hosts and replicas (standard dispatch; called by `ilp_plan`).

Per layer l, `replica_counts` (EPLB's rule) fixes how many copies c[e] each expert gets for the
E + replicas slots; the MILP decides where they go. Variables: x[l, e, r] = 1 when a copy of e is on
rank r (sum_r x = c[e], S copies per rank), M[l] >= every rank's load sum_e (counts[e] / c[e]) x[e, r]
(a copy serves 1/c of its expert's tokens), and per affine pair (e, f) of a layer (weight w = tokens
choosing both) co-location variables bounded by both experts' shares:
  - per host n: y[pair, n] <= s[e, n] = sum_{r on n} x[e, r] / c[e], and the same for f;
  - per rank r: z[pair, r] <= x[e, r] / c[e], and the same for f.
Minimise  INTER_NODE_WEIGHT * (N-1)/N * sum(w * (1 - sum_n y)) + (L-1)/L * sum(w * (1 - sum_r z))
          + balance_weight * sum_l M[l],
which is `cost.objective(..., ranks_per_node=L)` (hierarchical dispatch: rows across hosts first, rows
inside hosts second) exactly for one copy per expert and top_k <= 2; with replicas min(s_e, s_f)
stands in for the expected co-location s_e * s_f (an upper bound), so `ilp_plan` re-scores the result
with the exact cost model and keeps the better of it and greedy.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import Bounds, LinearConstraint
from scipy.sparse import coo_matrix

from .cost import INTER_NODE_WEIGHT
from .greedy import replica_counts
from .trace import RoutingTrace


class _Rows:
    """Sparse constraint rows lo <= sum(val * var) <= hi, collected then turned into one matrix."""

    def __init__(self):
        self.rows, self.cols, self.vals, self.lower, self.upper = [], [], [], [], []

    def add(self, entries, lo: float, hi: float) -> None:
        row = len(self.lower)
        for col, val in entries:
            self.rows.append(row)
            self.cols.append(col)
            self.vals.append(val)
        self.lower.append(lo)
        self.upper.append(hi)

    def constraint(self, num_vars: int) -> LinearConstraint:
        matrix = coo_matrix((self.vals, (self.rows, self.cols)), shape=(len(self.lower), num_vars)).tocsr()
        return LinearConstraint(matrix, self.lower, self.upper)


def copies_per_layer(trace: RoutingTrace, ep_size: int, replicas: int) -> torch.Tensor:
    """[L, E] copies of each expert (EPLB's rule: extra copies to the highest load per copy)."""
    slots = trace.num_experts + replicas
    return torch.stack([replica_counts(trace.counts[l], slots, ep_size) for l in range(trace.num_layers)])


def node_milp_problem(trace: RoutingTrace, ep_size: int, ranks_per_node: int, replicas: int, pairs: list,
                      balance_weight: float, max_imbalance: float | None) -> tuple:
    """(cost, constraints, integrality, bounds, copies) of the MILP above; `pairs` = (layer, e, f, w).

    Columns: x[layer, expert, rank] (binary), one y per (pair, host), one z per (pair, rank), M[layer].
    """
    layers, experts = trace.num_layers, trace.num_experts
    nodes, per_rank = ep_size // ranks_per_node, (experts + replicas) // ep_size
    copies = copies_per_layer(trace, ep_size, replicas).double()
    num_x = layers * experts * ep_size
    y0 = num_x
    z0 = y0 + len(pairs) * nodes
    m0 = z0 + len(pairs) * ep_size
    num_vars = m0 + layers

    def x(layer: int, expert: int, rank: int) -> int:
        return (layer * experts + expert) * ep_size + rank

    cost, rows = np.zeros(num_vars), _Rows()
    for l in range(layers):
        for e in range(experts):
            rows.add([(x(l, e, r), 1.0) for r in range(ep_size)], float(copies[l, e]), float(copies[l, e]))
        per_copy = trace.counts[l] / copies[l]
        for r in range(ep_size):
            rows.add([(x(l, e, r), 1.0) for e in range(experts)], per_rank, per_rank)
            rows.add([(x(l, e, r), float(per_copy[e])) for e in range(experts)] + [(m0 + l, -1.0)], -np.inf, 0)
        cost[m0 + l] = balance_weight
    inter, intra = INTER_NODE_WEIGHT * (nodes - 1) / nodes, (ranks_per_node - 1) / ranks_per_node
    for index, (l, e, f, weight) in enumerate(pairs):
        for expert in (e, f):
            share = 1.0 / float(copies[l, expert])
            for n in range(nodes):
                on_host = [(x(l, expert, r), -share) for r in range(n * ranks_per_node, (n + 1) * ranks_per_node)]
                rows.add([(y0 + index * nodes + n, 1.0)] + on_host, -np.inf, 0)
            for r in range(ep_size):
                rows.add([(z0 + index * ep_size + r, 1.0), (x(l, expert, r), -share)], -np.inf, 0)
        cost[y0 + index * nodes: y0 + (index + 1) * nodes] = -inter * weight
        cost[z0 + index * ep_size: z0 + (index + 1) * ep_size] = -intra * weight
    integrality = np.zeros(num_vars)
    integrality[:num_x] = 1
    low, high = np.zeros(num_vars), np.ones(num_vars)
    mean_load = trace.counts.sum(1) / ep_size
    high[m0:] = np.inf if max_imbalance is None else (max_imbalance * mean_load).numpy()
    low[x(0, 0, 0)] = 1  # every rank is as good as any other (hosts and ranks permute): pin one copy
    return cost, rows.constraint(num_vars), integrality, Bounds(low, high), copies


def node_slots(solution: np.ndarray, trace: RoutingTrace, ep_size: int, per_rank: int) -> torch.Tensor:
    """[L, P, S] slot tables read from the x columns of a MILP solution."""
    layers, experts = trace.num_layers, trace.num_experts
    held = np.rint(solution[:layers * experts * ep_size]).reshape(layers, experts, ep_size) > 0.5
    tables = [[torch.from_numpy(np.nonzero(held[l, :, r])[0]) for r in range(ep_size)] for l in range(layers)]
    if any(len(t) != per_rank for layer in tables for t in layer):
        raise RuntimeError("the MILP solution does not give every rank its slots (solver tolerance?)")
    return torch.stack([torch.stack(layer) for layer in tables])
