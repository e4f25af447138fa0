"""Expert parallelism in motion: tokens moved to their experts' ranks and back, gradients synchronised.

The layouts (who holds which experts, the process groups) are `moeplug.ep_layout`.

A rank routes its own tokens and sends each token once to every rank holding at least one of its
chosen experts, with the local slots and gate weights of its choices there (deduplicated dispatch:
a token whose k experts share a rank costs one row, not k). That rank runs its local experts on
the token and sums their gated outputs, so the combine, too, sends one row per (token, rank) back,
where the rows of a token's ranks are added up. Both all-to-alls use `all_to_all_single` with
per-rank split sizes (the list form fails with uneven sizes under gloo) and are differentiable, so
backward runs the mirror-image exchange and the gate weights get their gradients on the expert side.
`ExpertParallel.dedup = False` sends one row per (token, choice) instead, as most MoE frameworks do
(kept as the baseline that placement benchmarks compare against).

Across hosts (`ExpertParallel.hierarchical`, on by default when an EP group spans hosts with several
ranks each; MOEPLUG_DISPATCH=flat|hierarchical overrides) the exchange takes two hops, as in Tutel's
2D all-to-all: a rank sends one row per (token, destination host) to its peer there (the rank with the
same local index), carrying the token's slots and gates on that host; the peer runs the one-hop
exchange above on what it received, inside its host, and returns one summed row per (token, host).
A token's choices on one host cross the inter-host link once. Both hops use the EP group's
all-to-all with zero-sized splits for ranks they do not address, so no extra process groups exist.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

from .ep_layout import ExpertParallel
from .state import moe_modules


_traffic: list[tuple] | None = None
_count_assignments = False


@contextmanager
def count_traffic(assignments: bool = False) -> Iterator[list[tuple]]:
    """Record, for every expert-parallel dispatch in the block, (ep_rank, rows sent to each EP rank).

    With `assignments=True` each entry is (ep_rank, rows, assignments): the latter counts the
    (token, choice) pairs sent to each EP rank, i.e. the expert work each rank does for this one.

    The list yielded fills in as layers run; the combine sends the same number of rows back. Hierarchical
    dispatch (`ExpertParallel.hierarchical`) adds one entry per hop: first the rows to each host's peer
    rank (assignments all zero), then the rows that peer spreads inside its host. A row
    is one token for one destination rank (one per (token, choice) with `ExpertParallel.dedup`
    False); it carries H hidden values plus k gate weights and k local slot ids. Rows sent to the
    own rank (index ep_rank) never leave the process.
    """
    global _traffic, _count_assignments
    previous, _traffic = (_traffic, _count_assignments), []
    _count_assignments = assignments
    try:
        yield _traffic
    finally:
        _traffic, _count_assignments = previous


def _exchange_counts(send_counts: torch.Tensor, ep: ExpertParallel) -> torch.Tensor:
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts, group=ep.group)
    return recv_counts


def _all_to_all(rows: torch.Tensor, recv: list[int], send: list[int], ep: ExpertParallel) -> torch.Tensor:
    if rows.requires_grad:  # the functional collective is differentiable: backward swaps the splits
        return funcol.all_to_all_single(rows.contiguous(), recv, send, ep.group)
    out = rows.new_empty(sum(recv), *rows.shape[1:])
    dist.all_to_all_single(out, rows.contiguous(), recv, send, group=ep.group)
    return out


def expert_parallel_forward(
    hidden: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    local_experts: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    ep: ExpertParallel,
) -> torch.Tensor:
    """Dispatch tokens to the ranks holding their experts, compute and gate there, combine.

    Args:
        hidden: [T, H] this rank's tokens. top_k_index / top_k_weights: [T, k] global expert ids
            (>= E marks a dropped slot) and gate weights.
        local_experts: maps received rows [R, H] and their local expert ids [R] to outputs [R, H]
            (no gating); e.g. `routed_experts_forward` with top_k = 1 on this rank's weights.
        ep: the layout from `expert_parallel`; `ep.hierarchical` picks the two-hop exchange.
    Returns:
        [T, H], equal to running all experts locally.
    """
    tokens, top_k = top_k_index.shape
    token_of = torch.arange(tokens * top_k, device=top_k_index.device) // top_k
    slot = ep.slot_of(top_k_index.reshape(-1), token_of).view(tokens, top_k)
    if ep.hierarchical:
        return _hierarchical(hidden, slot, top_k_weights, local_experts, ep)
    return _flat(hidden, slot, top_k_weights, local_experts, ep)


def _messages(dest: torch.Tensor, tokens: int, top_k: int, per_choice: bool) -> tuple:
    """Group assignments [T*k] by destination (>= ranks: dropped) into messages, destination-major.

    A message is one row for one destination and one token (or one (token, choice) when
    `per_choice`). Returns (kept assignment ids, message token, message destination, column): the
    column of each kept assignment in the [messages * k] per-choice payload.
    """
    assignment = torch.arange(tokens * top_k, device=dest.device)
    unit = assignment if per_choice else assignment // top_k
    units = tokens * top_k if per_choice else tokens
    kept = dest < _NO_DEST
    assignment = assignment[kept]
    keys, message = torch.unique(dest[kept] * units + unit[kept], return_inverse=True)
    token = keys % units // top_k if per_choice else keys % units
    return assignment, token, keys // units, message * top_k + assignment % top_k


_NO_DEST = 1 << 40  # destination of a dropped assignment: past any rank or host


def _payload(values: torch.Tensor, assignment, column, messages: int, top_k: int, fill) -> torch.Tensor:
    """[messages, k] per-choice values of the messages (`fill` where a choice is not in a message)."""
    return values.new_full((messages * top_k,), fill).index_copy(0, column, values[assignment]).view(-1, top_k)


def _flat(hidden, slot, weights, local_experts, ep: ExpertParallel) -> torch.Tensor:
    """One exchange: a row per (token, destination rank) to the rank itself, gated outputs back."""
    tokens, top_k = slot.shape
    per_rank, ranks = ep.experts_per_rank, ep.ep_size
    flat_slot = slot.reshape(-1)
    dest = torch.where(flat_slot < ranks * per_rank, flat_slot // per_rank, _NO_DEST)
    assignment, token, dest, column = _messages(dest, tokens, top_k, per_choice=not ep.dedup)
    send_counts = torch.bincount(dest, minlength=ranks)
    if _traffic is not None:
        work = (torch.bincount(dest[column // top_k], minlength=ranks).cpu(),) if _count_assignments else ()
        _traffic.append((ep.ep_rank, send_counts.cpu(), *work))
    send, recv = send_counts.tolist(), _exchange_counts(send_counts, ep).tolist()
    # Each message carries, per choice column, the local slot (per_rank = none) and the gate weight.
    local_ids = _payload(flat_slot % per_rank, assignment, column, len(token), top_k, per_rank)
    gates = _payload(weights.reshape(-1).to(hidden.dtype), assignment, column, len(token), top_k, 0.0)
    received = _all_to_all(torch.cat([hidden.index_select(0, token), gates], 1), recv, send, ep)
    received_ids = _all_to_all(local_ids, recv, send, ep)
    rows, received_gates = received.split([hidden.shape[1], top_k], 1)
    row, choice = (received_ids < per_rank).nonzero(as_tuple=True)
    results = local_experts(rows.index_select(0, row), received_ids[row, choice])
    gated = results * received_gates[row, choice].unsqueeze(-1).to(results.dtype)
    combined = gated.new_zeros(rows.shape[0], gated.shape[-1]).index_add(0, row, gated)
    returned = _all_to_all(combined, send, recv, ep)
    return returned.new_zeros(tokens, returned.shape[-1]).index_add(0, token, returned).to(hidden.dtype)


def _hierarchical(hidden, slot, weights, local_experts, ep: ExpertParallel) -> torch.Tensor:
    """Two hops: one row per (token, destination host) to this rank's peer there (the rank with the
    same local index), which runs `_flat` on the rows it received, restricted to its own host; the
    per-host sums come back the same way. A token's choices on one host cross the link once."""
    tokens, top_k = slot.shape
    per_node, dropped = ep.ranks_per_node * ep.experts_per_rank, ep.ep_size * ep.experts_per_rank
    flat_slot = slot.reshape(-1)
    node = torch.where(flat_slot < dropped, flat_slot // per_node, _NO_DEST)
    assignment, token, node, column = _messages(node, tokens, top_k, per_choice=False)
    peer = node * ep.ranks_per_node + ep.ep_rank % ep.ranks_per_node
    send_counts = torch.bincount(peer, minlength=ep.ep_size)
    if _traffic is not None:  # the first hop does no expert work
        work = (torch.zeros_like(send_counts).cpu(),) if _count_assignments else ()
        _traffic.append((ep.ep_rank, send_counts.cpu(), *work))
    send, recv = send_counts.tolist(), _exchange_counts(send_counts, ep).tolist()
    slots_out = _payload(flat_slot, assignment, column, len(token), top_k, dropped)
    gates = _payload(weights.reshape(-1).to(hidden.dtype), assignment, column, len(token), top_k, 0.0)
    received = _all_to_all(torch.cat([hidden.index_select(0, token), gates], 1), recv, send, ep)
    received_slots = _all_to_all(slots_out, recv, send, ep)
    rows, received_gates = received.split([hidden.shape[1], top_k], 1)
    spread = _flat(rows, received_slots, received_gates, local_experts, ep)  # stays inside this host
    returned = _all_to_all(spread, send, recv, ep)
    return returned.new_zeros(tokens, returned.shape[-1]).index_add(0, token, returned).to(hidden.dtype)


def expert_parallel_parameters(model: torch.nn.Module) -> dict[str, tuple[torch.nn.Parameter, ExpertParallel]]:
    """Parameters holding only this rank's experts, with their layout, by name.

    Give these names to DDP's ignore list: their gradients are reduced by `allreduce_gradients`
    (over the expert-data-parallel group), not over all ranks.
    """
    found = {}
    for layer in moe_modules(model):
        ep = layer.state.ep
        if ep.ep_size > 1:
            for name, param in layer.state.experts.named_parameters(recurse=False):
                found[f"{layer.experts_name}.{name}" if layer.experts_name else name] = (param, ep)
    return found


def sum_replica_gradients(model: torch.nn.Module) -> None:
    """Give every copy of a replicated expert the sum of its copies' gradients (call after backward).

    Each copy saw only the tokens routed to it; the expert's gradient is the sum over all of them,
    so after this every copy takes the same optimizer step and the copies stay identical.
    Collective over each EP group; a no-op for layouts without replicas.
    """
    for param, ep in expert_parallel_parameters(model).values():
        if param.grad is None or ep.slots is None or ep.slots.numel() == ep.num_experts:
            continue
        local = ep.slots[ep.ep_rank].to(param.grad.device)
        total = param.grad.new_zeros(ep.num_experts, *param.grad.shape[1:]).index_add_(0, local, param.grad)
        dist.all_reduce(total, group=ep.group)
        param.grad.copy_(total[local])


def _sum_and_scale(grads: list[torch.Tensor], group, scale: float) -> None:
    """All-reduce a list of gradients as one flat buffer (one collective), then scale them."""
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    if group is not None or dist.get_world_size() > 1:
        dist.all_reduce(flat, group=group)
    flat.mul_(scale)
    offset = 0
    for grad in grads:
        grad.copy_(flat[offset: offset + grad.numel()].view_as(grad))
        offset += grad.numel()


def allreduce_gradients(model: torch.nn.Module) -> None:
    """Average gradients for data + expert parallel training without DDP (call after backward).

    The objective is the mean of every rank's loss. Copies of replicated experts (placement) first
    get their summed gradient (`sum_replica_gradients`). Replicated parameters: sum over all ranks,
    divided by the world size. Expert shards already hold the contributions of their EP group's
    tokens (through the all-to-all backward): sum over the expert-data-parallel group (ranks
    holding the same experts), divided by the world size.
    """
    sum_replica_gradients(model)
    world = dist.get_world_size()
    experts = {id(param): ep for param, ep in expert_parallel_parameters(model).values()}
    replicated, by_group = [], {}
    for param in model.parameters():
        if param.grad is None:
            continue
        ep = experts.get(id(param))
        if ep is None:
            replicated.append(param.grad)
        else:
            by_group.setdefault(id(ep.expert_dp_group), (ep.expert_dp_group, []))[1].append(param.grad)
    _sum_and_scale(replicated, None, 1.0 / world)
    for group, grads in by_group.values():
        if group is None:  # a single EP group spans the world: nothing to sum, only the mean's scale
            for grad in grads:
                grad.mul_(1.0 / world)
        else:
            _sum_and_scale(grads, group, 1.0 / world)
