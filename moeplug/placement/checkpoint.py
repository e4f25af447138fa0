"""Checkpoints of placed models: moeplug.checkpoint's files in the contiguous layout + placement.json.

The expert files stay in the canonical layout (loadable at any ep_size, exportable to
transformers), and the plan travels beside them. Saving moves the experts to the contiguous
layout, saves, and moves them back (two weight exchanges); replicas are identical by
construction (`sum_replica_gradients`), so one copy per expert is saved.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from .. import checkpoint
from .apply import apply_placement, current_placement
from .plan import PLAN_FILE, Placement


def _contiguous(plan: Placement) -> Placement:
    return Placement.contiguous(plan.num_layers, plan.num_experts, plan.ep_size, plan.layer_names)


def save_placed_checkpoint(model: nn.Module, directory: str | Path) -> None:
    """`moeplug.checkpoint.save_checkpoint` for a model with a placement applied (collective)."""
    directory = Path(directory)
    plan = current_placement(model)
    apply_placement(model, _contiguous(plan))
    try:
        checkpoint.save_checkpoint(model, directory)
    finally:
        apply_placement(model, plan)
    if not dist.is_initialized() or dist.get_rank() == 0:
        plan.save(directory / PLAN_FILE)
    if dist.is_initialized():
        dist.barrier()


def load_placed_checkpoint(model: nn.Module, directory: str | Path,
                           optimizer: torch.optim.Optimizer | None = None) -> Placement | None:
    """Load a checkpoint into an EP model and apply its saved placement, if it has one (collective).

    Returns the applied plan (None: the checkpoint had none and the model is left contiguous).
    `optimizer` state, if any, is moved along with the weights.
    """
    directory = Path(directory)
    plan = current_placement(model)
    apply_placement(model, _contiguous(plan), optimizer)
    checkpoint.load_checkpoint(model, directory)
    saved = directory / PLAN_FILE
    if not saved.exists():
        return None
    plan = Placement.load(saved)
    apply_placement(model, plan, optimizer)
    return plan
