"""PEFT LoRA on the experts of a patched model, run as grouped low-rank GEMMs.

PEFT puts LoRA on fused expert parameters (`LoraConfig(target_parameters=["mlp.experts.gate_up_proj",
"mlp.experts.down_proj"])`) through `ParamWrapper`, which, at every forward, registers a parametrization
that folds W + scaling * B A into a new weight for all E experts (and, since torch checks a new
parametrization by evaluating it, computes that fold more than once). On a model patched by
`moeplug.patch_model` the wrappers around an experts module get `grouped_activate_lora` as their
`_activate_lora` (an instance attribute: the wrapper stays PEFT's own class, which PEFT checks by name
when it adds another adapter), which hands the adapter's factors to the experts' grouped forward instead: each routed row gets
x W_e + scaling * (x A_e^T) B_e^T, two thin grouped GEMMs beside the expert's own, and no per-expert
ΔW is ever built. Outputs and gradients are PEFT's own up to float rounding; the adapter, its
parameters and the files `save_pretrained` writes are PEFT's, untouched.

`patch_model` adopts the wrappers itself (wrappers added after patching are adopted at the next
forward, by `adopt_wrappers`), so nothing here needs calling. Several adapters active at once, fp8 expert weights and
PEFT versions without `ParamWrapper.get_delta_factors` keep PEFT's own path.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager

from peft.tuners.lora.layer import ParamWrapper
from peft.utils import ModulesToSaveWrapper
from torch import nn

from ..state import STATE_ATTR, MoEState

# PEFT's own list: expert weights in these dtypes are upcast by PEFT before adding the update.
_PEFT_UPCAST_DTYPES = ("float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu")


@contextmanager
def grouped_activate_lora(wrapper: ParamWrapper, active_adapters: list[str]) -> Iterator[None]:
    """`ParamWrapper._activate_lora` for a wrapper around a moeplug experts module: the same adapter, no ΔW.

    Falls back to PEFT's own (folding) path where the grouped one does not apply.
    """
    adapters = [name for name in active_adapters if name in wrapper.lora_A]
    state: MoEState | None = wrapper.get_base_layer().__dict__.get(STATE_ATTR)
    param = wrapper.get_param()
    if (state is None or len(adapters) != 1 or wrapper.num_experts == 1
            or str(param.dtype).removeprefix("torch.") in _PEFT_UPCAST_DTYPES):
        with type(wrapper)._activate_lora(wrapper, active_adapters):
            yield
        return
    # PEFT's factors in the parameter's stored layout: delta = scaling * lhs @ rhs, per expert.
    state.expert_lora[wrapper.parameter_name] = wrapper.get_delta_factors(adapters[0])
    try:
        yield
    finally:
        state.expert_lora.pop(wrapper.parameter_name, None)


def is_grouped(module: nn.Module) -> bool:
    """Whether `module` is a PEFT wrapper whose LoRA runs through moeplug's grouped experts."""
    activate = module.__dict__.get("_activate_lora")
    return isinstance(activate, functools.partial) and activate.func is grouped_activate_lora


def adopt_wrappers(router_head: nn.Module, experts_head: nn.Module, state: MoEState) -> int:
    """Take over PEFT's wrappers around one patched MoE layer (what its block now holds as router and experts).

    LoRA wrappers around the experts get `grouped_activate_lora`; LoRA on the router weight needs nothing.
    Returns the number of wrappers switched. Raises RuntimeError for `modules_to_save` on the router:
    PEFT would train a copy of it, whose losses and statistics the patched model never sees.
    """
    if isinstance(router_head, ModulesToSaveWrapper):
        raise RuntimeError(
            "the router of this patched layer is in PEFT's modules_to_save, which trains a copy of it whose losses "
            "and statistics would be lost; train the router with LoRA on its weight instead "
            "(LoraConfig(target_parameters=[..., 'mlp.gate.weight']); 'mlp.router.weight' for gpt_oss)")
    switched, module = 0, experts_head
    while module is not state.experts and isinstance(module, ParamWrapper):
        if not is_grouped(module) and hasattr(module, "get_delta_factors"):
            # A partial of a module-level function: the wrapper still pickles and deep-copies.
            module._activate_lora = functools.partial(grouped_activate_lora, module)
            switched += 1
        module = module.base_layer
    return switched
