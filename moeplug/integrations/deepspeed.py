"""Expert parallelism under DeepSpeed ZeRO-1/2: moeplug's expert shards become DeepSpeed expert parameters.

    deepspeed.init_distributed(dist_backend="gloo")            # or nccl; any launcher
    report = moeplug.integrations.deepspeed.patch_model(model, ep_size=2, balance="global")
    optimizer = torch.optim.AdamW(moeplug.integrations.deepspeed.param_groups(model), lr=1e-3)
    engine, optimizer, _, _ = moeplug.integrations.deepspeed.initialize(model=model, optimizer=optimizer,
                                                                         config=ds_config)

Why this seam (DeepSpeed 0.19): the engine decides that a model has MoE layers with
`isinstance(module, deepspeed.moe.layer.MoE)` (or its AutoEP layer) in `_configure_distributed_model`.
Everything after that is keyed on parameters and param groups, not on the module's structure:
the initial broadcast, ZeRO-1/2's gradient reduction and partitioning, and the expert gradient
all-reduce without ZeRO treat a parameter with `allreduce = False` and `group_name = "ep_size_N"`
as an expert parameter of DeepSpeed's expert-data-parallel group "ep_size_N", and ZeRO needs
those parameters in optimizer param groups flagged `moe = True`. So this module

1. creates DeepSpeed's own groups for "ep_size_N" (the call `MoE.set_deepspeed_parallelism`
   makes) and hands them to `moeplug.dispatch.use_process_groups`: one set of groups, used by
   both moeplug's all-to-alls and DeepSpeed's gradient reduction;
2. marks every expert-shard parameter exactly as `deepspeed.moe.experts.Experts` marks its own;
3. attaches a `DeepSpeedExpertsMarker` (a `MoE` subclass that owns no parameters and never runs)
   to each sharded experts module, which is what makes the engine's `has_moe_layers` true;
4. splits optimizer param groups with DeepSpeed's own `configure_moe_param_groups`.

ZeRO-Offload with FP8 optimizer states: pass `moeplug.fp8.FP8AdamW` as the optimizer and
`"offload_optimizer": {"device": "cpu"}` in `zero_optimization`; `initialize` (or `offload_config` on its
own, for a plain `deepspeed.initialize`) sets the two keys DeepSpeed needs for a client optimizer there:
`zero_force_ds_cpu_optimizer: false` (DeepSpeed otherwise insists on its DeepSpeedCPUAdam) and
`zero_allow_untested_optimizer: true`. DeepSpeed then keeps the fp32 master partition on the host and
calls FP8AdamW's fused CPU step on it, with 2.08 bytes of moments per parameter instead of
DeepSpeedCPUAdam's 8. Works at ZeRO-1/2/3 (with expert parallelism at 1/2, as above).

Rejected alternatives: wrapping the experts in a real `MoE` would run DeepSpeed's gate and
dispatch instead of moeplug's (and need per-expert `nn.Linear` copies of the fused weights);
AutoEP replaces the transformers MoE blocks with DeepSpeed's own, dropping moeplug's routing
options; setting the engine's private `has_moe_layers` after the fact misses the broadcast and
optimizer set-up that happen inside `deepspeed.initialize`.

ZeRO-3 is refused (`initialize` raises ValueError): ZeRO-3 partitions each parameter over the
data-parallel group and all-gathers it before use; DeepSpeed 0.19 partitions expert parameters
over the expert-data-parallel group only for its AutoEP layers and rejects native MoE layers
("Native DeepSpeed MoE is not supported with ZeRO Stage 3"), so rank-specific expert shards would
be mixed across EP ranks. Without expert parallelism (ep_size 1) every ZeRO stage works as usual.

DeepSpeed's `engine.save_checkpoint` / `load_checkpoint` handle expert weights only in its own `MoE`
layout (one file per expert of `deepspeed_moe.experts.deepspeed_experts.N`); with expert parallelism
the marker makes `save_checkpoint` raise instead of silently keeping one rank's experts. Save models
with `moeplug.checkpoint.save_checkpoint` / `export_pretrained`; optimizer state is not saved then.
"""

from __future__ import annotations

import json
from pathlib import Path

import deepspeed
import torch
from deepspeed.moe.layer import MoE
from deepspeed.moe.utils import configure_moe_param_groups, is_moe_param
from deepspeed.utils import groups
from torch import nn

import moeplug
from moeplug.dispatch import expert_parallel_parameters
from moeplug.ep_layout import ExpertParallel, use_process_groups
from moeplug.fp8 import FP8AdamW
from moeplug.state import moe_modules

MARKER_NAME = "deepspeed_moe_marker"


def group_name(ep_size: int) -> str:
    """DeepSpeed's name for the expert groups of `ep_size` (e.g. "ep_size_2")."""
    return f"ep_size_{ep_size}"


def use_deepspeed_groups(ep_size: int) -> tuple:
    """Create (once) DeepSpeed's expert-parallel and expert-data-parallel groups and give them to moeplug.

    Collective: call on every rank after `deepspeed.init_distributed`. Returns (ep_group,
    expert_dp_group). Raises ValueError when `ep_size` does not divide the world size, or when
    groups of that name already exist with another layout (e.g. created with
    `use_data_before_expert_parallel_`), naming the ranks found and expected.
    """
    if not torch.distributed.is_initialized():
        raise ValueError(f"ep_size={ep_size} needs torch.distributed initialised (deepspeed.init_distributed)")
    world = torch.distributed.get_world_size()
    if not isinstance(ep_size, int) or ep_size < 1 or world % ep_size:
        raise ValueError(f"ep_size={ep_size!r} must be a positive integer dividing the world size ({world})")
    name = group_name(ep_size)
    if name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep_size)
    ep_group = groups._get_expert_parallel_group(name)
    expert_dp_group = groups._get_expert_data_parallel_group(name)
    use_process_groups(ep_size, ep_group, expert_dp_group)  # raises if DeepSpeed's layout is not EP-major
    return ep_group, expert_dp_group


class DeepSpeedExpertsMarker(MoE):
    """Tells the DeepSpeed engine that the module it sits in holds expert-parallel parameters.

    A `deepspeed.moe.layer.MoE` only by type: it skips `MoE.__init__` (which would build
    DeepSpeed's own gate and experts), owns no parameters and is never called. The engine reads
    `num_experts` and `expert_group_name`, and calls `set_deepspeed_parallelism`.
    """

    def __init__(self, num_experts: int, ep_size: int):
        nn.Module.__init__(self)
        self.num_experts = num_experts
        self.ep_size = ep_size
        self.num_local_experts = num_experts // ep_size
        self.expert_group_name = group_name(ep_size)
        self.use_residual = False
        self.enable_expert_tensor_parallelism = False

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        """Called by the engine: check that the groups moeplug dispatches over are DeepSpeed's."""
        if use_data_before_expert_parallel_:
            raise ValueError("use_data_before_expert_parallel_=True puts expert-parallel ranks far apart; "
                             "moeplug's expert parallelism needs DeepSpeed's default (EP-major) layout")
        use_deepspeed_groups(self.ep_size)

    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        """Empty inside a model's state dict; called on its own, it is DeepSpeed's engine checkpoint
        asking for expert weights in its own layout, which would save rank 0's experts only: refuse."""
        if destination is None and not prefix and not args:
            raise RuntimeError("DeepSpeed's engine.save_checkpoint does not know moeplug's expert-parallel layout "
                               "(it would keep one rank's experts); save with moeplug.checkpoint.save_checkpoint "
                               "(sharded, reloadable at another ep_size) or export_pretrained")
        return super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)

    def forward(self, *args, **kwargs):
        """Never called: the experts module it marks runs moeplug's expert-parallel forward."""
        raise RuntimeError("DeepSpeedExpertsMarker only marks expert-parallel parameters for DeepSpeed; "
                           "it has no forward")

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, group={self.expert_group_name}"


def _layouts(model: nn.Module) -> dict[str, ExpertParallel]:
    """Sharded experts modules of a patched model or of `MoELayer`s, by name."""
    return {layer.experts_name: layer.state.ep for layer in moe_modules(model) if layer.state.ep.ep_size > 1}


def mark_expert_parameters(model: nn.Module) -> int:
    """Mark a patched expert-parallel model's expert shards the way DeepSpeed marks its own experts.

    Sets `allreduce = False` and `group_name = "ep_size_N"` on each shard parameter and attaches a
    `DeepSpeedExpertsMarker` to each sharded experts module. Returns the number of parameters
    marked. Raises ValueError for a layout DeepSpeed cannot reduce (expert replicas from
    `moeplug.placement`, whose copies need `sum_replica_gradients`).
    """
    for name, ep in _layouts(model).items():
        if ep.slots is not None and ep.slots.numel() != ep.num_experts:
            raise ValueError(f"{name} holds replicated experts (placement slots {ep.slots.tolist()}); DeepSpeed "
                             "cannot sum their copies' gradients: apply a placement without replicas")
        model.get_submodule(name).add_module(MARKER_NAME, DeepSpeedExpertsMarker(ep.num_experts, ep.ep_size))
    params = expert_parallel_parameters(model)
    for param, ep in params.values():
        param.allreduce = False
        param.group_name = group_name(ep.ep_size)
    return len(params)


def patch_model(model: nn.Module, **options) -> moeplug.PatchReport:
    """`moeplug.patch_model` for training under DeepSpeed (same options and report).

    With `ep_size` > 1 the experts are sharded over DeepSpeed's own expert-parallel groups
    (`use_deepspeed_groups`) and marked as DeepSpeed expert parameters (`mark_expert_parameters`).
    Call after `deepspeed.init_distributed` and before building the optimizer (`param_groups`).
    """
    ep_size = options.get("ep_size", 1)
    if ep_size != 1:
        use_deepspeed_groups(ep_size)
    report = moeplug.patch_model(model, **options)
    mark_expert_parameters(model)
    return report


def param_groups(model_or_params, **defaults) -> list[dict]:
    """Optimizer param groups with expert parameters in their own groups (one per "ep_size_N").

    Accepts a model, a list of parameters or a list of param-group dicts; `defaults` (e.g.
    `weight_decay`) are added to each group. Uses DeepSpeed's `configure_moe_param_groups`, so
    ZeRO partitions and reduces each expert group over its expert-data-parallel group.
    """
    params = list(model_or_params.parameters()) if isinstance(model_or_params, nn.Module) else list(model_or_params)
    if not params:
        raise ValueError("param_groups got no parameters")
    if isinstance(params[0], dict):
        params = [{**defaults, **group} for group in params]
    elif defaults:
        params = [{"params": params, **defaults}]
    if isinstance(params[0], dict) and "name" not in params[0]:
        params = [{"name": f"group-{i}", **group} for i, group in enumerate(params)]
    return configure_moe_param_groups(params)


def _zero_stage(config) -> int:
    return int(_load_config(config).get("zero_optimization", {}).get("stage", 0))


def _load_config(config) -> dict:
    if isinstance(config, (str, Path)):  # deepspeed.initialize also takes a JSON file path
        return json.loads(Path(config).read_text())
    return dict(config or {})


def offload_config(config, optimizer: torch.optim.Optimizer) -> dict:
    """`config` (a dict or JSON path) ready for `optimizer` under ZeRO-Offload: a copy with
    `zero_force_ds_cpu_optimizer: false` and `zero_allow_untested_optimizer: true` when `optimizer` is an
    FP8AdamW and `zero_optimization.offload_optimizer.device` is "cpu"; otherwise the config unchanged.

    Raises ValueError when the config sets `zero_force_ds_cpu_optimizer: true` explicitly for an FP8AdamW
    with CPU offload (DeepSpeed would refuse it), naming the key.
    """
    config = _load_config(config)
    offload = (config.get("zero_optimization") or {}).get("offload_optimizer") or {}
    if not isinstance(optimizer, FP8AdamW) or offload.get("device") != "cpu":
        return config
    if config.get("zero_force_ds_cpu_optimizer") is True:
        raise ValueError("zero_force_ds_cpu_optimizer=true makes DeepSpeed refuse FP8AdamW under ZeRO-Offload; "
                         "remove the key (moeplug sets it to false) or use DeepSpeedCPUAdam")
    return {**config, "zero_force_ds_cpu_optimizer": False, "zero_allow_untested_optimizer": True}


def initialize(*, model: nn.Module, optimizer: torch.optim.Optimizer, config, **kwargs):
    """`deepspeed.initialize` for a model patched with `patch_model`, after checking the set-up.

    Raises ValueError, before DeepSpeed starts, for ZeRO stage 3 with expert parallelism (see the
    module docstring for why) and for an optimizer whose param groups mix expert and replicated
    parameters (build it from `param_groups(model)`). An FP8AdamW under ZeRO-Offload gets the config
    keys of `offload_config`. Returns what `deepspeed.initialize` returns.
    """
    config = offload_config(config, optimizer)
    layouts = _layouts(model)
    if layouts:
        stage = _zero_stage(config)
        if stage == 3:
            raise ValueError(f"ZeRO stage 3 with expert parallelism (ep_size={next(iter(layouts.values())).ep_size}) "
                             "is not supported: DeepSpeed 0.19 partitions ZeRO-3 parameters over the expert-data-"
                             "parallel group only for its AutoEP layers and rejects other MoE layers, so expert shards "
                             "would be mixed across ranks. Use ZeRO stage 1 or 2, or ep_size=1 with ZeRO-3")
        for i, group in enumerate(optimizer.param_groups):
            kinds = {is_moe_param(p) for p in group["params"]}
            if len(kinds) > 1 or (kinds == {True} and not group.get("moe")):
                raise ValueError(f"optimizer param group {i} mixes expert-parallel and replicated parameters (or "
                                 "lacks moe=True); build the optimizer from "
                                 "moeplug.integrations.deepspeed.param_groups(model)")
    return deepspeed.initialize(model=model, optimizer=optimizer, config=config, **kwargs)
