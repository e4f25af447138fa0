"""Triton kernels behind :func:`kernels.grouped_gemm.grouped_mm` (ScatterMoE's scatter2scatter and groupXtY).

* ``_scatter2scatter``: each program owns up to BLOCK_M grouped rows of one expert and BLOCK_N output
  columns; it reads its x rows through the gather index (no gathered copy of x), multiplies by the expert's
  weight of any strides, scales by the gates and writes grouped or through the scatter index. The input
  gradient reuses it with the transposed weight, reading the output gradient through the scatter index.
  With SWIGLU it also multiplies by the weight's second half of columns and writes ``silu(gate) * up``,
  so the ``[S, 2I]`` gate/up projection of a gated MLP never goes to memory.
* ``_group_xty``: the weight gradient, one program per (expert, K tile, N tile) reducing over that
  expert's rows, again reading both operands through their indices.

Pointer offsets are computed in int64: expert weights of real models pass 2**31 elements.
"""

import torch
import triton
import triton.language as tl

from ._aot import aot_case
from ._blocks import input_precision, launch_config, locate_block, located_blocks, upcast_in_interpreter

# Hopper: 128x128 tiles, 8 warps (two warpgroups) so tl.dot lowers to wgmma; 64-wide K in 3 stages
# (~96 KiB shared). Ampere: the same tile with a 32-wide K slice in 4 stages (~64 KiB of 164 KiB).
# The interpreter costs milliseconds per program, so it gets one big block instead.
FORWARD_CONFIGS = {
    "sm90": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3),
    "sm80": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, num_warps=8, num_stages=4),
    "interpreter": dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, num_warps=4, num_stages=1),
}
# SwiGLU keeps two accumulators (gate and up) live, so the tile is half as wide to stay clear of spills.
SWIGLU_CONFIGS = {
    "sm90": dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, num_warps=8, num_stages=3),
    "sm80": dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, num_warps=8, num_stages=4),
    "interpreter": FORWARD_CONFIGS["interpreter"],
}
WEIGHT_GRAD_CONFIGS = {
    "sm90": dict(BLOCK_M=64, BLOCK_K=128, BLOCK_N=128, num_warps=8, num_stages=3),
    "sm80": dict(BLOCK_M=32, BLOCK_K=128, BLOCK_N=128, num_warps=8, num_stages=4),
    "interpreter": dict(BLOCK_M=128, BLOCK_K=128, BLOCK_N=128, num_warps=4, num_stages=1),
}


@triton.jit
def _scatter2scatter(
    X, W, Y, GATES, IN_INDEX, OUT_INDEX, EXPERT_ENDS, num_experts,
    K, N,
    stride_xm, stride_xk, stride_we, stride_wk, stride_wn, stride_ym, stride_yn,
    HAS_IN_INDEX: tl.constexpr, HAS_OUT_INDEX: tl.constexpr, HAS_GATES: tl.constexpr, SWIGLU: tl.constexpr,
    UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr, EXPERTS_POW2: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    expert, first_row, end_row = locate_block(EXPERT_ENDS, num_experts, tl.program_id(0), BLOCK_M, EXPERTS_POW2)
    if expert >= num_experts:  # unused tail of the launch
        return
    rows = first_row + tl.arange(0, BLOCK_M)
    row_mask = rows < end_row
    src = tl.load(IN_INDEX + rows, mask=row_mask, other=0) if HAS_IN_INDEX else rows.to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    x_ptrs = X + src[:, None] * stride_xm
    w_ptrs = W + expert.to(tl.int64) * stride_we + cols[None, :] * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N) if SWIGLU else (1, 1), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < K
        x = tl.load(x_ptrs + ks[None, :] * stride_xk, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w_mask = k_mask[:, None] & col_mask[None, :]
        w = tl.load(w_ptrs + ks[:, None] * stride_wk, mask=w_mask, other=0.0)
        if UPCAST:
            x, w = x.to(tl.float32), w.to(tl.float32)
        acc = tl.dot(x, w, acc, input_precision=INPUT_PRECISION)
        if SWIGLU:  # the "up" half: columns N .. 2N-1 of the same weight
            w_up = tl.load(w_ptrs + N * stride_wn + ks[:, None] * stride_wk, mask=w_mask, other=0.0)
            if UPCAST:
                w_up = w_up.to(tl.float32)
            acc_up = tl.dot(x, w_up, acc_up, input_precision=INPUT_PRECISION)
    if SWIGLU:
        acc = acc * tl.sigmoid(acc) * acc_up
    if HAS_GATES:
        acc *= tl.load(GATES + rows, mask=row_mask, other=0.0).to(tl.float32)[:, None]
    dst = tl.load(OUT_INDEX + rows, mask=row_mask, other=0) if HAS_OUT_INDEX else rows.to(tl.int64)
    y_ptrs = Y + dst[:, None] * stride_ym + cols[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def _group_xty(
    X, DY, DW, GATES, X_INDEX, DY_INDEX, EXPERT_ENDS,
    K, N,
    stride_xm, stride_xk, stride_dym, stride_dyn, stride_we, stride_wk, stride_wn,
    HAS_X_INDEX: tl.constexpr, HAS_DY_INDEX: tl.constexpr, HAS_GATES: tl.constexpr,
    UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    # The expert is the slow grid axis, so an expert's tiles are launched together and its rows of X and dY
    # (tens of MB at Mixtral-8x7B's w1 with 8K tokens) can stay in L2 while every tile re-reads them. On an
    # H200 this gained only a few percent: the dW kernel's gap to cuBLAS lies elsewhere.
    expert = tl.program_id(1)
    tiles_n = tl.cdiv(N, BLOCK_N)
    ks = (tl.program_id(0) // tiles_n) * BLOCK_K + tl.arange(0, BLOCK_K)
    cols = (tl.program_id(0) % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    k_mask, col_mask = ks < K, cols < N
    start = tl.load(EXPERT_ENDS + expert - 1, mask=expert > 0, other=0)
    end = tl.load(EXPERT_ENDS + expert)
    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    for m0 in range(start, end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_mask = rows < end
        x_rows = tl.load(X_INDEX + rows, mask=row_mask, other=0) if HAS_X_INDEX else rows.to(tl.int64)
        dy_rows = tl.load(DY_INDEX + rows, mask=row_mask, other=0) if HAS_DY_INDEX else rows.to(tl.int64)
        xt = tl.load(
            X + x_rows[None, :] * stride_xm + ks[:, None] * stride_xk,
            mask=k_mask[:, None] & row_mask[None, :], other=0.0,
        )  # fmt: skip
        dy = tl.load(
            DY + dy_rows[:, None] * stride_dym + cols[None, :] * stride_dyn,
            mask=row_mask[:, None] & col_mask[None, :], other=0.0,
        )  # fmt: skip
        if HAS_GATES:
            gate = tl.load(GATES + rows, mask=row_mask, other=0.0)
            dy = (dy.to(tl.float32) * gate.to(tl.float32)[:, None]).to(dy.dtype)
        if UPCAST:
            xt, dy = xt.to(tl.float32), dy.to(tl.float32)
        acc = tl.dot(xt, dy, acc, input_precision=INPUT_PRECISION)
    dw_ptrs = DW + expert.to(tl.int64) * stride_we + ks[:, None] * stride_wk + cols[None, :] * stride_wn
    tl.store(dw_ptrs, acc.to(DW.dtype.element_ty), mask=k_mask[:, None] & col_mask[None, :])


def forward(x, weight, offsets, gather_index=None, scatter_index=None, gates=None, swiglu=False) -> torch.Tensor:
    """Triton ``grouped_mm`` forward; same arguments and result as ``grouped_gemm.reference_forward``.

    ``swiglu=True``: ``weight`` is ``[E, K, 2I]`` (gate columns, then up columns) and the result is
    ``silu(gate) * up``, ``[S, I]``, as ``gated_mlp.reference_swiglu``.
    """
    num_rows = x.shape[0] if gather_index is None else gather_index.shape[0]
    k, n = weight.shape[1], weight.shape[2] // 2 if swiglu else weight.shape[2]
    y = x.new_empty(num_rows, n)
    cfg = dict(launch_config(SWIGLU_CONFIGS if swiglu else FORWARD_CONFIGS, x.device))
    num_experts = offsets.shape[0]
    grid = (located_blocks(num_rows, num_experts, cfg["BLOCK_M"]), triton.cdiv(n, cfg["BLOCK_N"]))
    _scatter2scatter[grid](
        x, weight, y,
        x if gates is None else gates,  # placeholders are never read: HAS_* flags are constexpr
        offsets if gather_index is None else gather_index,
        offsets if scatter_index is None else scatter_index,
        offsets, num_experts,
        k, n,
        x.stride(0), x.stride(1), *weight.stride(), y.stride(0), y.stride(1),
        HAS_IN_INDEX=gather_index is not None, HAS_OUT_INDEX=scatter_index is not None,
        HAS_GATES=gates is not None, SWIGLU=swiglu, UPCAST=upcast_in_interpreter(x.dtype),
        INPUT_PRECISION=input_precision(x.dtype), EXPERTS_POW2=triton.next_power_of_2(num_experts), **cfg,
    )  # fmt: skip
    return y


def weight_grad(x, dy, offsets, x_index=None, dy_index=None, gates=None, transposed=False) -> torch.Tensor:
    """Triton weight gradient; same arguments and result as ``grouped_gemm.reference_weight_grad``."""
    num_experts, k, n = offsets.shape[0], x.shape[1], dy.shape[1]
    dw = x.new_empty(num_experts, n, k).transpose(1, 2) if transposed else x.new_empty(num_experts, k, n)
    cfg = dict(launch_config(WEIGHT_GRAD_CONFIGS, x.device))
    grid = (triton.cdiv(k, cfg["BLOCK_K"]) * triton.cdiv(n, cfg["BLOCK_N"]), num_experts)
    _group_xty[grid](
        x, dy, dw,
        x if gates is None else gates,
        offsets if x_index is None else x_index,
        offsets if dy_index is None else dy_index,
        offsets,
        k, n,
        x.stride(0), x.stride(1), dy.stride(0), dy.stride(1), *dw.stride(),
        HAS_X_INDEX=x_index is not None, HAS_DY_INDEX=dy_index is not None, HAS_GATES=gates is not None,
        UPCAST=upcast_in_interpreter(x.dtype), INPUT_PRECISION=input_precision(x.dtype), **cfg,
    )  # fmt: skip
    return dw



# What moeplug launches, in bf16: x and gradients contiguous, the weight a transposed HF [E, N, K] parameter
# (unit stride along K in the forward, along N in the input gradient, which reads it untransposed).
_BF16, _I64 = "*bf16", "*i64"
_S2S_SIGNATURE = dict(
    X=_BF16, W=_BF16, Y=_BF16, GATES=_BF16, IN_INDEX=_I64, OUT_INDEX=_I64, EXPERT_ENDS=_I64, num_experts="i32",
    K="i32", N="i32", stride_xm="i32", stride_we="i32", stride_ym="i32",
)  # fmt: skip
_FIXED = dict(UPCAST=False, INPUT_PRECISION="ieee")
_S2S_FIXED = dict(_FIXED, EXPERTS_POW2=64)  # e.g. Qwen3-MoE's 128 or DeepSeek-V3's 256 only widen the lookup
AOT_CASES = [
    case
    for arch in ("sm90", "sm80")
    for case in (
        aot_case(
            f"grouped_mm_forward/{arch}", _scatter2scatter, {**_S2S_SIGNATURE, "stride_wn": "i32"},
            dict(stride_xk=1, stride_wk=1, stride_yn=1, HAS_IN_INDEX=True, HAS_OUT_INDEX=True, HAS_GATES=True,
                 SWIGLU=False, **_S2S_FIXED),
            FORWARD_CONFIGS[arch], expect_wgmma_sm90=arch == "sm90",
        ),
        aot_case(
            f"grouped_swiglu_forward/{arch}", _scatter2scatter, {**_S2S_SIGNATURE, "stride_wn": "i32"},
            dict(stride_xk=1, stride_wk=1, stride_yn=1, HAS_IN_INDEX=True, HAS_OUT_INDEX=False, HAS_GATES=False,
                 SWIGLU=True, **_S2S_FIXED),
            SWIGLU_CONFIGS[arch], expect_wgmma_sm90=arch == "sm90",
        ),
        aot_case(
            f"grouped_mm_grad_input/{arch}", _scatter2scatter, {**_S2S_SIGNATURE, "stride_wk": "i32"},
            dict(stride_xk=1, stride_wn=1, stride_yn=1, HAS_IN_INDEX=True, HAS_OUT_INDEX=False, HAS_GATES=False,
                 SWIGLU=False, **_S2S_FIXED),
            FORWARD_CONFIGS[arch], expect_wgmma_sm90=arch == "sm90",
        ),
        aot_case(
            f"grouped_mm_grad_weight/{arch}", _group_xty,
            dict(X=_BF16, DY=_BF16, DW=_BF16, GATES=_BF16, X_INDEX=_I64, DY_INDEX=_I64, EXPERT_ENDS=_I64,
                 K="i32", N="i32", stride_xm="i32", stride_dym="i32", stride_we="i32", stride_wn="i32"),
            dict(stride_xk=1, stride_dyn=1, stride_wk=1, HAS_X_INDEX=True, HAS_DY_INDEX=True, HAS_GATES=True,
                 **_FIXED),
            WEIGHT_GRAD_CONFIGS[arch], expect_wgmma_sm90=arch == "sm90",
        ),
    )
]  # fmt: skip
