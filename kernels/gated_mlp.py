"""Gated (SwiGLU) expert MLP on top of :func:`kernels.grouped_gemm.grouped_mm`: gate_up -> silu(gate)*up -> down.

:func:`grouped_swiglu` fuses the first projection with the activation: on GPUs one kernel computes the gate
and up tiles side by side and writes only ``silu(gate) * up``, so the ``[S, 2I]`` projection is neither
written nor saved for backward (the backward recomputes it, one extra GEMM, as activation checkpointing
would). :func:`grouped_gated_mlp` chains it with the down projection, gates and scatter of ``grouped_mm``.
Both are differentiable w.r.t. inputs and weights; ``moeplug_kernels::grouped_swiglu`` is a torch op with
a fake implementation, so ``torch.compile`` traces it.

Layout: Hugging Face stores an expert's fused projection as ``gate_up_proj [E, 2I, H]`` (gate rows first,
as ``chunk(2, dim=-1)`` splits the product); pass ``gate_up_proj.transpose(1, 2)`` (``[E, H, 2I]``) and
``down_proj.transpose(1, 2)`` (``[E, I, H]``), never copied.
"""

import torch

from . import backend
from ._ops import define_op, needs_autograd
from .grouped_gemm import _grouped_mm_op, _validate, gemm_input_grads, grouped_mm, reference_forward


def grouped_swiglu(x, gate_up_weight, expert_offsets, *, gather_index=None) -> torch.Tensor:
    """``h[s] = silu(x[src(s)] @ Wg[e(s)]) * (x[src(s)] @ Wu[e(s)])`` with ``[Wg | Wu] = gate_up_weight[e]``.

    Args:
        x: ``[M, K]`` token rows (fp32/fp16/bf16).
        gate_up_weight: ``[E, K, 2I]``, any strides; columns ``:I`` are the gate, ``I:`` the up projection.
        expert_offsets, gather_index: as in :func:`kernels.grouped_gemm.grouped_mm`.

    Returns:
        ``[S, I]`` in grouped order, ``x``'s dtype.
    """
    _validate(x, gate_up_weight, expert_offsets, gather_index, None, None)
    if gate_up_weight.shape[2] % 2:
        raise ValueError(f"gate_up_weight's last dim must be 2I (gate then up), got {gate_up_weight.shape[2]}")
    if needs_autograd(x, gate_up_weight):
        return _GroupedSwiGLU.apply(x, gate_up_weight, expert_offsets, gather_index)
    return _grouped_swiglu_op(x, gate_up_weight, expert_offsets, gather_index)


def grouped_gated_mlp(
    x, gate_up_weight, down_weight, expert_offsets, *, gather_index=None, scatter_index=None, gates=None
) -> torch.Tensor:
    """Per-expert SwiGLU MLP: ``out[dst(s)] = gate[s] · grouped_swiglu(x)[s] @ down_weight[e(s)]``.

    Args:
        x, gate_up_weight, expert_offsets, gather_index: as in :func:`grouped_swiglu`.
        down_weight: ``[E, I, N]``, any strides.
        scatter_index, gates: as in :func:`kernels.grouped_gemm.grouped_mm`.

    Returns:
        ``[S, N]``, grouped or (with ``scatter_index``) scattered order.
    """
    hidden = grouped_swiglu(x, gate_up_weight, expert_offsets, gather_index=gather_index)
    return grouped_mm(hidden, down_weight, expert_offsets, scatter_index=scatter_index, gates=gates)


def reference_swiglu(x, gate_up_weight, offsets, gather_index=None) -> torch.Tensor:
    """Plain-torch :func:`grouped_swiglu` (no validation, no autograd): the grouped GEMM, then the activation."""
    gate, up = reference_forward(x, gate_up_weight, offsets, gather_index).chunk(2, dim=1)
    return torch.nn.functional.silu(gate).mul_(up)


def _swiglu_impl(x, weight, expert_offsets, gather_index):
    if backend.use_triton(x.device):
        from . import _grouped_gemm_triton

        return _grouped_gemm_triton.forward(x, weight, expert_offsets, gather_index, swiglu=True)
    return reference_swiglu(x, weight, expert_offsets, gather_index)


def _swiglu_fake(x, weight, expert_offsets, gather_index):
    rows = x.shape[0] if gather_index is None else gather_index.shape[0]
    return x.new_empty(rows, weight.shape[2] // 2)


_grouped_swiglu_op = define_op(
    "grouped_swiglu(Tensor x, Tensor weight, Tensor expert_offsets, Tensor? gather_index) -> Tensor",
    _swiglu_impl, _swiglu_fake)


class _GroupedSwiGLU(torch.autograd.Function):
    """Differentiates the fused op (see ``kernels.grouped_gemm._GroupedMM`` for why an autograd.Function)."""

    @staticmethod
    def forward(ctx, x, weight, offsets, gather_index):
        ctx.save_for_backward(x, weight, offsets, gather_index)
        return _grouped_swiglu_op(x, weight, offsets, gather_index)

    @staticmethod
    def backward(ctx, grad_h):
        x, weight, offsets, gather_index = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[:2]
        # Recompute the projection instead of having saved it: saving [S, 2I] is what the fusion avoids.
        gate, up = _grouped_mm_op(x, weight, offsets, gather_index, None, None).chunk(2, dim=1)
        sig = torch.sigmoid(gate)
        d_gate = grad_h * up * sig * (1 + gate * (1 - sig))  # silu'(g) = σ(g)·(1 + g·(1 − σ(g)))
        d_up = grad_h * gate * sig
        grad_x, grad_w, _ = gemm_input_grads(
            x, weight, offsets, gather_index, None, None, torch.cat([d_gate, d_up], dim=1), need_x, need_w, False
        )
        return grad_x, grad_w, None, None

