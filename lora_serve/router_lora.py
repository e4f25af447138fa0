"""LoRA on MoE routers (PEFT ``target_parameters=["mlp.gate.weight"]``), per row of a mixed batch.

transformers' MoE routers (``<X>TopKRouter``) are not ``nn.Linear``: each computes its logits as
``F.linear(hidden, self.weight)`` and then its family's softmax / top-k / renormalisation in the same forward.
PEFT adapts the router weight like a linear (``W + B A``, ``A [r, H]``, ``B [E, r]``), which changes the logits
and so which experts a token is sent to. Here the router's class is swapped for a subclass whose forward
runs the family's own forward under a ``TorchFunctionMode`` that adds each row's
``scale · x Aᵀ Bᵀ`` (``kernels.add_lora`` with the step's segments) to the result of that one
``F.linear(hidden, self.weight)`` call, so every family's routing code runs unchanged. A router whose forward
computes its logits another way is refused when a step first meets it.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from kernels.lora import PagedLoRA, add_lora

from .adapter_store import LinearShape
from .step_batch import ActiveStep

_STATE = "lora_serve_router"  # attribute of each adapted router: (ActiveStep, PagedLoRA)
_SUBCLASSES: dict[type, type] = {}


def is_router(module: nn.Module) -> bool:
    """Whether ``module`` is a transformers MoE router whose 2-D ``weight`` LoRA may target."""
    weight = getattr(module, "weight", None)
    return (type(module).__name__.endswith("Router") and isinstance(weight, nn.Parameter) and weight.dim() == 2
            and not isinstance(module, nn.Linear))


def shape(module: nn.Module) -> LinearShape:
    """The router's logits as a linear: hidden -> experts."""
    return LinearShape(in_features=module.weight.shape[1], out_features=module.weight.shape[0])


class _AddRowLoRA(TorchFunctionMode):
    """Adds the step's per-row LoRA to the output of ``F.linear(x, weight)`` for this one ``weight``."""

    def __init__(self, weight: torch.Tensor, lora: PagedLoRA, segments):
        super().__init__()
        self.weight, self.lora, self.segments = weight, lora, segments
        self.applied = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))  # the mode is off inside its own handler
        if func is F.linear and len(args) > 1 and args[1] is self.weight:
            add_lora(out.view(-1, out.shape[-1]), args[0].reshape(-1, args[0].shape[-1]), self.lora, self.segments)
            self.applied = True
        return out


def _forward(self, hidden_states: torch.Tensor, *args, **kwargs):
    active, lora = getattr(self, _STATE)
    base_forward = type(self).__mro__[1].forward  # the family's own router forward
    step = active.batch
    if step is None or step.lora is None or lora.num_set == 0:
        return base_forward(self, hidden_states, *args, **kwargs)
    mode = _AddRowLoRA(self.weight, lora, step.lora)
    with mode:
        out = base_forward(self, hidden_states, *args, **kwargs)
    if not mode.applied:
        raise RuntimeError(
            f"{type(self).__mro__[1].__name__} does not compute its logits as F.linear(hidden, weight); "
            "lora_serve cannot apply LoRA on its router weight"
        )
    return out


def adapt(module: nn.Module, active: ActiveStep, pool: torch.Tensor, capacity: int) -> PagedLoRA:
    """Make router ``module`` apply per-row LoRA from ``active``'s step; return its page tables (idempotent)."""
    if hasattr(module, _STATE):
        return getattr(module, _STATE)[1]
    cls = type(module)
    if cls not in _SUBCLASSES:  # a subclass keeps isinstance checks (transformers records router logits by class)
        _SUBCLASSES[cls] = type(f"LoRAServe{cls.__name__}", (cls,), {"forward": _forward})
    lora = PagedLoRA(pool, module.weight.shape[1], module.weight.shape[0], capacity)
    setattr(module, _STATE, (active, lora))
    module.__class__ = _SUBCLASSES[cls]
    return lora
