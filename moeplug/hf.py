"""Patch Hugging Face transformers 5.x MoE models in place, through the library's own extension points.

- Experts: an experts implementation named "moeplug" is registered in transformers'
  `ALL_EXPERTS_FUNCTIONS` and selected with `model.set_experts_implementation`; weights stay
  where they are.
- Routers: each router module's class is swapped for a subclass of its own class (so
  transformers' router-logit recording, which matches by class, keeps working). The subclass runs
  the model's own routing, then adds capacity dropping, per-layer losses and statistics.
- Losses: a forward hook on the model adds the per-layer losses to `output.loss` and reports
  them as `output.aux_loss`, where transformers' `output_router_logits=True` path puts its own.

With no options the patched model computes exactly what transformers computes (its own loss,
including its balancing loss that pools all layers' experts by index); options are opt-in.
"""

from __future__ import annotations

import functools
import sys
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

from .balance import RouterStats, auxiliary_losses, track_step
from .config import MoEConfig
from .dispatch import expert_parallel, uses_external_groups
from .experts import run_experts, shard_experts_
from .router import apply_capacity, check_logits

EXPERTS_IMPLEMENTATION = "moeplug"
# Families whose routers and experts are tested against transformers' own modules.
SUPPORTED_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss")
# Router score functions that differ from softmax (used for balancing-loss probabilities).
_SIGMOID_FAMILIES = ("deepseek_v3",)
PATCH_OPTIONS = ("capacity_factor", "drop_policy", "balance", "aux_loss_coef", "z_loss_coef", "ep_size")
_EXPERT_PARAMS = ("gate_up_proj", "up_proj", "down_proj", "gate_up_proj_bias", "up_proj_bias", "down_proj_bias")


def _hf_experts_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                        top_k_weights: torch.Tensor) -> torch.Tensor:
    """transformers experts-interface entry: run a fused-3-D experts module with grouped GEMMs."""
    if self.has_gate:
        w_in, in_bias, activation = self.gate_up_proj, getattr(self, "gate_up_proj_bias", None), self._apply_gate
    else:
        w_in, in_bias, activation = self.up_proj, getattr(self, "up_proj_bias", None), self.act_fn
    w_out, out_bias = self.down_proj, getattr(self, "down_proj_bias", None)
    if not self.is_transposed:  # stored as [E, out, in]; the GEMM wants (in, out) per expert
        w_in, w_out = w_in.transpose(1, 2), w_out.transpose(1, 2)
    return run_experts(
        hidden_states, top_k_index, top_k_weights, w_in, w_out, activation,
        in_bias if self.has_bias else None, out_bias if self.has_bias else None,
        self.post_expert_norm if getattr(self, "has_post_expert_norm", False) else None,
        getattr(self, "moeplug_ep", None),
        may_drop=self._moeplug.config.capacity_factor is not None,
    )


ALL_EXPERTS_FUNCTIONS.register(EXPERTS_IMPLEMENTATION, _hf_experts_forward)


@dataclass
class _PatchState:
    """Shared by one patched model's routers, experts and hooks.

    The hooks are methods of this object (not closures), so a deep copy or a pickle of the model
    carries its own state, and its hooks read its own routers.
    """

    config: MoEConfig
    score_func: str
    token_mask: torch.Tensor | None = None
    num_sequences: int = 1
    routers: dict[str, nn.Module] = field(default_factory=dict)
    hooks: list = field(default_factory=list)
    previous_experts_implementation: str | None = None
    previous_aux_coef: float | None = None
    # Set by BalanceController when aux-loss-free balancing is on: routers then choose experts
    # by score + bias (DeepSeek-V3 already does, through its own e_score_correction_bias).
    biased_selection: bool = False
    family: str = ""

    def capture_batch(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook of the model: remember the batch's padding mask and sequence count."""
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        self.num_sequences = ids.shape[0] if isinstance(ids, torch.Tensor) and ids.dim() >= 2 else 1
        # transformers also passes 4-D masks, or a dict of them per attention type (static caches):
        # only a 2-D [batch, seq] padding mask says which tokens are padding.
        mask = kwargs.get("attention_mask")
        self.token_mask = mask.reshape(-1) if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        for router in self.routers.values():
            router.moeplug_aux_loss = None

    def add_aux_loss(self, module: nn.Module, args: tuple, kwargs: dict, output):
        """Forward hook of the model: add the routers' per-layer losses to `loss` and `aux_loss`."""
        losses = [r.moeplug_aux_loss for r in self.routers.values() if r.moeplug_aux_loss is not None]
        if not losses:
            return output
        total = torch.stack([loss.float() for loss in losses]).sum()
        if getattr(output, "loss", None) is not None:
            output["loss"] = output.loss + total.to(output.loss.dtype)
        if hasattr(output, "aux_loss"):
            output["aux_loss"] = total
        return output


def _biased_selection(router: nn.Module, family: str, logits: torch.Tensor, bias: torch.Tensor):
    """Re-pick the top-k experts by score + bias and recompute gate weights the family's way."""
    logits32 = logits.float()
    scores = torch.softmax(logits32, dim=-1)
    index = (scores + bias).topk(router.top_k, dim=-1).indices
    if family == "gpt_oss":  # softmax over the chosen logits
        weights = torch.softmax(logits32.gather(1, index), dim=-1)
    else:
        weights = scores.gather(1, index)
        if family == "mixtral" or getattr(router, "norm_topk_prob", False):
            weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(logits.dtype), index


class _MoEPlugRouter:
    """Mixin placed before a model's router class: same routing, plus capacity, losses, stats."""

    _moeplug: _PatchState

    def forward(self, hidden_states, *args, **kwargs):
        logits, weights, index = super().forward(hidden_states, *args, **kwargs)
        state, cfg = self._moeplug, self._moeplug.config
        check_logits(logits, self.num_experts)
        if state.biased_selection and hasattr(self, "moeplug_selection_bias"):
            weights, index = _biased_selection(self, state.family, logits, self.moeplug_selection_bias)
        logits32 = logits.float()
        if state.score_func == "softmax":
            probs = torch.softmax(logits32, dim=-1)
        else:
            probs = torch.sigmoid(logits32)
            probs = probs / probs.sum(dim=-1, keepdim=True)
        selected = index
        index, weights, dropped = apply_capacity(index, weights, probs, self.num_experts,
                                                 cfg.capacity_factor, cfg.drop_policy)
        mask = state.token_mask if state.token_mask is not None and state.token_mask.numel() == len(probs) else None
        global_counts = None
        if self.training:
            global_counts = track_step(self.moeplug_step_counts, selected, self.num_experts, cfg.balance, mask)
        self.moeplug_aux_loss, lbl, z = auxiliary_losses(
            logits32, probs, selected, self.top_k, cfg.balance, cfg.aux_loss_coef or 0.0, cfg.z_loss_coef,
            mask, state.num_sequences, global_counts,
        )
        self.moeplug_stats = RouterStats(index, probs, dropped, lbl, z)
        return logits, weights, index

    def __reduce_ex__(self, protocol):
        # The patched class is made at run time and cannot be found by name: pickle (torch.save) and
        # deepcopy rebuild it from the model's own router class.
        return _new_patched_router, (self._moeplug_base,), self.__getstate__()


_router_classes: dict[type, type] = {}


def _patched_router_class(cls: type) -> type:
    if cls not in _router_classes:
        _router_classes[cls] = type(f"MoEPlug{cls.__name__}", (_MoEPlugRouter, cls), {"_moeplug_base": cls})
    return _router_classes[cls]


def _new_patched_router(base: type) -> nn.Module:
    """An empty instance of the patched subclass of `base` (its state is restored by unpickling)."""
    return object.__new__(_patched_router_class(base))


def _init_weights_and_router_buffers(owner: nn.Module, module: nn.Module) -> None:
    """`owner`'s own `_init_weights(module)`, then the buffers the patch added to a router.

    transformers materialises a model built on the meta device (from_pretrained, `init_weights()`
    after `to_empty`) by running `_init_weights` on every module, non-persistent buffers included;
    the selection bias must start at zero like transformers' own buffers start at their values.
    """
    type(owner)._init_weights(owner, module)
    if isinstance(module, _MoEPlugRouter) and "moeplug_selection_bias" in module._buffers:
        with torch.no_grad():
            module.moeplug_selection_bias.zero_()


def _is_router(module: nn.Module) -> bool:
    name = type(module).__name__.lower()
    return name.endswith("topkrouter") and hasattr(module, "num_experts") and hasattr(module, "top_k")


def _is_experts(module: nn.Module) -> bool:
    return hasattr(module, "is_transposed") and isinstance(getattr(module, "down_proj", None), nn.Parameter)


@dataclass
class PatchReport:
    """What `patch_model` changed: the family, the router and experts modules, the options."""

    family: str
    routers: list[str]
    experts: list[str]
    options: dict

    def __str__(self) -> str:
        return (f"moeplug patched {self.family}: {len(self.routers)} routers, {len(self.experts)} experts "
                f"modules, options {self.options or 'none (drop-in)'}")


def _make_config(model: nn.Module, options: dict) -> MoEConfig:
    unknown = sorted(set(options) - set(PATCH_OPTIONS))
    if unknown:
        raise TypeError(f"unknown patch_model option(s) {unknown}; supported: {list(PATCH_OPTIONS)}")
    options = {"balance": "hf", **options, "ep_size": 1}  # ep_size is checked per experts module
    if options.get("aux_loss_coef") is None:
        options["aux_loss_coef"] = float(getattr(model.config, "router_aux_loss_coef", 0.0) or 0.0)
    # Width-free validation: the per-model sizes do not matter for these options.
    return MoEConfig(num_experts=1, top_k=1, **options)


def _warn_if_plain_deepspeed(ep_size) -> None:
    """Expert shards under a plain `deepspeed.initialize` would be averaged over all ranks: say so."""
    deepspeed = sys.modules.get("deepspeed")
    if (isinstance(ep_size, int) and ep_size > 1 and deepspeed is not None and deepspeed.comm.is_initialized()
            and not uses_external_groups(ep_size)):
        warnings.warn(f"moeplug.patch_model(ep_size={ep_size}) under DeepSpeed: use "
                      "moeplug.integrations.deepspeed.patch_model (and its param_groups / initialize) so that "
                      "ZeRO reduces each expert shard over its expert-data-parallel group; a plain "
                      "deepspeed.initialize would average different experts' gradients across ranks",
                      stacklevel=3)


def patch_model(model: nn.Module, **options) -> PatchReport:
    """Patch a transformers MoE model in place and return a report of what changed.

    With no options the model computes exactly what it computed before (logits, loss and
    transformers' own aux loss), only faster. Options (see `MoEConfig` for their meaning):
    `capacity_factor`, `drop_policy`, `balance` ("hf" default, "micro", "sequence", "global", "none"),
    `aux_loss_coef` (default: the model's `router_aux_loss_coef`), `z_loss_coef`.
    Any balance other than "hf" replaces transformers' pooled loss by per-layer losses, added to
    `output.loss` and reported in `output.aux_loss`. `ep_size` > 1 shards every experts module over
    that many ranks (torch.distributed must be initialised; see `moeplug.dispatch`).

    Raises:
        ValueError: for an unsupported model family or a bad option value; TypeError for an
        unknown option; RuntimeError if the model is already patched.
    """
    family = getattr(getattr(model, "config", None), "model_type", None)
    if family not in SUPPORTED_FAMILIES:
        raise ValueError(f"model family {family!r} is not supported by moeplug; supported: {list(SUPPORTED_FAMILIES)}")
    if getattr(model, "_moeplug", None) is not None:
        raise RuntimeError("model is already patched by moeplug; call moeplug.unpatch_model(model) first")
    config = _make_config(model, options)
    state = _PatchState(config, "sigmoid" if family in _SIGMOID_FAMILIES else "softmax", family=family)
    experts = [name for name, module in model.named_modules() if _is_experts(module)]
    routers = {name: module for name, module in model.named_modules() if _is_router(module)}
    if not routers or not experts:
        raise ValueError(f"found no MoE routers/experts in this {family} model; nothing to patch")
    _warn_if_plain_deepspeed(options.get("ep_size", 1))
    # Validate (and build process groups) before changing anything, so a bad ep_size leaves the model intact.
    layouts = {name: expert_parallel(options.get("ep_size", 1), model.get_submodule(name).num_experts)
               for name in experts}
    for name, module in routers.items():
        module.__class__ = _patched_router_class(type(module))
        module._moeplug = state
        module.moeplug_aux_loss = None
        module.moeplug_stats = None
        module.moeplug_step_counts = None
        if not hasattr(module, "e_score_correction_bias"):
            # Non-persistent: transformers checkpoints have no slot for it (see BalanceController.state_dict).
            # Zeros on the router's device (meta included); `_init_weights` zeroes it again after to_empty.
            bias = torch.zeros(module.num_experts, device=module.weight.device)
            module.register_buffer("moeplug_selection_bias", bias, persistent=False)
    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            module._init_weights = functools.partial(_init_weights_and_router_buffers, module)
    for name in experts:
        model.get_submodule(name)._moeplug = state
    state.routers = routers
    for name, layout in layouts.items():
        if layout.ep_size > 1:
            module = model.get_submodule(name)
            module.moeplug_ep = layout
            shard_experts_(module, layout, _EXPERT_PARAMS)
    state.previous_experts_implementation = model.config._experts_implementation
    model.set_experts_implementation(EXPERTS_IMPLEMENTATION)
    if config.balance != "hf" and hasattr(model, "router_aux_loss_coef"):
        # transformers adds coef * (its pooled loss) when output_router_logits is on; ours replaces it.
        state.previous_aux_coef = model.router_aux_loss_coef
        model.router_aux_loss_coef = 0.0
    state.hooks = [
        model.register_forward_pre_hook(state.capture_batch, with_kwargs=True),
        model.register_forward_hook(state.add_aux_loss, with_kwargs=True),
    ]
    model._moeplug = state
    return PatchReport(family, list(state.routers), experts, dict(options))


def unpatch_model(model: nn.Module) -> None:
    """Undo `patch_model`: original router classes, experts implementation and loss coefficient."""
    state = getattr(model, "_moeplug", None)
    if state is None:
        raise RuntimeError("model is not patched by moeplug")
    if any(getattr(m, "moeplug_ep", None) is not None for m in model.modules()):
        raise RuntimeError("an expert-parallel model holds only its own experts and cannot return to "
                           "transformers' implementation in place; save it and load the full checkpoint instead")
    for router in state.routers.values():
        router.__class__ = router._moeplug_base
        del router._moeplug, router.moeplug_aux_loss, router.moeplug_stats, router.moeplug_step_counts
        if "moeplug_selection_bias" in router._buffers:
            del router._buffers["moeplug_selection_bias"]
    for hook in state.hooks:
        hook.remove()
    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            module.__dict__.pop("_init_weights", None)
        if _is_experts(module):
            module.__dict__.pop("_moeplug", None)
    model.set_experts_implementation(state.previous_experts_implementation)
    if state.previous_aux_coef is not None:
        model.router_aux_loss_coef = state.previous_aux_coef
    del model._moeplug


def router_stats(model: nn.Module) -> dict[str, RouterStats]:
    """Per-layer routing statistics of the last forward pass, by module name.

    Works for patched transformers models and for models built from `MoELayer`.
    """
    stats = {}
    for name, module in model.named_modules():
        value = getattr(module, "moeplug_stats", None) or getattr(module, "stats", None)
        if isinstance(value, RouterStats):
            stats[name] = value
    return stats
