"""Grouped GEMM for MoE experts, ScatterMoE style: scattered read, grouped or scattered write, fused gates.

Public entry point: :func:`grouped_mm`, differentiable w.r.t. ``x``, ``weight`` and ``gates``. Its forward
and backward run torch operators (``moeplug_kernels::grouped_mm`` and ``::grouped_mm_weight_grad``, see
:mod:`kernels._ops`) with fake implementations, so ``torch.compile`` and ``torch.export`` trace through it.
Each call runs the Triton kernel or the plain-torch reference below, as :mod:`kernels.backend` decides
(CUDA tensors -> Triton, CPU tensors -> torch).

Row vocabulary: ``x`` has M *token rows*; the op works on S *grouped rows* sorted by expert, where expert
e owns grouped rows ``[expert_offsets[e-1], expert_offsets[e])``. Grouped row s reads token row
``gather_index[s]`` and writes output row ``scatter_index[s]``.
"""

import torch

from . import backend
from ._ops import define_op, needs_autograd


def grouped_mm(
    x: torch.Tensor,
    weight: torch.Tensor,
    expert_offsets: torch.Tensor,
    *,
    gather_index: torch.Tensor | None = None,
    scatter_index: torch.Tensor | None = None,
    gates: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-expert matrix products over expert-sorted rows: ``out[dst(s)] = gate[s] · x[src(s)] @ weight[e(s)]``.

    Args:
        x: ``[M, K]`` fp32/fp16/bf16 token rows.
        weight: ``[E, K, N]``, same dtype and device as ``x``, any strides. A Hugging Face expert parameter
            stored ``[E, N, K]`` is passed as ``w.transpose(1, 2)`` and is never copied.
        expert_offsets: ``[E]`` int32/int64 cumulative *end* offsets of each expert's grouped rows
            (``torch._grouped_mm``'s ``offs``); experts with zero rows repeat the previous offset.
            ``expert_offsets[-1]`` must equal S, the number of grouped rows.
        gather_index: ``[S]`` int64, grouped row s reads ``x[gather_index[s]]`` (with top-k routing: sorted
            slot // k). ``None``: ``x`` is already grouped and S = M.
        scatter_index: ``[S]`` int64 permutation of ``range(S)``: grouped row s is written to output row
            ``scatter_index[s]``. ``None``: output rows stay in grouped order.
        gates: ``[S]`` per-grouped-row scale applied to that output row, or ``None``; ``x``'s dtype or fp32
            (routers of fp16/bf16 models return fp32 weights: the scale is applied in fp32 before the output
            is rounded to ``x``'s dtype, as transformers' experts do).

    Returns:
        ``[S, N]`` tensor of ``x``'s dtype, in grouped order, or in scattered order if ``scatter_index``.
    """
    _validate(x, weight, expert_offsets, gather_index, scatter_index, gates)
    if needs_autograd(x, weight, gates):
        return _GroupedMM.apply(x, weight, expert_offsets, gather_index, scatter_index, gates)
    return _grouped_mm_op(x, weight, expert_offsets, gather_index, scatter_index, gates)


def _validate(x, weight, offsets, gather_index, scatter_index, gates) -> None:
    if x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"x must be a 2-D float tensor [M, K], got shape {tuple(x.shape)} dtype {x.dtype}")
    if weight.dim() != 3 or weight.shape[1] != x.shape[1]:
        raise ValueError(f"weight must be [E, K={x.shape[1]}, N], got shape {tuple(weight.shape)}")
    if weight.dtype != x.dtype or weight.device != x.device:
        raise ValueError(f"weight is {weight.dtype} on {weight.device}; expected x's {x.dtype} on {x.device}")
    if offsets.dim() != 1 or offsets.shape[0] != weight.shape[0] or offsets.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"expert_offsets must be int32/int64 of shape [E={weight.shape[0]}], "
            f"got shape {tuple(offsets.shape)} dtype {offsets.dtype}"
        )
    num_rows = x.shape[0] if gather_index is None else gather_index.shape[0]
    for name, t, dtypes in (
        ("gather_index", gather_index, (torch.int64,)),
        ("scatter_index", scatter_index, (torch.int64,)),
        ("gates", gates, (x.dtype, torch.float32)),
    ):
        if t is not None and (t.dim() != 1 or t.shape[0] != num_rows or t.dtype not in dtypes):
            raise ValueError(
                f"{name} must be 1-D [S={num_rows}] of dtype {' or '.join(map(str, dtypes))}, "
                f"got shape {tuple(t.shape)} dtype {t.dtype}"
            )
    # Checking offset values reads them, which would synchronise a GPU stream or break a torch.compile
    # trace (data-dependent): only do it for CPU tensors in eager mode.
    if offsets.device.type == "cpu" and not torch.compiler.is_compiling():
        ends = offsets.tolist()  # one host read; E values are checked faster in Python than by torch ops
        if ends[0] < 0 or any(b < a for a, b in zip(ends, ends[1:])):
            raise ValueError(f"expert_offsets must be non-decreasing and >= 0, got {ends}")
        if ends[-1] != num_rows:
            raise ValueError(
                f"expert_offsets[-1] = {ends[-1]} must equal the number of grouped rows S = {num_rows} "
                "(len(gather_index), or x.shape[0] when gather_index is None)"
            )


# ---------------------------------------------------------------------------------------------- reference
def _grouped_mm_ok(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``torch._grouped_mm(a, b, offs)`` accepts these operands.

    Only the CPU build is used: on GPUs its dtype/architecture support varies and the Triton kernels run
    there anyway. It needs each matrix of both operands to be row- or column-major (unit stride in one of
    its last two dims: a LoRA factor permuted expert-last is neither), and every non-unit stride of both
    operands and of its ``[..., N]`` output to be a multiple of 16 bytes (e.g. K = 33 in fp32 is not).
    """
    align = 16 // a.element_size()
    strides = (s for t in (a, b) for s, n in zip(t.stride(), t.shape) if s != 1 and n > 1)
    major = all(1 in (t.stride(-1), t.stride(-2)) or 1 in t.shape[-2:] for t in (a, b))
    return a.device.type == "cpu" and major and b.shape[-1] % align == 0 and all(s % align == 0 for s in strides)


def _expert_slices(offsets: torch.Tensor) -> list[tuple[int, int, int]]:
    ends = offsets.tolist()
    starts = [0] + ends[:-1]
    return [(e, s, t) for e, (s, t) in enumerate(zip(starts, ends)) if t > s]


def reference_forward(x, weight, offsets, gather_index=None, scatter_index=None, gates=None) -> torch.Tensor:
    """Plain-torch :func:`grouped_mm` forward (no validation, no autograd); the production CPU path.

    Uses ``torch._grouped_mm`` (one call for all experts) where it applies, else a loop over the experts
    that have rows.
    """
    x_g = x if gather_index is None else x.index_select(0, gather_index)
    if _grouped_mm_ok(x_g, weight):
        y = torch._grouped_mm(x_g, weight, offsets.to(torch.int32))
    else:
        y = x_g.new_zeros(x_g.shape[0], weight.shape[2])
        for e, start, end in _expert_slices(offsets):
            torch.mm(x_g[start:end], weight[e], out=y[start:end])
    if gates is not None:
        y.mul_(gates.unsqueeze(1))
    if scatter_index is None:
        return y
    return torch.empty_like(y).index_copy_(0, scatter_index, y)


def reference_weight_grad(x, dy, offsets, x_index=None, dy_index=None, gates=None, transposed=False):
    """``dW[e] = Σ_{s in e} gate[s] · x[x_index[s]]ᵀ dy[dy_index[s]]`` as ``[E, K, N]``.

    ``transposed=True`` builds the result as a ``[E, N, K]`` contiguous tensor viewed as ``[E, K, N]``, the
    layout of a Hugging Face ``[E, N, K]`` parameter passed transposed, so its gradient needs no copy.
    """
    x_g = x if x_index is None else x.index_select(0, x_index)
    dz = dy if dy_index is None else dy.index_select(0, dy_index)
    if gates is not None:
        dz = (dz * gates.unsqueeze(1)).to(dz.dtype)
    a, b = (dz.t(), x_g) if transposed else (x_g.t(), dz)
    if _grouped_mm_ok(a, b):
        dw = torch._grouped_mm(a, b, offsets.to(torch.int32))
    else:
        dw = a.new_zeros(offsets.shape[0], a.shape[0], b.shape[1])
        for e, start, end in _expert_slices(offsets):
            torch.mm(a[:, start:end], b[start:end], out=dw[e])
    return dw.transpose(1, 2) if transposed else dw


# -------------------------------------------------------------------------------------------------- ops
def _forward_impl(x, weight, expert_offsets, gather_index, scatter_index, gates):
    if backend.use_triton(x.device):
        # Imported on first use: Triton decides interpreted vs compiled when the kernels are defined.
        from . import _grouped_gemm_triton

        return _grouped_gemm_triton.forward(x, weight, expert_offsets, gather_index, scatter_index, gates)
    return reference_forward(x, weight, expert_offsets, gather_index, scatter_index, gates)


def _forward_fake(x, weight, expert_offsets, gather_index, scatter_index, gates):
    rows = x.shape[0] if gather_index is None else gather_index.shape[0]
    return x.new_empty(rows, weight.shape[2])


_grouped_mm_op = define_op(
    "grouped_mm(Tensor x, Tensor weight, Tensor expert_offsets, Tensor? gather_index, Tensor? scatter_index, "
    "Tensor? gates) -> Tensor", _forward_impl, _forward_fake)


def _weight_grad_impl(x, dy, expert_offsets, x_index, dy_index, gates, transposed):
    if backend.use_triton(x.device):
        from . import _grouped_gemm_triton

        return _grouped_gemm_triton.weight_grad(x, dy, expert_offsets, x_index, dy_index, gates, transposed)
    return reference_weight_grad(x, dy, expert_offsets, x_index, dy_index, gates, transposed)


def _weight_grad_fake(x, dy, expert_offsets, x_index, dy_index, gates, transposed):
    e, k, n = expert_offsets.shape[0], x.shape[1], dy.shape[1]
    return x.new_empty(e, n, k).transpose(1, 2) if transposed else x.new_empty(e, k, n)


_weight_grad_op = define_op(
    "grouped_mm_weight_grad(Tensor x, Tensor dy, Tensor expert_offsets, Tensor? x_index, Tensor? dy_index, "
    "Tensor? gates, bool transposed) -> Tensor", _weight_grad_impl, _weight_grad_fake)


class _GroupedMM(torch.autograd.Function):
    """Differentiates the op. An autograd.Function costs ~4x less host time per call than an autograd kernel
    registered with ``torch.library.register_autograd``, and torch.compile traces it all the same. Its
    forward takes ``ctx`` (no separate ``setup_context``): with one, ``apply`` binds the arguments through
    ``inspect.signature`` on every call, which cost more than a small GEMM."""

    @staticmethod
    def forward(ctx, x, weight, offsets, gather_index, scatter_index, gates):
        ctx.save_for_backward(x, weight, offsets, gather_index, scatter_index, gates)
        return _grouped_mm_op(x, weight, offsets, gather_index, scatter_index, gates)

    @staticmethod
    def backward(ctx, grad_out):
        need_x, need_w, _, _, _, need_gates = ctx.needs_input_grad
        grads = gemm_input_grads(*ctx.saved_tensors, grad_out, need_x, need_w, need_gates)
        return grads[0], grads[1], None, None, None, grads[2]


def gemm_input_grads(x, weight, offsets, gather_index, scatter_index, gates, grad_out, need_x, need_w, need_gates):
    """Gradients of :func:`grouped_mm`'s output w.r.t. ``(x, weight, gates)``, ``None`` where not needed.

    Runs on the same ops (so on the same backend, and traceable): the input gradient is the forward
    kernel with the transposed weight reading ``grad_out`` through ``scatter_index``; the gate gradient
    falls out of that product for free (``<dy, x W> = <dy Wᵀ, x>``); the weight gradient is groupXtY.
    """
    # Autograd may hand over expanded (stride-0) gradients, e.g. from .sum(); the GEMMs want real strides.
    grad_out = grad_out.contiguous()
    if scatter_index is not None and not backend.use_triton(grad_out.device):
        # The torch path would gather grad_out's rows twice (for dX and for dW): gather once.
        grad_out, scatter_index = grad_out.index_select(0, scatter_index), None
    grad_x = grad_w = grad_gates = None
    if need_x or need_gates:
        u = _grouped_mm_op(grad_out, weight.transpose(1, 2), offsets, scatter_index, None, None)
        if need_gates:  # a dot product per row: accumulate low-precision rows in fp32
            x_g = x if gather_index is None else x.index_select(0, gather_index)
            grad_gates = torch.linalg.vecdot(u.float(), x_g.float()).to(gates.dtype)
        if need_x:
            dx_g = u if gates is None else (u * gates.unsqueeze(1)).to(u.dtype)
            grad_x = dx_g if gather_index is None else torch.zeros_like(x).index_add_(0, gather_index, dx_g)
    if need_w:
        transposed = weight.stride(1) == 1 and weight.stride(2) != 1
        grad_w = _weight_grad_op(x, grad_out, offsets, gather_index, scatter_index, gates, transposed)
    return grad_x, grad_w, grad_gates

