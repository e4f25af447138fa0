"""Triton kernels and launchers for :mod:`kernels.fp8` (same signatures and results as its torch references).

Imported by :mod:`kernels.fp8` on the first Triton call (it imports nothing from there: the formats'
constants and checks live in :mod:`kernels._fp8_format`), because ``@triton.jit`` decides interpreted vs
compiled from ``TRITON_INTERPRET`` when it runs. ``AOT_CASES`` declares every kernel's GPU configs for
``kernels._aot``.
"""

import math

import torch
import triton
import triton.language as tl

from .backend import interpreter_enabled
from ._fp8_format import (
    E4M3_MAX as _E4M3_MAX,
    EXPANSION_LOG2_RANGE as _EXPANSION_LOG2_RANGE,
    FP8_MAX,
    TINY as _TINY,
    check_expanded as _check_expanded,
    check_fp8 as _check_fp8,
    check_group_size as _check_group_size,
    check_group_stats as _check_group_stats,
    check_input as _check_input,
)

__all__ = [
    "AOT_CASES",
    "quantize_fp8_triton",
    "dequantize_fp8_triton",
    "quantize_fp8_expanded_triton",
    "dequantize_fp8_expanded_triton",
]


# ---------------------------------------------------------------------------------------------------
# Triton kernels: one program handles ROWS groups as a [ROWS, GROUP] tile. Codes travel as uint8 bit
# patterns encoded and decoded here with integer ops, because (a) Ampere (sm_80) has no E4M3 type in
# Triton and (b) the interpreter's fp32->fp8 cast drops the rounding carry (measured: 31.5 -> 16 in
# E4M3). The encoder rounds to nearest-even like torch's cast, so codes match the torch reference bit
# for bit wherever the fp32 inputs to the cast match (the reference divides by tensors only, see fp8.py). Divisions use tl.math.div_rn: Triton compiles fp32
# `/` to an approximate PTX division (div.full / div.approx, ~2 ulp), torch's is IEEE (round to nearest).
# ---------------------------------------------------------------------------------------------------


@triton.jit
def _tile(pid, numel, GROUP: tl.constexpr, ROWS: tl.constexpr):
    rows = pid.to(tl.int64) * ROWS + tl.arange(0, ROWS)
    offsets = rows[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
    return rows, offsets, offsets < numel, rows < tl.cdiv(numel, GROUP)


@triton.jit
def _sign_bit(x):
    """True where the sign bit is set (so -0.0 counts as negative, as in torch's fp8 cast)."""
    return x.to(tl.int32, bitcast=True) < 0


@triton.jit
def _encode_fp8(mag, negative, MANT: tl.constexpr, BIAS: tl.constexpr):
    """fp32 magnitudes within the format's finite range, and sign flags -> uint8 codes (nearest-even)."""
    bits = mag.to(tl.int32, bitcast=True)
    # Normal numbers: round the 23-bit mantissa to MANT bits; a carry out of the mantissa bumps the exponent.
    lsb = (bits >> (23 - MANT)) & 1
    rounded = (bits + ((1 << (22 - MANT)) - 1) + lsb) >> (23 - MANT)
    normal = rounded - ((127 - BIAS) << MANT)
    # Subnormals are integer multiples of 2^(1 - BIAS - MANT); adding 1.5·2^23 rounds to an integer (RNE).
    # (Clamped first so magnitudes the normal path handles do not overflow the int32 conversion.)
    tiny = tl.minimum(mag, 2.0 ** (1 - BIAS))
    subnormal = ((tiny * (2.0 ** (BIAS - 1 + MANT)) + 12582912.0) - 12582912.0).to(tl.int32)
    code = tl.where(mag < 2.0 ** (1 - BIAS), subnormal, normal)
    return (code | tl.where(negative, 0x80, 0)).to(tl.uint8)


@triton.jit
def _decode_fp8(code, MANT: tl.constexpr, BIAS: tl.constexpr):
    """uint8 codes -> fp32 magnitudes (exact) and sign flags."""
    c = code.to(tl.int32)
    exponent = (c & 0x7F) >> MANT
    mantissa = c & ((1 << MANT) - 1)
    normal = (((exponent + 127 - BIAS) << 23) | (mantissa << (23 - MANT))).to(tl.float32, bitcast=True)
    return tl.where(exponent == 0, mantissa.to(tl.float32) * (2.0 ** (1 - BIAS - MANT)), normal), c >= 0x80


@triton.jit
def _apply_sign(magnitude, negative):
    """``-magnitude`` where ``negative`` (magnitude >= 0), as a bit operation: a select of ``-x`` and ``x``
    lost the sign of zero on an H200 (the compiler may treat zeros as unsigned), while torch keeps -0.0."""
    bits = magnitude.to(tl.uint32, bitcast=True) | (negative.to(tl.uint32) << 31)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _quantize_kernel(x_ptr, codes_ptr, scales_ptr, numel, FP8_MAX: tl.constexpr, MANT: tl.constexpr,
                     BIAS: tl.constexpr, GROUP: tl.constexpr, ROWS: tl.constexpr):
    rows, offsets, mask, row_mask = _tile(tl.program_id(0), numel, GROUP, ROWS)
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(x), axis=1)
    scale = tl.where(amax > 0, tl.math.div_rn(amax, FP8_MAX), 1.0)
    q = tl.minimum(tl.math.div_rn(tl.abs(x), scale[:, None]), FP8_MAX)
    tl.store(codes_ptr + offsets, _encode_fp8(q, _sign_bit(x), MANT, BIAS), mask=mask)
    tl.store(scales_ptr + rows, scale, mask=row_mask)


@triton.jit
def _dequantize_kernel(codes_ptr, scales_ptr, out_ptr, numel, MANT: tl.constexpr, BIAS: tl.constexpr,
                       GROUP: tl.constexpr, ROWS: tl.constexpr):
    rows, offsets, mask, row_mask = _tile(tl.program_id(0), numel, GROUP, ROWS)
    mag, negative = _decode_fp8(tl.load(codes_ptr + offsets, mask=mask, other=0), MANT, BIAS)
    x = mag * tl.load(scales_ptr + rows, mask=row_mask, other=1.0)[:, None]
    tl.store(out_ptr + offsets, _apply_sign(x, negative).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _quantize_expanded_kernel(x_ptr, codes_ptr, amax_ptr, k16_ptr, numel, LOG2_RANGE: tl.constexpr,
                              LOG2_E4M3_MAX: tl.constexpr, TINY: tl.constexpr, GROUP: tl.constexpr,
                              ROWS: tl.constexpr):
    rows, offsets, mask, row_mask = _tile(tl.program_id(0), numel, GROUP, ROWS)
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    mag = tl.abs(x)
    amax = tl.max(mag, axis=1)
    # The torch reference's log-domain arithmetic, step for step (see quantize_fp8_expanded_torch).
    nonzero = mag >= TINY
    log_mag = tl.log2(tl.maximum(mag, TINY))
    log_max = tl.max(log_mag, axis=1)
    log_min = tl.min(tl.where(nonzero, log_mag, float("inf")), axis=1)
    # (1 / ratio) · range · 16, the torch reference's (and the C++ step's) order of roundings.
    k16 = tl.clamp(tl.floor(tl.math.div_rn(1.0, log_max - log_min) * LOG2_RANGE * 16.0), 1.0, 255.0)
    k = k16 * 0.0625  # exact (a power of two), where `/` would be an approximate division
    offset = LOG2_E4M3_MAX - k * log_max
    q = tl.where(nonzero, tl.exp2(offset[:, None] + log_mag * k[:, None]), 0.0)
    tl.store(codes_ptr + offsets, _encode_fp8(q, _sign_bit(x), 3, 7), mask=mask)
    tl.store(amax_ptr + rows, amax, mask=row_mask)
    tl.store(k16_ptr + rows, k16.to(tl.uint8), mask=row_mask)


@triton.jit
def _dequantize_expanded_kernel(codes_ptr, amax_ptr, k16_ptr, out_ptr, numel, LOG2_E4M3_MAX: tl.constexpr,
                                TINY: tl.constexpr, GROUP: tl.constexpr, ROWS: tl.constexpr):
    rows, offsets, mask, row_mask = _tile(tl.program_id(0), numel, GROUP, ROWS)
    q, negative = _decode_fp8(tl.load(codes_ptr + offsets, mask=mask, other=0), 3, 7)
    amax = tl.load(amax_ptr + rows, mask=row_mask, other=0.0)
    inv_k = tl.math.div_rn(16.0, tl.load(k16_ptr + rows, mask=row_mask, other=16).to(tl.float32))
    offset = tl.log2(tl.maximum(amax, TINY)) - LOG2_E4M3_MAX * inv_k
    x = tl.where(q > 0, tl.exp2(offset[:, None] + tl.log2(tl.maximum(q, TINY)) * inv_k[:, None]), 0.0)
    tl.store(out_ptr + offsets, _apply_sign(x, negative).to(out_ptr.dtype.element_ty), mask=mask)


# GPU launch configs. The kernels are memory-bound single passes without loops, so one stage, and ~2K
# elements per program (16 KiB of fp32 in registers over 4 warps) keeps enough blocks in flight for any
# tensor big enough to matter. The interpreter costs milliseconds per program, so it runs big tiles.
_GPU_ELEMENTS_PER_PROGRAM, _GPU_NUM_WARPS, _GPU_NUM_STAGES = 2048, 4, 1
_INTERPRETER_ELEMENTS_PER_PROGRAM = 1 << 16
# (mantissa bits, exponent bias) of each format, for the integer encoder/decoder.
_FP8_LAYOUT = {torch.float8_e4m3fn: (3, 7), torch.float8_e5m2: (2, 15)}
_DEQUANTIZE_EXPANDED_CONSTANTS = dict(LOG2_E4M3_MAX=math.log2(_E4M3_MAX), TINY=_TINY)
_EXPANDED_CONSTANTS = dict(LOG2_RANGE=_EXPANSION_LOG2_RANGE, **_DEQUANTIZE_EXPANDED_CONSTANTS)


def _rows_per_program(group_size: int) -> int:
    per_program = _INTERPRETER_ELEMENTS_PER_PROGRAM if interpreter_enabled() else _GPU_ELEMENTS_PER_PROGRAM
    return max(1, per_program // group_size)


def _launch(kernel, numel: int, group_size: int, *args, **constexprs) -> None:
    rows = _rows_per_program(group_size)
    grid = (triton.cdiv(triton.cdiv(numel, group_size), rows),)
    kernel[grid](*args, numel, GROUP=group_size, ROWS=rows, num_warps=_GPU_NUM_WARPS,
                 num_stages=_GPU_NUM_STAGES, **constexprs)


def quantize_fp8_triton(
    x: torch.Tensor, group_size: int = 128, fp8_dtype: torch.dtype = torch.float8_e4m3fn
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of :func:`quantize_fp8_torch` (same signature and results)."""
    _check_input(x, group_size)
    fp8_max = _check_fp8(fp8_dtype)
    x = x.contiguous()
    codes = torch.empty(x.shape, dtype=fp8_dtype, device=x.device)
    scales = torch.empty(triton.cdiv(x.numel(), group_size), dtype=torch.float32, device=x.device)
    if x.numel():
        mant, bias = _FP8_LAYOUT[fp8_dtype]
        _launch(_quantize_kernel, x.numel(), group_size, x, codes.view(torch.uint8), scales,
                FP8_MAX=fp8_max, MANT=mant, BIAS=bias)
    return codes, scales


def dequantize_fp8_triton(
    codes: torch.Tensor, scales: torch.Tensor, group_size: int = 128, out_dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Triton version of :func:`dequantize_fp8_torch` (same signature and results)."""
    _check_group_size(group_size)
    _check_fp8(codes.dtype)
    _check_group_stats(codes, scales, group_size, "scales")
    codes = codes.contiguous()
    out = torch.empty(codes.shape, dtype=out_dtype, device=codes.device)
    if codes.numel():
        mant, bias = _FP8_LAYOUT[codes.dtype]
        _launch(_dequantize_kernel, codes.numel(), group_size, codes.view(torch.uint8),
                scales.float().contiguous(), out, MANT=mant, BIAS=bias)
    return out


def quantize_fp8_expanded_triton(
    x: torch.Tensor, group_size: int = 128
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton version of :func:`quantize_fp8_expanded_torch` (same signature; fp32 log2/exp2 may differ
    from torch's in the last bit, so a code can differ by one step at a rounding boundary)."""
    _check_input(x, group_size)
    x = x.contiguous()
    n_groups = triton.cdiv(x.numel(), group_size)
    codes = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device)
    amax = torch.empty(n_groups, dtype=torch.float32, device=x.device)
    k16 = torch.empty(n_groups, dtype=torch.uint8, device=x.device)
    if x.numel():
        _launch(_quantize_expanded_kernel, x.numel(), group_size, x, codes.view(torch.uint8), amax, k16,
                **_EXPANDED_CONSTANTS)
    return codes, amax, k16


def dequantize_fp8_expanded_triton(
    codes: torch.Tensor,
    amax: torch.Tensor,
    k16: torch.Tensor,
    group_size: int = 128,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Triton version of :func:`dequantize_fp8_expanded_torch` (same signature and results)."""
    _check_expanded(codes, amax, k16, group_size)
    codes = codes.contiguous()
    out = torch.empty(codes.shape, dtype=out_dtype, device=codes.device)
    if codes.numel():
        _launch(_dequantize_expanded_kernel, codes.numel(), group_size, codes.view(torch.uint8),
                amax.float().contiguous(), k16.contiguous(), out, **_DEQUANTIZE_EXPANDED_CONSTANTS)
    return out


# ---------------------------------------------------------------------------------------------------
# Ahead-of-time compile cases (read by the kernels' AOT test: every case compiles for sm_80 and sm_90a).
# ---------------------------------------------------------------------------------------------------

_TRITON_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.uint8: "u8"}
_FORMAT_TAGS = {torch.float8_e4m3fn: "e4m3", torch.float8_e5m2: "e5m2"}


def _aot_case(name: str, fn, pointers: dict, group_size: int, **constants) -> dict:
    """One entry of :data:`AOT_CASES` in the form ``triton.compiler.ASTSource(fn, signature, constexprs)`` takes."""
    constexprs = {"GROUP": group_size, "ROWS": _GPU_ELEMENTS_PER_PROGRAM // group_size, **constants}
    signature = {arg: "*" + _TRITON_TYPES[dtype] for arg, dtype in pointers.items()}
    signature |= {"numel": "i32"} | {arg: "constexpr" for arg in constexprs}
    return {"name": name, "fn": fn, "signature": signature, "constexprs": constexprs,
            "num_warps": _GPU_NUM_WARPS, "num_stages": _GPU_NUM_STAGES}


def _aot_cases() -> list[dict]:
    cases = []
    for group_size in (16, 128):
        for fp8_dtype, fp8_max in FP8_MAX.items():
            for dtype in (torch.float32, torch.bfloat16):
                tag = f"{_FORMAT_TAGS[fp8_dtype]}_{_TRITON_TYPES[dtype]}_g{group_size}"
                mant, bias = _FP8_LAYOUT[fp8_dtype]
                cases.append(_aot_case(
                    f"fp8_quantize_{tag}", _quantize_kernel,
                    {"x_ptr": dtype, "codes_ptr": torch.uint8, "scales_ptr": torch.float32},
                    group_size, FP8_MAX=fp8_max, MANT=mant, BIAS=bias))
                cases.append(_aot_case(
                    f"fp8_dequantize_{tag}", _dequantize_kernel,
                    {"codes_ptr": torch.uint8, "scales_ptr": torch.float32, "out_ptr": dtype}, group_size,
                    MANT=mant, BIAS=bias))
    # The expanded format stores fp32 optimizer moments in groups of 128.
    fp32, u8 = torch.float32, torch.uint8
    cases.append(_aot_case(
        "fp8_quantize_expanded_fp32_g128", _quantize_expanded_kernel,
        {"x_ptr": fp32, "codes_ptr": u8, "amax_ptr": fp32, "k16_ptr": u8}, 128, **_EXPANDED_CONSTANTS))
    cases.append(_aot_case(
        "fp8_dequantize_expanded_fp32_g128", _dequantize_expanded_kernel,
        {"codes_ptr": u8, "amax_ptr": fp32, "k16_ptr": u8, "out_ptr": fp32}, 128,
        **_DEQUANTIZE_EXPANDED_CONSTANTS))
    return cases


AOT_CASES: list[dict] = _aot_cases()
