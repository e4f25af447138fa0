"""The one protocol between an MoE layer and everything that reads or steers it.

Each MoE layer moeplug runs, whether a router + experts pair of a transformers model patched by
`patch_model` or a `MoELayer`, owns one `MoEState`, stored under the attribute `moeplug` of both of
its parts (the routing module and the experts module). The state holds the layer's options
(`MoEConfig`, with the real expert count, top-k and ep_size), its expert-parallel layout, the step
accounting of global-batch balancing, and what its last forward produced (aux loss, statistics).

Consumers (the balance controller, expert-parallel gradient sync, placement, routing traces,
checkpoints, the DeepSpeed integration) find layers with `moe_modules(model)` and ask the state,
never a module's attributes. Both forward paths report their routing through `account_routing`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import nn

from .accounting import StepCounts
from .balance import RouterStats, auxiliary_losses, track_step
from .config import MoEConfig
from .ep_layout import ExpertParallel
from .router import Routing

STATE_ATTR = "moeplug"


@dataclass
class BatchInfo:
    """What a patched transformers model's forward pre-hook learns about the current batch."""

    token_mask: torch.Tensor | None = None  # [tokens] 1 for real tokens, 0 for padding (2-D masks only)
    num_sequences: int = 1


@dataclass(eq=False)
class MoEState:
    """The moeplug state of one MoE layer (see the module docstring).

    Attributes:
        config: the layer's options; for a patched transformers layer the routing itself (scores,
            renormalisation, groups) stays the model's own and the config records its widths and options.
        router / experts: the module that routes (a patched router or a `MoELayer`) and the one that
            holds the expert weights.
        ep: the experts' expert-parallel layout (ep_size 1: every expert on this rank).
        bias_name: the router buffer that the aux-loss-free balancing update moves.
        batch: the model's current batch (patched transformers models; None for `MoELayer`).
        biased_selection: choose experts by score + selection bias (set by `BalanceController`).
        step_counts: the optimizer step's expert loads (set by `BalanceController`).
        aux_loss / stats: the weighted auxiliary loss and `RouterStats` of the last forward.
        expert_lora: during a forward, PEFT LoRA factors of expert parameters by parameter name
            (`(lhs, rhs, scaling)`, delta = scaling * lhs @ rhs in the parameter's layout), set by
            `moeplug.integrations.peft.grouped_activate_lora` around the experts' forward.
    """

    config: MoEConfig
    router: nn.Module = field(repr=False)
    experts: nn.Module = field(repr=False)
    ep: ExpertParallel
    bias_name: str
    batch: BatchInfo | None = None
    biased_selection: bool = False
    step_counts: StepCounts | None = None
    aux_loss: torch.Tensor | None = field(default=None, repr=False)
    stats: RouterStats | None = field(default=None, repr=False)
    expert_lora: dict = field(default_factory=dict, repr=False)

    @classmethod
    def attach(cls, config: MoEConfig, router: nn.Module, experts: nn.Module, ep: ExpertParallel, bias_name: str,
               batch: BatchInfo | None = None) -> MoEState:
        """A new state for the layer made of `router` and `experts`, stored on both of them."""
        state = cls(config, router, experts, ep, bias_name, batch)
        setattr(router, STATE_ATTR, state)
        setattr(experts, STATE_ATTR, state)
        return state

    @property
    def selection_bias(self) -> torch.Tensor:
        """[E] bias added to scores when choosing experts, never to gate weights."""
        return getattr(self.router, self.bias_name)

    def detach(self) -> None:
        """Remove the state from its modules (unpatching)."""
        for module in (self.router, self.experts):
            module.__dict__.pop(STATE_ATTR, None)


class MoEModule(NamedTuple):
    """One MoE layer of a model: its routing module's name, its experts module's name, its state."""

    name: str
    experts_name: str
    state: MoEState


def moe_modules(model: nn.Module) -> list[MoEModule]:
    """Every moeplug MoE layer of `model`, in model order (empty if there is none)."""
    names = {id(module): name for name, module in model.named_modules()}
    found, seen = [], set()
    for module in model.modules():
        state = module.__dict__.get(STATE_ATTR)
        if isinstance(state, MoEState) and id(state) not in seen:
            seen.add(id(state))
            found.append(MoEModule(names[id(state.router)], names[id(state.experts)], state))
    return found


def account_routing(state: MoEState, routing: Routing, training: bool, token_mask: torch.Tensor | None = None,
                    num_sequences: int = 1) -> None:
    """Record one forward's routing in `state`: step counts (training), aux loss, statistics.

    `routing.logits` and `routing.scores` are the router logits and the per-expert probabilities the
    balancing losses use; `token_mask` [T] excludes padding; `num_sequences` splits T for the
    sequence-wise loss.
    """
    cfg = state.config
    global_counts = None
    if training:
        global_counts = track_step(state.step_counts, routing.selected, cfg.num_experts, cfg.balance, token_mask)
    state.aux_loss, lbl, z = auxiliary_losses(
        routing.logits, routing.scores, routing.selected, cfg.top_k, cfg.balance, cfg.aux_loss_coef or 0.0,
        cfg.z_loss_coef, token_mask, num_sequences, global_counts,
    )
    state.stats = RouterStats(routing.top_k_index, routing.scores, routing.dropped, lbl, z)


def router_stats(model: nn.Module) -> dict[str, RouterStats]:
    """Per-layer routing statistics of the last forward pass, by routing module name.

    Works for patched transformers models and for models built from `MoELayer`.
    """
    return {m.name: m.state.stats for m in moe_modules(model) if m.state.stats is not None}
