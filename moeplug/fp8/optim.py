"""AdamW with both moments stored in FP8 (E4M3) using COAT's per-group dynamic range expansion.

Per parameter of at least ``min_quantized_numel`` elements the state is

========================  ======================  ===============================================
key                       dtype, shape            meaning
========================  ======================  ===============================================
``step``                  fp32, ``[]``            number of updates taken (as in torch's AdamW)
``exp_avg``               E4M3, like the param    first-moment codes
``exp_avg_amax``          fp32, ``[n_groups]``    per-group absmax of the first moment
``exp_avg_k16``           uint8, ``[n_groups]``   per-group expansion exponent times 16
``exp_avg_sq``            E4M3, like the param    second-moment codes
``exp_avg_sq_amax``       fp32, ``[n_groups]``
``exp_avg_sq_k16``        uint8, ``[n_groups]``
========================  ======================  ===============================================

with ``n_groups = ceil(numel / group_size)`` (see :mod:`kernels.fp8` for the format and why COAT's
centre needs no storage): 2 + 10/128 ≈ 2.08 bytes per parameter. Smaller parameters keep torch's fp32
``exp_avg``/``exp_avg_sq``, as bitsandbytes and torchao do: their groups would be mostly metadata and
they are a negligible share of a model's memory.

Each step dequantises the moments to fp32, runs the one fp32 AdamW update (:func:`adamw_math`, shared
with the fp32-state parameters), and requantises. The parameter is updated with the fp32 moments before
requantisation, as in COAT, so the quantisation error enters through the next step's moments only. The
step is the :func:`kernels.fp8_adamw.fp8_adamw_step` op (where :func:`adamw_math` lives too); this module
owns the optimizer around it: hyperparameters, the state layout, checks and the state_dict.
"""

from collections.abc import Callable, Iterable

import torch

from kernels.fp8_adamw import MOMENTS as _MOMENTS
from kernels.fp8_adamw import adamw_math, fp8_adamw_step

__all__ = ["FP8AdamW", "adamw_math"]  # adamw_math: re-exported from kernels.fp8_adamw, where it lives


class FP8AdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay) whose moments live in FP8 E4M3 with COAT's range expansion.

    Args:
        params: parameters or param-group dicts, as for any ``torch.optim.Optimizer``. Parameters must be
            dense fp32 (they are the master weights) and real.
        lr, betas, eps, weight_decay: as in ``torch.optim.AdamW`` (same defaults).
        amsgrad: only ``False`` is supported; accepted so configs written for AdamW fail loudly.
        group_size: values per quantisation group (COAT: 128).
        min_quantized_numel: parameters with fewer elements keep fp32 moments.
        fused: how quantised CPU parameters are stepped. ``None`` (default): one fused C++ pass per group
            (:mod:`kernels._fp8_cpu`, compiled on first use), falling back to the torch path with one
            warning when it cannot be built; ``True``: the fused pass or an error; ``False``: the torch
            path (dequantise, :func:`adamw_math`, quantise); see :func:`kernels.fp8_adamw.fp8_adamw_step`.
            The two agree to one E4M3 step per code (the fused step's log2/exp2 are polynomials with stated
            error bounds, see ``kernels/_fp8_cpu.cpp``). CUDA parameters always take the torch path
            with its Triton (de)quantisation kernels.

    Quantisation runs through :mod:`kernels.fp8` (Triton kernels for CUDA tensors, torch on CPU).
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        amsgrad: bool = False,
        group_size: int = 128,
        min_quantized_numel: int = 4096,
        fused: bool | None = None,
    ) -> None:
        if amsgrad:
            raise ValueError("FP8AdamW does not implement amsgrad=True; use torch.optim.AdamW for AMSGrad")
        if not lr >= 0.0:
            raise ValueError(f"lr={lr!r} must be >= 0")
        if not all(0.0 <= b < 1.0 for b in betas) or len(betas) != 2:
            raise ValueError(f"betas={betas!r} must be two numbers in [0, 1)")
        if not eps >= 0.0:
            raise ValueError(f"eps={eps!r} must be >= 0")
        if not weight_decay >= 0.0:
            raise ValueError(f"weight_decay={weight_decay!r} must be >= 0")
        if not (group_size >= 2 and group_size & (group_size - 1) == 0):
            raise ValueError(f"group_size={group_size!r} must be a power of two >= 2")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        self.group_size = group_size
        self.min_quantized_numel = min_quantized_numel
        if fused not in (None, True, False):
            raise ValueError(f"fused={fused!r} must be None (automatic), True or False")
        self.fused = fused

    def _init_state(self, param: torch.Tensor) -> dict:
        state = self.state[param]
        state["step"] = torch.tensor(0.0)
        if param.numel() < self.min_quantized_numel:
            state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            return state
        n_groups = -(-param.numel() // self.group_size)
        for key in _MOMENTS:
            state[key] = torch.zeros(param.shape, dtype=torch.float8_e4m3fn, device=param.device)
            state[f"{key}_amax"] = torch.zeros(n_groups, dtype=torch.float32, device=param.device)
            # k16 = 16 (k = 1) for the all-zero start; any value dequantises zeros to zero.
            state[f"{key}_k16"] = torch.full((n_groups,), 16, dtype=torch.uint8, device=param.device)
        return state

    @staticmethod
    def _check_param(param: torch.Tensor, index: int) -> None:
        if param.grad.is_sparse:
            raise RuntimeError(f"FP8AdamW does not support sparse gradients (param {index} of its group, "
                               f"shape {tuple(param.shape)}); use torch.optim.SparseAdam")
        if param.is_complex():
            raise RuntimeError(f"FP8AdamW does not support complex parameters (param {index}, dtype "
                               f"{param.dtype}); view them as real with torch.view_as_real")
        if param.dtype != torch.float32:
            raise RuntimeError(f"FP8AdamW keeps fp32 master weights, but param {index} is {param.dtype}; "
                               "keep parameters in fp32 and train with autocast")

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Perform one optimisation step; ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            hyper = dict(lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                         weight_decay=group["weight_decay"])
            params = [param for param in group["params"] if param.grad is not None]
            for index, param in enumerate(group["params"]):  # every check before any state changes
                if param.grad is not None:
                    self._check_param(param, index)
            states = [self.state[param] or self._init_state(param) for param in params]
            for state in states:
                state["step"] += 1
            steps = [int(state["step"].item()) for state in states]
            grads = [param.grad for param in params]
            fp8_adamw_step(params, grads, states, steps, **hyper, group_size=self.group_size, fused=self.fused)
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state saved by :meth:`state_dict`, keeping codes in E4M3 and exponents in uint8.

        ``torch.optim.Optimizer.load_state_dict`` casts every non-``step`` state tensor to its
        parameter's dtype (fp32 here). Both casts are exact, so restoring the saved dtypes afterwards
        gives back the saved bits.
        """
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        super().load_state_dict(state_dict)
        for saved_id, param in zip(saved_ids, params):
            for key, saved in state_dict["state"].get(saved_id, {}).items():
                loaded = self.state[param][key]
                if torch.is_tensor(saved) and loaded.dtype != saved.dtype:
                    self.state[param][key] = loaded.to(saved.dtype)
