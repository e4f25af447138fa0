"""The transformers modules `patch_model` changes: a subclass of each router class and an experts implementation.

- Experts: an experts implementation named "moeplug" is registered in transformers'
  `ALL_EXPERTS_FUNCTIONS` (selected with `model.set_experts_implementation`); it runs the experts module's
  own 3-D weights, and any PEFT LoRA on them, through moeplug's grouped GEMMs.
- Routers: each router module's class is swapped for a subclass of its own class (so transformers'
  router-logit recording, which matches by class, keeps working). The subclass runs the model's own
  routing, then capacity dropping, per-layer losses and statistics (`moeplug.state.account_routing`).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

from .experts import ExpertWeights, LowRank, run_experts
from .router import capped_routing, check_logits, routing_scores
from .state import MoEState, account_routing

EXPERTS_IMPLEMENTATION = "moeplug"
SELECTION_BIAS = "moeplug_selection_bias"  # the router buffer patch_model adds (DeepSeek-V3 has its own)


def _low_rank(experts: nn.Module, name: str) -> LowRank | None:
    """The active LoRA update of expert parameter `name`, as (in, out) factors per expert, or None."""
    factors = experts.moeplug.expert_lora.get(name)
    if factors is None:
        return None
    lhs, rhs, scaling = factors  # delta = scaling * lhs @ rhs in the stored layout
    if experts.is_transposed:
        return LowRank(lhs, rhs, scaling)
    return LowRank(rhs.transpose(1, 2), lhs.transpose(1, 2), scaling)  # (lhs @ rhs)^T = rhs^T @ lhs^T


def _expert_weights(experts: nn.Module) -> ExpertWeights:
    """A transformers fused-3-D experts module's weights, as (in, out) per expert."""
    in_name = "gate_up_proj" if experts.has_gate else "up_proj"
    activation = experts._apply_gate if experts.has_gate else experts.act_fn
    w_in, w_out = getattr(experts, in_name), experts.down_proj
    if not experts.is_transposed:  # stored as [E, out, in]; the GEMM wants (in, out) per expert
        w_in, w_out = w_in.transpose(1, 2), w_out.transpose(1, 2)
    biases = (getattr(experts, f"{in_name}_bias", None), getattr(experts, "down_proj_bias", None))
    return ExpertWeights(
        w_in, w_out, activation, *(biases if experts.has_bias else (None, None)),
        post_norm=experts.post_expert_norm if getattr(experts, "has_post_expert_norm", False) else None,
        in_lora=_low_rank(experts, in_name), out_lora=_low_rank(experts, "down_proj"),
    )


def _hf_experts_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                        top_k_weights: torch.Tensor) -> torch.Tensor:
    """transformers experts-interface entry: run a fused-3-D experts module with grouped GEMMs."""
    state: MoEState = self.moeplug
    return run_experts(hidden_states, top_k_index, top_k_weights, _expert_weights(self), state.ep,
                       may_drop=state.config.capacity_factor is not None)


ALL_EXPERTS_FUNCTIONS.register(EXPERTS_IMPLEMENTATION, _hf_experts_forward)


def _biased_selection(state: MoEState, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-pick the top-k experts by softmax score + selection bias; gate weights as the family computes them."""
    scores = torch.softmax(logits.float(), dim=-1)
    index = (scores + state.selection_bias).topk(state.config.top_k, dim=-1).indices
    weights = scores.gather(1, index)
    if state.config.renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(logits.dtype), index


class PatchedRouter:
    """Mixin placed before a model's router class: same routing, plus capacity, losses, stats."""

    moeplug: MoEState

    def forward(self, hidden_states, *args, **kwargs):
        logits, weights, index = super().forward(hidden_states, *args, **kwargs)
        state = self.moeplug
        check_logits(logits, self.num_experts)
        if state.biased_selection and state.bias_name == SELECTION_BIAS:  # DeepSeek-V3 applies its own bias
            weights, index = _biased_selection(state, logits)
        _, probs = routing_scores(logits, state.config.score_func)
        routing = capped_routing(logits, probs, index, weights, state.config)
        mask = state.batch.token_mask
        if mask is not None and mask.numel() != len(probs):
            mask = None
        account_routing(state, routing, self.training, mask, state.batch.num_sequences)
        return logits, routing.top_k_weights, routing.top_k_index

    def __reduce_ex__(self, protocol):
        # The patched class is made at run time and cannot be found by name: pickle (torch.save) and
        # deepcopy rebuild it from the model's own router class.
        return _new_patched_router, (self._moeplug_base,), self.__getstate__()


_router_classes: dict[type, type] = {}


def patched_router_class(cls: type) -> type:
    if cls not in _router_classes:
        _router_classes[cls] = type(f"MoEPlug{cls.__name__}", (PatchedRouter, cls), {"_moeplug_base": cls})
    return _router_classes[cls]


def _new_patched_router(base: type) -> nn.Module:
    """An empty instance of the patched subclass of `base` (its state is restored by unpickling)."""
    return object.__new__(patched_router_class(base))


def init_weights_and_router_buffers(owner: nn.Module, module: nn.Module) -> None:
    """`owner`'s own `_init_weights(module)`, then the buffers the patch added to a router.

    transformers materialises a model built on the meta device (from_pretrained, `init_weights()`
    after `to_empty`) by running `_init_weights` on every module, non-persistent buffers included;
    the selection bias must start at zero like transformers' own buffers start at their values.
    """
    type(owner)._init_weights(owner, module)
    if isinstance(module, PatchedRouter) and SELECTION_BIAS in module._buffers:
        with torch.no_grad():
            module.moeplug_selection_bias.zero_()


def is_router(module: nn.Module) -> bool:
    name = type(module).__name__.lower()
    return name.endswith("topkrouter") and hasattr(module, "num_experts") and hasattr(module, "top_k")


def is_experts(module: nn.Module) -> bool:
    return hasattr(module, "is_transposed") and isinstance(getattr(module, "down_proj", None), nn.Parameter)
