"""Expert-parallel layouts: which experts each rank holds, and the process groups it talks over.

Each rank of an expert-parallel (EP) group of size P holds S expert slots. By default S = E/P and rank
r owns the contiguous block [r*E/P, (r+1)*E/P). A placement (`moeplug.placement`) gives instead a
`slots` table [P, S] naming the expert held in each slot; an expert may sit in several slots
(replicas), and then a token's assignment goes to copy (token + ep_rank) mod copies, which splits
the expert's tokens evenly over its copies without any communication.

Ranks are laid out EP-major: world rank w is EP rank w % P of EP group w // P. Ranks with the same
EP rank in different groups hold the same experts and form an expert-data-parallel group.
How tokens travel between the ranks of a layout is `moeplug.dispatch`.

Across hosts, `ranks_per_node` (L) says how many consecutive world ranks share a host (torchrun gives
each node a block of LOCAL_WORLD_SIZE consecutive ranks). When an EP group spans whole hosts
(P > L > 1, L divides P) the dispatch is hierarchical by default: one row per (token, destination host)
crosses to the same local rank on that host, which spreads it inside the host (`moeplug.dispatch`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace

import torch
import torch.distributed as dist


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
    ranks_per_node: int | None = None  # consecutive ranks per host; None: every rank on one host
    # Two-hop exchange across hosts (see the module docstring); None: on when the EP group spans hosts.
    hierarchical: bool | None = None
    _copies: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        spans = self.ranks_per_node is not None and self.ep_size > self.ranks_per_node
        per_node = self.ranks_per_node
        if per_node is not None and (per_node < 1 or (spans and self.ep_size % per_node)):
            raise ValueError(f"ranks_per_node={self.ranks_per_node} must be a positive integer dividing "
                             f"ep_size={self.ep_size} (an EP group spans whole hosts) or at least ep_size")
        if self.hierarchical is None:  # one rank per host has nothing to spread: the second hop would only cost
            self.hierarchical = spans and self.ranks_per_node > 1
        elif self.hierarchical and not spans:
            raise ValueError(f"hierarchical dispatch needs an EP group spanning hosts: ep_size={self.ep_size}, "
                             f"ranks_per_node={self.ranks_per_node} (expected ep_size > ranks_per_node)")
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

    @property
    def num_nodes(self) -> int:
        """Hosts this EP group spans (1 when `ranks_per_node` is None or covers the group)."""
        return max(1, self.ep_size // (self.ranks_per_node or self.ep_size))

    def with_slots(self, slots: torch.Tensor | None) -> ExpertParallel:
        """The same ranks, groups and dispatch with another slot table (None: contiguous)."""
        return replace(self, slots=slots)


def node_layout() -> int | None:
    """Ranks per host of this job, or None when it runs on one host.

    MOEPLUG_RANKS_PER_NODE overrides (e.g. to try hierarchical dispatch on one machine); otherwise
    the launcher's processes per host (torchrun's LOCAL_WORLD_SIZE, DeepSpeed's LOCAL_SIZE) when
    WORLD_SIZE is larger and this rank sits at host index (GROUP_RANK, DeepSpeed: CROSS_RANK) x that
    + LOCAL_RANK; launchers that number ranks otherwise get None (flat dispatch).
    """
    override = os.environ.get("MOEPLUG_RANKS_PER_NODE")
    if override:
        if not override.isdigit() or int(override) < 1:
            raise ValueError(f"MOEPLUG_RANKS_PER_NODE={override!r} must be a positive integer")
        return int(override)
    env = os.environ
    try:
        world, local_rank, rank = (int(env[k]) for k in ("WORLD_SIZE", "LOCAL_RANK", "RANK"))
        local = int(env.get("LOCAL_WORLD_SIZE") or env["LOCAL_SIZE"])
        node = int(env.get("GROUP_RANK") or env["CROSS_RANK"])
    except (KeyError, ValueError):
        return None
    return local if world > local and rank == node * local + local_rank else None


DISPATCH_MODES = {"auto": None, "flat": False, "hierarchical": True}

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
    per_node = node_layout()
    if per_node is not None and ep_size > per_node and ep_size % per_node:
        per_node = None  # the EP group cuts through a host: the flat exchange (always correct) it is
    return ExpertParallel(ep_size, rank % ep_size, num_experts, ep_group, dp_group, ranks_per_node=per_node,
                          hierarchical=_dispatch_choice())


def _dispatch_choice() -> bool | None:
    """MOEPLUG_DISPATCH: "flat", "hierarchical" or "auto" (unset: auto = hierarchical across hosts)."""
    choice = os.environ.get("MOEPLUG_DISPATCH", "auto")
    if choice not in DISPATCH_MODES:
        raise ValueError(f"MOEPLUG_DISPATCH={choice!r}; expected one of {list(DISPATCH_MODES)}")
    return DISPATCH_MODES[choice]
