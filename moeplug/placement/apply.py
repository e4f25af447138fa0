"""Apply a placement to a live expert-parallel model: move expert rows (and optimizer state), re-route.

Every rank computes the same exchange from the old and new slot tables: each new slot takes its
expert's row from the first old slot that holds the expert, and all rows of one tensor travel in
one uneven `all_to_all_single` over the EP group. Parameters keep their identity (only `.data`
changes, its leading dim may grow or shrink with replicas), so optimizers and hooks stay attached.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ..dispatch import expert_parallel_parameters
from ..ep_layout import ExpertParallel
from ..state import MoEState
from .plan import Placement
from .trace import moe_layers


def _layout(name: str, state: MoEState) -> ExpertParallel:
    if state.ep.ep_size == 1:
        raise ValueError(f"{name} is not expert-parallel; patch with ep_size > 1 (or MoEConfig.ep_size) "
                         "before applying a placement")
    return state.ep


def _table(ep: ExpertParallel) -> torch.Tensor:
    if ep.slots is not None:
        return ep.slots
    return torch.arange(ep.num_experts).view(ep.ep_size, ep.experts_per_rank)


def _exchange_plan(old: torch.Tensor, new: torch.Tensor, rank: int):
    """(rows this rank sends, per-rank send counts, per-rank recv counts, order of received rows)."""
    ranks = old.shape[0]
    source = {}  # expert -> (rank, local slot) of its first old copy
    for r in range(ranks):
        for s, expert in enumerate(old[r].tolist()):
            source.setdefault(expert, (r, s))
    send_rows, send_counts = [], [0] * ranks
    for dest in range(ranks):
        for expert in new[dest].tolist():
            src_rank, src_slot = source[expert]
            if src_rank == rank:
                send_rows.append(src_slot)
                send_counts[dest] += 1
    # Rows arrive grouped by source rank, each group in the order of this rank's new slots.
    mine = [(source[expert][0], slot) for slot, expert in enumerate(new[rank].tolist())]
    recv_counts = [sum(1 for src, _ in mine if src == r) for r in range(ranks)]
    arrival = [slot for r in range(ranks) for src, slot in mine if src == r]
    return send_rows, send_counts, recv_counts, arrival


def move_rows(tensor: torch.Tensor, old: ExpertParallel, new: ExpertParallel) -> torch.Tensor:
    """This rank's [S_old, ...] expert rows under `old` -> [S_new, ...] under `new` (collective)."""
    send_rows, send_counts, recv_counts, arrival = _exchange_plan(_table(old), _table(new), old.ep_rank)
    outgoing = tensor.detach()[torch.tensor(send_rows, dtype=torch.long, device=tensor.device)].contiguous()
    incoming = tensor.new_empty(sum(recv_counts), *tensor.shape[1:])
    dist.all_to_all_single(incoming, outgoing, recv_counts, send_counts, group=old.group)
    out = torch.empty_like(incoming)
    out[torch.tensor(arrival, dtype=torch.long, device=tensor.device)] = incoming
    return out


def current_placement(model: nn.Module) -> Placement:
    """The placement a model's experts modules run with now (contiguous where none was applied)."""
    layouts = {name: _layout(name, state) for name, state in moe_layers(model).items()}
    tables = [_table(ep) for ep in layouts.values()]
    if len({tuple(t.shape) for t in tables}) != 1:
        raise ValueError("experts modules have different slot counts; a Placement needs one per rank for all layers")
    return Placement(torch.stack(tables), next(iter(layouts.values())).num_experts, list(layouts))


def apply_placement(model: nn.Module, plan: Placement, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Move every experts module of an EP model (and `optimizer`'s per-expert state) to `plan`.

    Collective over the EP group: every rank calls it with the same plan. Layer l of the plan goes
    to the l-th experts module in model order (names are checked when the plan has them).
    Gradients are dropped (call between steps). Optimizer state tensors shaped like the parameter
    move with it; scalars (e.g. Adam's step) stay.
    """
    layers = moe_layers(model)
    if plan.num_layers != len(layers):
        raise ValueError(f"plan has {plan.num_layers} layers, the model {len(layers)} experts modules")
    if plan.layer_names and plan.layer_names != list(layers):
        raise ValueError(f"plan layers {plan.layer_names} do not match the model's experts modules {list(layers)}")
    shards = expert_parallel_parameters(model)
    for layer, (name, state) in enumerate(layers.items()):
        old = _layout(name, state)
        if (old.ep_size, old.num_experts) != (plan.ep_size, plan.num_experts):
            raise ValueError(f"{name}: model has ep_size={old.ep_size}, {old.num_experts} experts; plan has "
                             f"ep_size={plan.ep_size}, {plan.num_experts} experts")
        table = plan.slots[layer]
        contiguous = table.numel() == old.num_experts and torch.equal(table.reshape(-1), torch.arange(old.num_experts))
        # The contiguous layout keeps slots=None, which moeplug.checkpoint and shard_experts_ rely on.
        new = old.with_slots(None if contiguous else table)
        for param_name, param in state.experts.named_parameters(recurse=False):
            if f"{name}.{param_name}" not in shards:
                continue
            param_state = optimizer.state.get(param, {}) if optimizer is not None else {}
            for key, value in param_state.items():
                if torch.is_tensor(value) and value.shape == param.shape:
                    param_state[key] = move_rows(value, old, new)
            param.data = move_rows(param.data, old, new)
            param.grad = None
        state.ep = new
