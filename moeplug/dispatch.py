"""Expert parallelism: experts sharded over ranks, tokens moved with uneven all-to-alls.

Each rank of an expert-parallel (EP) group of size P holds S expert slots. By default S = E/P and rank
r owns the contiguous block [r*E/P, (r+1)*E/P). A placement (`moeplug.placement`) gives instead a
`slots` table [P, S] naming the expert held in each slot; an expert may sit in several slots
(replicas), and then a token's assignment goes to copy (token + ep_rank) mod copies, which splits
the expert's tokens evenly over its copies without any communication.

A rank routes its own tokens and sends each token once to every rank holding at least one of its
chosen experts, with the local slots and gate weights of its choices there (deduplicated dispatch:
a token whose k experts share a rank costs one row, not k). That rank runs its local experts on
the token and sums their gated outputs, so the combine, too, sends one row per (token, rank) back,
where the rows of a token's ranks are added up. Both all-to-alls use `all_to_all_single` with
per-rank split sizes (the list form fails with uneven sizes under gloo) and are differentiable, so
backward runs the mirror-image exchange and the gate weights get their gradients on the expert side.
`ExpertParallel.dedup = False` sends one row per (token, choice) instead, as most MoE frameworks do
(kept as the baseline that placement benchmarks compare against).

Ranks are laid out EP-major: world rank w is EP rank w % P of EP group w // P. Ranks with the same
EP rank in different groups hold the same experts and form an expert-data-parallel group.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol


@dataclass
class ExpertParallel:
    """An expert-parallel layout: which experts this rank holds and whom it talks to."""

    ep_size: int
    ep_rank: int
    num_experts: int
    group: object = None  # the EP process group (None: the default group when ep_size == world)
    expert_dp_group: object = None  # ranks holding the same experts (None when there is one EP group)
    # [ep_size, S] global expert id held by each slot of each rank; None: the contiguous layout.
    slots: torch.Tensor | None = None
    # One row per (token, destination rank) when True; one per (token, choice) when False.
    dedup: bool = True
    _copies: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.slots is None:
            return
        self.slots = torch.as_tensor(self.slots, dtype=torch.long)
        if self.slots.dim() != 2 or self.slots.shape[0] != self.ep_size:
            raise ValueError(f"slots has shape {tuple(self.slots.shape)}, expected [ep_size={self.ep_size}, slots]")
        held = torch.bincount(self.slots.reshape(-1), minlength=self.num_experts)
        if self.slots.min() < 0 or len(held) > self.num_experts or bool((held == 0).any()):
            raise ValueError(f"slots must hold every expert 0..{self.num_experts - 1} at least once and nothing "
                             f"else; got {self.slots.tolist()}")
        # Copies of expert e, as flat slot ids (rank * S + local), padded by repeating the first.
        flat_ids = torch.arange(self.slots.numel())
        order = self.slots.reshape(-1).argsort(stable=True)
        table = flat_ids.new_empty(self.num_experts, int(held.max()))
        starts = torch.cumsum(held, 0) - held
        for column in range(table.shape[1]):
            table[:, column] = order[starts + torch.minimum(held - 1, torch.tensor(column))]
        self._copies = (table, held)

    @property
    def experts_per_rank(self) -> int:
        """Expert slots per rank (E/P for the contiguous layout; more with replicas)."""
        return self.num_experts // self.ep_size if self.slots is None else self.slots.shape[1]

    @property
    def local_experts(self) -> range | tuple[int, ...]:
        """Global ids of the experts in this rank's slots (a range for the contiguous layout)."""
        if self.slots is None:
            return range(self.ep_rank * self.experts_per_rank, (self.ep_rank + 1) * self.experts_per_rank)
        return tuple(self.slots[self.ep_rank].tolist())

    def slot_of(self, expert_ids: torch.Tensor, token_index: torch.Tensor) -> torch.Tensor:
        """Flat slot (rank * S + local slot) serving each assignment; dropped ids (>= E) map to P * S.

        `token_index` (same shape) picks among an expert's copies: copy (token + ep_rank) mod copies.
        """
        if self.slots is None:  # slot id == expert id, and P * S == E for dropped slots
            return expert_ids
        table, copies = self._copies
        kept = expert_ids < self.num_experts
        expert = torch.where(kept, expert_ids, 0)
        slot = table[expert, (token_index + self.ep_rank) % copies[expert]]
        return torch.where(kept, slot, self.slots.numel())

    def with_slots(self, slots: torch.Tensor | None) -> ExpertParallel:
        """The same ranks and groups with another slot table (None: contiguous)."""
        return ExpertParallel(self.ep_size, self.ep_rank, self.num_experts, self.group, self.expert_dp_group, slots,
                              self.dedup)


# This rank's (EP group, expert-data-parallel group) per (world size, ep_size), created once.
_groups: dict[tuple[int, int], tuple] = {}
_external_groups: set[tuple[int, int]] = set()  # keys of _groups registered by use_process_groups


def _ranks(group) -> list[int]:
    return dist.get_process_group_ranks(group) if group is not None else list(range(dist.get_world_size()))


def use_process_groups(ep_size: int, ep_group, expert_dp_group) -> None:
    """Make `expert_parallel(ep_size, ...)` use existing process groups (e.g. DeepSpeed's) on this rank.

    Call on every rank before patching. The groups must have the EP-major layout moeplug uses
    (DeepSpeed's and Megatron's too): `ep_group` = the ep_size consecutive ranks around this rank,
    `expert_dp_group` = the ranks with the same rank modulo ep_size (None when world == ep_size).
    Raises ValueError naming the ranks found and expected otherwise, so both sides agree on who
    holds which experts.
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("use_process_groups needs torch.distributed initialised")
    world, rank = dist.get_world_size(), dist.get_rank()
    if not isinstance(ep_size, int) or ep_size < 1 or world % ep_size:
        raise ValueError(f"ep_size={ep_size!r} must be a positive integer dividing the world size ({world})")
    first = rank - rank % ep_size
    expected = (list(range(first, first + ep_size)), list(range(rank % ep_size, world, ep_size)))
    found = (_ranks(ep_group), _ranks(expert_dp_group) if expert_dp_group is not None else [rank])
    for what, got, want in zip(("expert-parallel", "expert-data-parallel"), found, expected):
        if got != want:
            raise ValueError(f"the {what} group of rank {rank} holds ranks {got}; moeplug's EP-major layout "
                             f"for ep_size={ep_size} in a world of {world} expects {want}")
    _groups[(world, ep_size)] = (ep_group, expert_dp_group if world > ep_size else None)
    _external_groups.add((world, ep_size))


def uses_external_groups(ep_size: int) -> bool:
    """Whether `ep_size` runs on groups registered with `use_process_groups` (e.g. DeepSpeed's)."""
    return dist.is_initialized() and (dist.get_world_size(), ep_size) in _external_groups


def expert_parallel(ep_size: int, num_experts: int) -> ExpertParallel:
    """The `ExpertParallel` layout of this rank for `ep_size`, creating process groups once.

    Must be called on every rank (group creation is collective). Groups registered with
    `use_process_groups` are used instead of new ones. Raises ValueError when torch distributed
    is not initialised or `ep_size` divides neither the world size nor the experts.
    """
    if not isinstance(ep_size, int) or ep_size < 1:
        raise ValueError(f"ep_size={ep_size!r} must be a positive integer")
    if num_experts % ep_size:
        raise ValueError(f"ep_size={ep_size} must divide the number of experts ({num_experts})")
    if ep_size == 1:
        return ExpertParallel(1, 0, num_experts)
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(f"ep_size={ep_size} needs torch.distributed initialised (torchrun, deepspeed or "
                         "accelerate launch), with at least ep_size processes")
    world, rank = dist.get_world_size(), dist.get_rank()
    if world % ep_size:
        raise ValueError(f"ep_size={ep_size} must divide the world size ({world})")
    key = (world, ep_size)
    if key not in _groups:
        # new_group is collective over the whole world: every rank creates every group, keeps its own.
        ep_groups = [dist.new_group(list(range(g * ep_size, (g + 1) * ep_size))) for g in range(world // ep_size)]
        dp_groups = [dist.new_group(list(range(r, world, ep_size))) for r in range(ep_size)] if world > ep_size else None
        _groups[key] = (ep_groups[rank // ep_size], None if dp_groups is None else dp_groups[rank % ep_size])
    ep_group, dp_group = _groups[key]
    return ExpertParallel(ep_size, rank % ep_size, num_experts, ep_group, dp_group)


_traffic: list[tuple] | None = None
_count_assignments = False


@contextmanager
def count_traffic(assignments: bool = False) -> Iterator[list[tuple]]:
    """Record, for every expert-parallel dispatch in the block, (ep_rank, rows sent to each EP rank).

    With `assignments=True` each entry is (ep_rank, rows, assignments): the latter counts the
    (token, choice) pairs sent to each EP rank, i.e. the expert work each rank does for this one.

    The list yielded fills in as layers run; the combine sends the same number of rows back. A row
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
        ep: the layout from `expert_parallel`.
    Returns:
        [T, H], equal to running all experts locally.
    """
    tokens, top_k = top_k_index.shape
    per_rank, ranks = ep.experts_per_rank, ep.ep_size
    assignment = torch.arange(tokens * top_k, device=top_k_index.device)
    slot = ep.slot_of(top_k_index.reshape(-1), assignment // top_k)
    kept = slot < ranks * per_rank  # dropped assignments travel nowhere
    slot, assignment = slot[kept], assignment[kept]
    # A message = the rows one rank sends to one destination for one token (dedup) or one choice.
    # Sorted keys (destination-major) group messages by destination rank, as all_to_all wants.
    unit = assignment // top_k if ep.dedup else assignment
    units = tokens if ep.dedup else tokens * top_k
    keys, message = torch.unique(slot // per_rank * units + unit, return_inverse=True)
    token = keys % units if ep.dedup else keys % units // top_k
    send_counts = torch.bincount(keys // units, minlength=ranks)
    if _traffic is not None:
        work = (torch.bincount(slot // per_rank, minlength=ranks).cpu(),) if _count_assignments else ()
        _traffic.append((ep.ep_rank, send_counts.cpu(), *work))
    send, recv = send_counts.tolist(), _exchange_counts(send_counts, ep).tolist()
    # Each message carries, per choice column, the local slot (per_rank = none) and the gate weight.
    column = message * top_k + assignment % top_k
    local_ids = slot.new_full((len(keys) * top_k,), per_rank).index_copy(0, column, slot % per_rank)
    gates = top_k_weights.reshape(-1)[assignment].to(hidden.dtype)
    gates = gates.new_zeros(len(keys) * top_k).index_copy(0, column, gates).view(-1, top_k)
    received = _all_to_all(torch.cat([hidden.index_select(0, token), gates], 1), recv, send, ep)
    received_ids = _all_to_all(local_ids.view(-1, top_k), recv, send, ep)
    rows, received_gates = received.split([hidden.shape[1], top_k], 1)
    row, choice = (received_ids < per_rank).nonzero(as_tuple=True)
    results = local_experts(rows.index_select(0, row), received_ids[row, choice])
    gated = results * received_gates[row, choice].unsqueeze(-1).to(results.dtype)
    combined = gated.new_zeros(rows.shape[0], gated.shape[-1]).index_add(0, row, gated)
    returned = _all_to_all(combined, send, recv, ep)
    out = returned.new_zeros(tokens, returned.shape[-1]).index_add(0, token, returned)
    return out.to(hidden.dtype)


def expert_parallel_parameters(model: torch.nn.Module) -> dict[str, tuple[torch.nn.Parameter, ExpertParallel]]:
    """Parameters holding only this rank's experts, with their layout, by name.

    Give these names to DDP's ignore list: their gradients are reduced by `allreduce_gradients`
    (over the expert-data-parallel group), not over all ranks.
    """
    found = {}
    for module_name, module in model.named_modules():
        ep = getattr(module, "ep", None) or getattr(module, "moeplug_ep", None)
        if isinstance(ep, ExpertParallel) and ep.ep_size > 1:
            for name, param in module.named_parameters(recurse=False):
                found[f"{module_name}.{name}" if module_name else name] = (param, ep)
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
