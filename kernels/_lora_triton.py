"""Triton kernels behind :func:`kernels.lora.lora_shrink` and :func:`kernels.lora.lora_expand`.

The launcher takes the batch's rows sorted by adapter from its ``LoRASegments`` (built once per step;
base-model rows with adapter -1 come first and are left out) and tiles each adapter's rows into blocks,
so every program serves rows of ONE adapter and can use ``tl.dot``: a prefill segment fills whole blocks
(MBGMM), a decode batch of mixed adapters gets one small block per adapter (MBGMV). Adapter weights are read straight from the paged pool: element k of
rank-row j lives at ``pool[table[a, j*c + k // D], k % D]``. Work stops at each adapter's own rank (rank
tiles past it exit at once; the expand loop runs to the rank), so no row pays for the largest rank.
"""

import math

import torch
import triton
import triton.language as tl

from ._aot import aot_case
from ._blocks import input_precision, launch_config, locate_block, located_blocks, upcast_in_interpreter

# Decode batches hold one or a few rows per adapter, so rows come in small blocks of 16 (tl.dot's minimum)
# and a 16-wide rank tile matches the common ranks 8-64; these are memory-bound GEMVs, so Hopper and Ampere
# share one config. The interpreter gets one big block instead.
_GPU_SHRINK = dict(BLOCK_M=16, BLOCK_R=16, BLOCK_K=256, num_warps=4, num_stages=3)
_GPU_EXPAND = dict(BLOCK_M=16, BLOCK_R=16, BLOCK_N=256, num_warps=4, num_stages=3)
SHRINK_CONFIGS = {
    "sm90": _GPU_SHRINK,
    "sm80": _GPU_SHRINK,
    "interpreter": dict(BLOCK_M=64, BLOCK_R=64, BLOCK_K=128, num_warps=4, num_stages=1),
}
EXPAND_CONFIGS = {
    "sm90": _GPU_EXPAND,
    "sm80": _GPU_EXPAND,
    "interpreter": dict(BLOCK_M=64, BLOCK_R=64, BLOCK_N=128, num_warps=4, num_stages=1),
}


@triton.jit
def _locate_adapter_block(SEGMENT_ENDS, num_segments, BLOCK_M: tl.constexpr, SEGMENTS_POW2: tl.constexpr):
    """(adapter, first row, end row) of this program's row block; adapter -1: nothing to do here.

    Rows sorted by adapter form segments: segment 0 holds the base-model rows (adapter -1), segment a + 1
    adapter a's rows.
    """
    segment, first_row, end_row = locate_block(SEGMENT_ENDS, num_segments, tl.program_id(0), BLOCK_M, SEGMENTS_POW2)
    adapter = tl.where(segment < num_segments, segment - 1, -1)
    return adapter, first_row, end_row


@triton.jit
def _shrink(
    X, POOL, TABLE, RANKS, V, ROW_ORDER, SEGMENT_ENDS, num_segments,
    K, SLOT_WIDTH, CHUNKS,
    stride_xm, stride_xk, stride_pool, stride_table, stride_vm, stride_vr,
    UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr, SEGMENTS_POW2: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    adapter, first_row, end_row = _locate_adapter_block(SEGMENT_ENDS, num_segments, BLOCK_M, SEGMENTS_POW2)
    if adapter < 0:
        return
    rank = tl.load(RANKS + adapter)
    js = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    if tl.program_id(1) * BLOCK_R >= rank:  # this rank tile is past the adapter's rank
        return
    j_mask = js < rank
    pos = first_row + tl.arange(0, BLOCK_M)
    row_mask = pos < end_row
    rows = tl.load(ROW_ORDER + pos, mask=row_mask, other=0)
    table_row = TABLE + adapter.to(tl.int64) * stride_table + js * CHUNKS
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < K
        x_mask = row_mask[:, None] & k_mask[None, :]
        x = tl.load(X + rows[:, None] * stride_xm + ks[None, :] * stride_xk, mask=x_mask, other=0.0)
        tile_mask = k_mask[:, None] & j_mask[None, :]
        slots = tl.load(table_row[None, :] + (ks // SLOT_WIDTH)[:, None], mask=tile_mask, other=0)
        a_t = tl.load(POOL + slots.to(tl.int64) * stride_pool + (ks % SLOT_WIDTH)[:, None], mask=tile_mask, other=0.0)
        if UPCAST:
            x, a_t = x.to(tl.float32), a_t.to(tl.float32)
        acc = tl.dot(x, a_t, acc, input_precision=INPUT_PRECISION)
    v_ptrs = V + rows[:, None] * stride_vm + js[None, :] * stride_vr
    tl.store(v_ptrs, acc.to(V.dtype.element_ty), mask=row_mask[:, None] & j_mask[None, :])


@triton.jit
def _expand(
    Y, V, POOL, TABLE, RANKS, SCALES, ROW_ORDER, SEGMENT_ENDS, num_segments,
    N, SLOT_WIDTH, CHUNKS,
    stride_ym, stride_yn, stride_vm, stride_vr, stride_pool, stride_table,
    UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr, SEGMENTS_POW2: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    adapter, first_row, end_row = _locate_adapter_block(SEGMENT_ENDS, num_segments, BLOCK_M, SEGMENTS_POW2)
    if adapter < 0:
        return
    rank = tl.load(RANKS + adapter)
    pos = first_row + tl.arange(0, BLOCK_M)
    row_mask = pos < end_row
    rows = tl.load(ROW_ORDER + pos, mask=row_mask, other=0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    table_row = TABLE + adapter.to(tl.int64) * stride_table + (cols // SLOT_WIDTH)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for j0 in range(0, rank, BLOCK_R):
        js = j0 + tl.arange(0, BLOCK_R)
        j_mask = js < rank
        v_mask = row_mask[:, None] & j_mask[None, :]
        v = tl.load(V + rows[:, None] * stride_vm + js[None, :] * stride_vr, mask=v_mask, other=0.0)
        tile_mask = j_mask[:, None] & col_mask[None, :]
        slots = tl.load(table_row[None, :] + (js * CHUNKS)[:, None], mask=tile_mask, other=0)
        b_t = tl.load(POOL + slots.to(tl.int64) * stride_pool + (cols % SLOT_WIDTH)[None, :], mask=tile_mask, other=0.0)
        if UPCAST:
            v, b_t = v.to(tl.float32), b_t.to(tl.float32)
        acc = tl.dot(v, b_t, acc, input_precision=INPUT_PRECISION)
    y_ptrs = Y + rows[:, None] * stride_ym + cols[None, :] * stride_yn
    out_mask = row_mask[:, None] & col_mask[None, :]
    y = tl.load(y_ptrs, mask=out_mask, other=0.0).to(tl.float32) + tl.load(SCALES + adapter).to(tl.float32) * acc
    tl.store(y_ptrs, y.to(Y.dtype.element_ty), mask=out_mask)


def _segment_launch(segments, block_m: int):
    """What both kernels launch with: ``(row_order, ends, row-axis programs, SEGMENTS_POW2)``.

    ``segments`` (a :class:`kernels.lora.LoRASegments`) builds its device tensors once per batch: a serving
    step hands the same object to the shrink and expand of every adapted linear, so the rows are sorted once
    per step, not once per launch (four torch ops per launch cost more host time than a decode step's LoRA
    kernels, measured on an H200).
    """
    ends = segments.ends
    programs = located_blocks(segments.num_rows, ends.shape[0], block_m)
    return segments.row_order, ends, programs, triton.next_power_of_2(ends.shape[0])


def shrink(x, pool, a_table, ranks, segments) -> torch.Tensor:
    """Triton ``lora_shrink``; same arguments and result as ``_lora_torch.shrink``."""
    chunks = math.ceil(x.shape[1] / pool.shape[1])
    v = x.new_zeros(x.shape[0], a_table.shape[1] // chunks)
    if a_table.shape[0] == 0 or x.shape[0] == 0:
        return v
    cfg = dict(launch_config(SHRINK_CONFIGS, x.device))
    row_order, ends, row_blocks, segments_pow2 = _segment_launch(segments, cfg["BLOCK_M"])
    grid = (row_blocks, triton.cdiv(v.shape[1], cfg["BLOCK_R"]))
    _shrink[grid](
        x, pool, a_table, ranks, v, row_order, ends, ends.shape[0],
        x.shape[1], pool.shape[1], chunks,
        x.stride(0), x.stride(1), pool.stride(0), a_table.stride(0), v.stride(0), v.stride(1),
        UPCAST=upcast_in_interpreter(x.dtype), INPUT_PRECISION=input_precision(x.dtype), SEGMENTS_POW2=segments_pow2, **cfg,
    )  # fmt: skip
    return v


def expand(y, v, pool, b_table, ranks, scales, segments) -> torch.Tensor:
    """Triton ``lora_expand`` (in place on ``y``); same arguments and result as ``_lora_torch.expand``."""
    if b_table.shape[0] == 0 or y.shape[0] == 0:
        return y
    cfg = dict(launch_config(EXPAND_CONFIGS, y.device))
    row_order, ends, row_blocks, segments_pow2 = _segment_launch(segments, cfg["BLOCK_M"])
    grid = (row_blocks, triton.cdiv(y.shape[1], cfg["BLOCK_N"]))
    _expand[grid](
        y, v, pool, b_table, ranks, scales, row_order, ends, ends.shape[0],
        y.shape[1], pool.shape[1], math.ceil(y.shape[1] / pool.shape[1]),
        y.stride(0), y.stride(1), v.stride(0), v.stride(1), pool.stride(0), b_table.stride(0),
        UPCAST=upcast_in_interpreter(y.dtype), INPUT_PRECISION=input_precision(y.dtype), SEGMENTS_POW2=segments_pow2, **cfg,
    )  # fmt: skip
    return y


# What the serving engine launches, in bf16: contiguous rows, v and pool, int64 page tables.
_BF16, _I64 = "*bf16", "*i64"
_SCHEDULE_SIGNATURE = dict(ROW_ORDER=_I64, SEGMENT_ENDS=_I64, num_segments="i32")
_FIXED = dict(UPCAST=False, INPUT_PRECISION="ieee", SEGMENTS_POW2=128)  # up to 127 adapters in the pool
AOT_CASES = [
    aot_case(
        "lora_shrink/gpu", _shrink,
        dict(X=_BF16, POOL=_BF16, TABLE=_I64, RANKS=_I64, V=_BF16, **_SCHEDULE_SIGNATURE, K="i32",
             SLOT_WIDTH="i32", CHUNKS="i32", stride_xm="i32", stride_pool="i32", stride_table="i32", stride_vm="i32"),
        dict(stride_xk=1, stride_vr=1, **_FIXED), _GPU_SHRINK,
    ),
    aot_case(
        "lora_expand/gpu", _expand,
        dict(Y=_BF16, V=_BF16, POOL=_BF16, TABLE=_I64, RANKS=_I64, SCALES="*fp32", **_SCHEDULE_SIGNATURE, N="i32",
             SLOT_WIDTH="i32", CHUNKS="i32", stride_ym="i32", stride_vm="i32", stride_pool="i32", stride_table="i32"),
        dict(stride_yn=1, stride_vr=1, **_FIXED), _GPU_EXPAND,
    ),
]  # fmt: skip
