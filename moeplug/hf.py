"""Patch Hugging Face transformers 5.x MoE models in place, through the library's own extension points.

- Experts and routers: `moeplug.hf_modules` (an experts implementation selected with
  `model.set_experts_implementation`, weights staying where they are; a subclass of each router's class).
- State: one `moeplug.state.MoEState` per MoE block, on its router and experts modules.
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

from .config import MoEConfig
from .ep_layout import ExpertParallel, expert_parallel, uses_external_groups
from .experts import shard_experts_
from .hf_modules import (EXPERTS_IMPLEMENTATION, SELECTION_BIAS, init_weights_and_router_buffers, is_experts, is_router,
                         patched_router_class)
from .state import BatchInfo, MoEState

# Families whose routers and experts are tested against transformers' own modules.
SUPPORTED_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss")
# Router score functions that differ from softmax (used for balancing-loss probabilities).
_SIGMOID_FAMILIES = ("deepseek_v3",)
# Families that renormalise the k chosen gate weights whatever the config says (gpt_oss takes a
# softmax over the chosen logits, which is the same thing).
_RENORMALIZING_FAMILIES = ("mixtral", "gpt_oss")
PATCH_OPTIONS = ("capacity_factor", "drop_policy", "balance", "aux_loss_coef", "z_loss_coef", "ep_size")
_EXPERT_PARAMS = ("gate_up_proj", "up_proj", "down_proj", "gate_up_proj_bias", "up_proj_bias", "down_proj_bias")


@dataclass
class _PatchState:
    """What `patch_model` changed on one model, and the model-level hooks.

    The hooks are methods of this object (not closures), so a deep copy or a pickle of the model
    carries its own state, and its hooks read its own layers.
    """

    family: str
    options: dict
    layers: list[MoEState]
    batch: BatchInfo
    # Each layer's MoE block and the attributes holding its router and experts, and the modules found
    # there at the last forward: PEFT replaces them by its wrappers.
    slots: list[tuple[nn.Module, str, str]]
    heads: list[tuple[nn.Module, nn.Module]]
    hooks: list = field(default_factory=list)
    previous_experts_implementation: str | None = None
    previous_aux_coef: float | None = None

    def adopt_peft_wrappers(self) -> None:
        """Hand PEFT wrappers that appeared around a router or experts to `moeplug.integrations.peft`."""
        if torch.compiler.is_compiling() or "peft" not in sys.modules:
            return  # (compiled code keeps whatever the eager forwards adopted)
        for index, ((block, router_attr, experts_attr), layer) in enumerate(zip(self.slots, self.layers)):
            heads = (getattr(block, router_attr), getattr(block, experts_attr))
            if heads != self.heads[index]:
                from .integrations.peft import adopt_wrappers

                adopt_wrappers(*heads, layer)
                self.heads[index] = heads

    def capture_batch(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook of the model: remember the batch's padding mask and sequence count."""
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        self.batch.num_sequences = ids.shape[0] if isinstance(ids, torch.Tensor) and ids.dim() >= 2 else 1
        # transformers also passes 4-D masks, or a dict of them per attention type (static caches):
        # only a 2-D [batch, seq] padding mask says which tokens are padding.
        mask = kwargs.get("attention_mask")
        self.batch.token_mask = mask.reshape(-1) if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        for layer in self.layers:
            layer.aux_loss = None
        self.adopt_peft_wrappers()

    def add_aux_loss(self, module: nn.Module, args: tuple, kwargs: dict, output):
        """Forward hook of the model: add the layers' losses to `loss` and `aux_loss`."""
        losses = [layer.aux_loss for layer in self.layers if layer.aux_loss is not None]
        if not losses:
            return output
        total = torch.stack([loss.float() for loss in losses]).sum()
        if getattr(output, "loss", None) is not None:
            output["loss"] = output.loss + total.to(output.loss.dtype)
        if hasattr(output, "aux_loss"):
            output["aux_loss"] = total
        return output


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


@dataclass
class _Block:
    """One MoE block of a model: its router and experts modules (and names), and where it holds the experts."""

    router_name: str
    router: nn.Module
    experts_name: str
    experts: nn.Module
    parent: nn.Module
    router_attr: str
    experts_attr: str


def _unwrapped(name: str) -> str:
    """A module name without the `.base_layer` steps of PEFT wrappers around it."""
    while name.endswith(".base_layer"):
        name = name.removesuffix(".base_layer")
    return name


def _find_blocks(model: nn.Module, family: str) -> list[_Block]:
    """Every MoE block of `model`: a router and an experts module that are siblings (PEFT wrappers aside)."""
    routers = {_unwrapped(n).rpartition(".")[0]: (n, m) for n, m in model.named_modules() if is_router(m)}
    experts = {_unwrapped(n).rpartition(".")[0]: (n, m) for n, m in model.named_modules() if is_experts(m)}
    if not routers or not experts:
        raise ValueError(f"found no MoE routers/experts in this {family} model; nothing to patch")
    if routers.keys() != experts.keys():
        unpaired = sorted(routers.keys() ^ experts.keys())
        raise ValueError(f"MoE blocks {unpaired} of this {family} model lack a router or an experts module")
    return [_Block(*routers[parent], *experts[parent], model.get_submodule(parent),
                   _unwrapped(routers[parent][0]).rpartition(".")[2], _unwrapped(experts[parent][0]).rpartition(".")[2])
            for parent in experts]


def _layer_config(model: nn.Module, family: str, router: nn.Module, experts: nn.Module, options: dict) -> MoEConfig:
    """The `MoEConfig` of one patched layer: its real widths, the family's scoring, the patch options."""
    options = {"balance": "hf", **options}
    if options.get("aux_loss_coef") is None:
        options["aux_loss_coef"] = float(getattr(model.config, "router_aux_loss_coef", 0.0) or 0.0)
    return MoEConfig(
        num_experts=router.num_experts, top_k=router.top_k, hidden_size=router.weight.shape[-1],
        intermediate_size=experts.down_proj.shape[1 if experts.is_transposed else 2],
        score_func="sigmoid" if family in _SIGMOID_FAMILIES else "softmax",
        renormalize=family in _RENORMALIZING_FAMILIES or bool(getattr(router, "norm_topk_prob", False)),
        **options,
    )


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


def _patch_layer(config: MoEConfig, router: nn.Module, experts: nn.Module, ep: ExpertParallel,
                 batch: BatchInfo) -> MoEState:
    """Swap the router's class, shard the experts, attach the layer's state."""
    router.__class__ = patched_router_class(type(router))
    bias_name = "e_score_correction_bias"  # DeepSeek-V3 routers have their own
    if not hasattr(router, bias_name):
        # Non-persistent: transformers checkpoints have no slot for it (see BalanceController.state_dict).
        # Zeros on the router's device (meta included); `_init_weights` zeroes it again after to_empty.
        bias_name = SELECTION_BIAS
        router.register_buffer(bias_name, torch.zeros(router.num_experts, device=router.weight.device),
                               persistent=False)
    if ep.ep_size > 1:
        shard_experts_(experts, ep, _EXPERT_PARAMS)
    return MoEState.attach(config, router, experts, ep, bias_name, batch)


def patch_model(model: nn.Module, **options) -> PatchReport:
    """Patch a transformers MoE model in place and return a report of what changed.

    With no options the model computes exactly what it computed before (logits, loss and
    transformers' own aux loss), only faster. Options (see `MoEConfig` for their meaning):
    `capacity_factor`, `drop_policy`, `balance` ("hf" default, "micro", "sequence", "global", "none"),
    `aux_loss_coef` (default: the model's `router_aux_loss_coef`), `z_loss_coef`.
    Any balance other than "hf" replaces transformers' pooled loss by per-layer losses, added to
    `output.loss` and reported in `output.aux_loss`. `ep_size` > 1 shards every experts module over
    that many ranks (torch.distributed must be initialised; see `moeplug.ep_layout`).
    Each layer's state is then reachable through `moeplug.state.moe_modules(model)`.

    Raises:
        ValueError: for an unsupported model family or a bad option value; TypeError for an
        unknown option; RuntimeError if the model is already patched.
    """
    family = getattr(getattr(model, "config", None), "model_type", None)
    if family not in SUPPORTED_FAMILIES:
        raise ValueError(f"model family {family!r} is not supported by moeplug; supported: {list(SUPPORTED_FAMILIES)}")
    if getattr(model, "_moeplug", None) is not None:
        raise RuntimeError("model is already patched by moeplug; call moeplug.unpatch_model(model) first")
    unknown = sorted(set(options) - set(PATCH_OPTIONS))
    if unknown:
        raise TypeError(f"unknown patch_model option(s) {unknown}; supported: {list(PATCH_OPTIONS)}")
    blocks = _find_blocks(model, family)
    _warn_if_plain_deepspeed(options.get("ep_size", 1))
    # Validate (and build process groups) before changing anything, so bad options leave the model intact.
    layouts = [expert_parallel(options.get("ep_size", 1), block.experts.num_experts) for block in blocks]
    configs = [_layer_config(model, family, block.router, block.experts, options) for block in blocks]
    batch = BatchInfo()
    states = [_patch_layer(config, block.router, block.experts, ep, batch)
              for config, ep, block in zip(configs, layouts, blocks)]
    patch = _PatchState(family, dict(options), states, batch, [(b.parent, b.router_attr, b.experts_attr) for b in blocks],
                        [(b.router, b.experts) for b in blocks])
    patch.adopt_peft_wrappers()  # LoRA wrappers PEFT put there before patching
    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            module._init_weights = functools.partial(init_weights_and_router_buffers, module)
    patch.previous_experts_implementation = model.config._experts_implementation
    model.set_experts_implementation(EXPERTS_IMPLEMENTATION)
    if configs[0].balance != "hf" and hasattr(model, "router_aux_loss_coef"):
        # transformers adds coef * (its pooled loss) when output_router_logits is on; ours replaces it.
        patch.previous_aux_coef = model.router_aux_loss_coef
        model.router_aux_loss_coef = 0.0
    patch.hooks = [
        model.register_forward_pre_hook(patch.capture_batch, with_kwargs=True),
        model.register_forward_hook(patch.add_aux_loss, with_kwargs=True),
    ]
    model._moeplug = patch
    return PatchReport(family, [b.router_name for b in blocks], [b.experts_name for b in blocks], dict(options))


def unpatch_model(model: nn.Module) -> None:
    """Undo `patch_model`: original router classes, experts implementation and loss coefficient."""
    patch = getattr(model, "_moeplug", None)
    if patch is None:
        raise RuntimeError("model is not patched by moeplug")
    if any(layer.ep.ep_size > 1 for layer in patch.layers):
        raise RuntimeError("an expert-parallel model holds only its own experts and cannot return to "
                           "transformers' implementation in place; save it and load the full checkpoint instead")
    for layer in patch.layers:
        router = layer.router
        router.__class__ = router._moeplug_base
        router._buffers.pop(SELECTION_BIAS, None)
        layer.detach()
    for hook in patch.hooks:
        hook.remove()
    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            module.__dict__.pop("_init_weights", None)
    model.set_experts_implementation(patch.previous_experts_implementation)
    if patch.previous_aux_coef is not None:
        model.router_aux_loss_coef = patch.previous_aux_coef
    del model._moeplug
