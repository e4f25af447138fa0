"""The FP8 AdamW step: one decoupled-weight-decay Adam update with both moments stored in FP8.

The Adam arithmetic is written once, in fp32 (:func:`adamw_math`), and every state format reuses it (as in
torchao's optim): fp32 moments are updated by it directly; FP8 moments (E4M3 codes with COAT's per-group
range expansion, see :mod:`kernels.fp8`) are dequantised to fp32, updated by it, and requantised
(:func:`fp8_adamw_step_torch`, the reference). The parameter is updated with the fp32 moments before
requantisation, as in COAT, so the quantisation error enters through the next step's moments only.

:func:`fp8_adamw_step` is the op: per parameter it picks

* fp32 moments: :func:`adamw_math`;
* FP8 moments of a contiguous CPU parameter: the fused C++ step (:mod:`kernels._fp8_cpu`, one pass per
  group of 128, built on first use), unless ``fused=False`` or the extension cannot be built;
* otherwise the reference, whose (de)quantisation runs through :mod:`kernels.fp8` (Triton kernels for
  CUDA tensors, torch on CPU).

The fused step replaces the reference's per-value ``log2`` / ``exp2`` with tables and polynomials of
stated error, so a code may differ by one E4M3 step (bound derived in ``_fp8_cpu.cpp``, tested in
tests/fp8/test_fp8_fused.py).

A state is a dict with ``exp_avg`` / ``exp_avg_sq`` (fp32, or E4M3 codes shaped like the parameter, then
with ``<moment>_amax`` fp32 and ``<moment>_k16`` uint8 per group); the step replaces FP8 entries with new
tensors (reference) or writes them in place (fused).
"""

import math

import torch

from . import _fp8_cpu
from .fp8 import dequantize_fp8_expanded, quantize_fp8_expanded

__all__ = ["MOMENTS", "adamw_math", "fp8_adamw_step", "fp8_adamw_step_torch", "use_fused_step"]

MOMENTS = ("exp_avg", "exp_avg_sq")


def adamw_math(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step: int,
) -> None:
    """One decoupled-weight-decay Adam update in fp32, in place on ``param``, ``exp_avg``, ``exp_avg_sq``.

    The same arithmetic, in the same order, as ``torch.optim.AdamW`` (bit for bit, tested): decay, moment
    updates, bias correction, ``eps`` added after the square root. ``step`` counts this update (1-based).
    """
    bias_correction1 = 1 - beta1**step
    bias_correction2_sqrt = math.sqrt(1 - beta2**step)
    param.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)


def _fp8_moments_step(param: torch.Tensor, grad: torch.Tensor, state: dict, hyper: dict, step: int,
                      group_size: int) -> None:
    """Dequantise both moments, apply :func:`adamw_math` in fp32, and store them requantised in ``state``."""
    moments = [
        dequantize_fp8_expanded(state[k], state[f"{k}_amax"], state[f"{k}_k16"], group_size) for k in MOMENTS
    ]
    adamw_math(param, grad, *moments, step=step, **hyper)
    for key, moment in zip(MOMENTS, moments):
        state[key], state[f"{key}_amax"], state[f"{key}_k16"] = quantize_fp8_expanded(moment, group_size)


def fp8_adamw_step_torch(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    states: list[dict],
    steps: list[int],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    group_size: int,
) -> None:
    """Reference FP8 AdamW step (any device): dequantise, :func:`adamw_math`, quantise, per parameter.

    Same signature as :func:`kernels._fp8_cpu.fp8_adamw_step`: FP8 ``states``, ``steps`` the 1-based
    step number of each parameter.
    """
    hyper = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay)
    for param, grad, state, step in zip(params, grads, states, steps):
        _fp8_moments_step(param, grad, state, hyper, step, group_size)


def use_fused_step(param: torch.Tensor, fused: bool | None) -> bool:
    """Whether an FP8-state ``param`` takes the fused C++ step.

    ``fused``: ``None`` uses it for CPU parameters when the extension builds (else the reference, after
    one warning); ``True`` requires it (``RuntimeError`` for CUDA parameters or a failed build);
    ``False`` never uses it.
    """
    if fused is False or param.device.type != "cpu":
        if fused and param.device.type != "cpu":
            raise RuntimeError(f"FP8AdamW(fused=True) runs on CPU tensors only, got one on {param.device}; "
                               "use fused=None (the default) to run CUDA tensors through the Triton kernels")
        return False
    if _fp8_cpu.load_extension() is None:
        if fused:
            raise RuntimeError("FP8AdamW(fused=True): the C++ extension could not be built (see the warning "
                               "above); pass fused=None or fused=False to use the torch path")
        return False
    return True


def fp8_adamw_step(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    states: list[dict],
    steps: list[int],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    group_size: int,
    fused: bool | None = None,
) -> None:
    """One AdamW step, in place, on fp32 ``params`` with fp32 or FP8 ``states`` (see the module docstring).

    ``steps`` holds each parameter's 1-based step number; ``fused`` is as in :func:`use_fused_step`.
    """
    hyper = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay)
    fused_args: tuple[list, list, list, list] = ([], [], [], [])
    for param, grad, state, step in zip(params, grads, states, steps):
        if state["exp_avg"].dtype == torch.float32:
            adamw_math(param, grad, state["exp_avg"], state["exp_avg_sq"], step=step, **hyper)
        elif use_fused_step(param, fused) and param.is_contiguous():
            for key in MOMENTS:  # a loaded state may be a non-contiguous view
                state[key] = state[key].contiguous()
            for out, item in zip(fused_args, (param, grad.contiguous(), state, step)):
                out.append(item)
        else:
            _fp8_moments_step(param, grad, state, hyper, step, group_size)
    if fused_args[0]:
        _fp8_cpu.fp8_adamw_step(*fused_args, **hyper, group_size=group_size)
