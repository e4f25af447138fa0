"""FP8 per-group quantisation (E4M3 / E5M2) and COAT's dynamic-range-expanded variant.

A tensor is read as its flattened values split into groups of ``group_size`` consecutive elements (1×G
groups); the last group is implicitly zero-padded when the size is not a multiple of G, so codes always
have the input's shape and no padding is ever stored. Two formats:

* **plain** (:func:`quantize_fp8`): ``scale = absmax / fp8_max`` per group, ``code = x / scale``.
* **expanded** (:func:`quantize_fp8_expanded`, COAT's *dynamic range expansion*, E4M3 only): with
  ``max``/``min`` the largest and smallest non-zero magnitude of the group, COAT picks an exponent
  ``k = floor(log2(448²/2) / log2(max/min) · 16) / 16`` so that ``|x|^k`` spans FP8's range, and stores
  ``q = sign(x)·(|x|/c)^k / s`` with centre ``c = √(max·min)`` and ``s = (max/c)^k / 448``. Substituting
  ``s`` gives ``q = sign(x) · 448 · (|x|/max)^k``: the centre cancels, and ``(max, k)`` determine the
  same codes and the same dequantisation ``x = sign(q) · max · (|q|/448)^(1/k)``. We therefore store
  ``max`` (fp32) and ``16·k`` (uint8, exact because k is a multiple of 1/16) — 5 bytes per group instead
  of 12, which is what keeps an FP8 Adam state at ≤2.1 bytes per parameter. ``16·k`` is clamped to
  [1, 255] (a uint8): the cap only binds for groups with ``max/min < 2.07``, where k ≈ 16 already makes
  the relative step of the dequantised values 16x finer than plain E4M3's.

Each op exists as ``<op>_torch`` (plain torch, any device) and ``<op>_triton`` (Triton kernel) with the
same signature; ``<op>`` dispatches through :mod:`kernels.backend`. Group sizes must be powers of two
(a Triton block dimension). The plain ops match bit for bit across backends; the expanded ones use
fp32 ``log2``/``exp2``, whose last bit differs between libraries, so a code may differ by one step.
"""

import math

import torch
import triton
import triton.language as tl

from .backend import interpreter_enabled, use_triton

__all__ = [
    "FP8_MAX",
    "AOT_CASES",
    "quantize_fp8",
    "dequantize_fp8",
    "quantize_fp8_expanded",
    "dequantize_fp8_expanded",
    "quantize_fp8_torch",
    "dequantize_fp8_torch",
    "quantize_fp8_expanded_torch",
    "dequantize_fp8_expanded_torch",
    "quantize_fp8_triton",
    "dequantize_fp8_triton",
    "quantize_fp8_expanded_triton",
    "dequantize_fp8_expanded_triton",
]

FP8_MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}
_E4M3_MAX = FP8_MAX[torch.float8_e4m3fn]
# COAT's target range for |x|^k: log2(448² / 2).
_EXPANSION_LOG2_RANGE = math.log2(_E4M3_MAX**2 / 2)
_K_STEPS = 16  # k is a multiple of 1/16
_K16_MIN, _K16_MAX = 1, 255  # the range a uint8 holds, excluding k = 0
# The expanded format treats magnitudes below fp32's smallest normal as zero: such moments are far below
# any eps, GPUs flush them in log2 anyway, and on CPU log2 of zeros and subnormals runs 10-40x slower
# than of normal numbers, so zeros are clamped to this before the log and masked out after.
_TINY = torch.finfo(torch.float32).tiny
_FLOAT_INPUTS = (torch.float32, torch.float16, torch.bfloat16)


def _check_group_size(group_size: int) -> None:
    if not (isinstance(group_size, int) and group_size >= 2 and group_size & (group_size - 1) == 0):
        raise ValueError(f"group_size={group_size!r} must be a power of two >= 2 (a Triton block size)")


def _check_input(x: torch.Tensor, group_size: int) -> None:
    _check_group_size(group_size)
    if x.dtype not in _FLOAT_INPUTS:
        raise TypeError(f"FP8 quantisation takes {_FLOAT_INPUTS} tensors, got {x.dtype}")


def _check_fp8(dtype: torch.dtype) -> float:
    if dtype not in FP8_MAX:
        raise TypeError(f"fp8_dtype={dtype} is not supported; expected one of {list(FP8_MAX)}")
    return FP8_MAX[dtype]


def _check_group_stats(codes: torch.Tensor, stats: torch.Tensor, group_size: int, name: str) -> None:
    n_groups = triton.cdiv(codes.numel(), group_size)
    if stats.numel() != n_groups:
        raise ValueError(
            f"{name} has {stats.numel()} entries but {codes.numel()} codes in groups of {group_size} "
            f"need {n_groups}"
        )


# ---------------------------------------------------------------------------------------------------
# torch references
# ---------------------------------------------------------------------------------------------------


def _fp8_to_float(codes: torch.Tensor) -> torch.Tensor:
    """Exact fp32 values of E4M3/E5M2 codes.

    torch's fp8 -> fp32 cast is a scalar loop on CPU (8.6 ms per million values here, 12x its
    fp32 -> fp8 cast). Both formats are an fp16 with bits cut off: E5M2 is fp16's top byte, and E4M3's
    exponent and mantissa, moved into fp16's fields, read as the value times 2^-8 (subnormals included).
    The vectorised fp16 -> fp32 cast then does the work.
    """
    bits = codes.view(torch.uint8).to(torch.int16)
    if codes.dtype == torch.float8_e5m2:
        return (bits << 8).view(torch.float16).float()
    half = ((bits & 0x7F) << 7) | ((bits & 0x80) << 8)
    return half.view(torch.float16).float().mul_(256.0)


def _as_groups(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """``x`` as fp32 ``[n_groups, group_size]``, zero-padded; a view of ``x`` when no copy is needed,
    so callers must not modify the result in place."""
    flat = _fp8_to_float(x.reshape(-1)) if x.dtype in FP8_MAX else x.reshape(-1).float()
    if flat.numel() % group_size == 0:
        return flat.view(-1, group_size)
    # Zero only the tail: F.pad would fill the whole buffer before copying into it.
    padded = flat.new_empty(triton.cdiv(flat.numel(), group_size) * group_size)
    padded[: flat.numel()].copy_(flat)
    padded[flat.numel():].zero_()
    return padded.view(-1, group_size)


def _ungroup(groups: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return groups.reshape(-1)[: like.numel()].view(like.shape)


def _expansion_k16(log2_ratio: torch.Tensor) -> torch.Tensor:
    """COAT's per-group exponent times 16 from ``log2(max/min)``, as uint8 (a zero ratio — one distinct
    magnitude — gets the cap; all-zero groups, with ratio -inf, the harmless minimum)."""
    k16 = torch.floor(_EXPANSION_LOG2_RANGE / log2_ratio * _K_STEPS)
    return k16.clamp_(_K16_MIN, _K16_MAX).to(torch.uint8)


def quantize_fp8_torch(
    x: torch.Tensor, group_size: int = 128, fp8_dtype: torch.dtype = torch.float8_e4m3fn
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain per-group quantisation (torch reference).

    Returns ``(codes, scales)``: ``codes`` has ``x``'s shape and dtype ``fp8_dtype``; ``scales`` is fp32
    ``[ceil(numel / group_size)]`` with ``absmax / fp8_max`` per group (1.0 for all-zero groups).
    """
    _check_input(x, group_size)
    fp8_max = _check_fp8(fp8_dtype)
    groups = _as_groups(x, group_size)
    amax = groups.abs().amax(dim=1)
    scales = torch.where(amax > 0, amax / fp8_max, 1.0)
    codes = (groups / scales[:, None]).clamp_(-fp8_max, fp8_max)
    return _ungroup(codes, x).to(fp8_dtype), scales


def dequantize_fp8_torch(
    codes: torch.Tensor, scales: torch.Tensor, group_size: int = 128, out_dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Inverse of :func:`quantize_fp8_torch`: ``codes · scale`` per group, shaped like ``codes``."""
    _check_group_size(group_size)
    _check_fp8(codes.dtype)
    _check_group_stats(codes, scales, group_size, "scales")
    values = _as_groups(codes, group_size) * scales.float()[:, None]
    return _ungroup(values, codes).to(out_dtype)


def quantize_fp8_expanded_torch(
    x: torch.Tensor, group_size: int = 128
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """COAT dynamic-range-expanded E4M3 quantisation (torch reference); see the module docstring.

    Returns ``(codes, amax, k16)``: E4M3 codes shaped like ``x``, the per-group fp32 absmax and the
    per-group uint8 ``16·k``.
    """
    _check_input(x, group_size)
    groups = _as_groups(x, group_size)
    mag = groups.abs()
    amax = mag.amax(dim=1)
    nonzero = mag >= _TINY
    # Work in log2: q = 448·(|x|/max)^k = 2^(k·log2|x| + log2(448) - k·log2(max)); |x| <= max, so q <= 448.
    log_mag = mag.clamp_min_(_TINY).log2_()
    log_max = log_mag.amax(dim=1)
    log_min = torch.where(nonzero, log_mag, math.inf).amin(dim=1)  # zeros left out of the min
    k16 = _expansion_k16(log_max - log_min)
    k = k16.float() / _K_STEPS
    offset = math.log2(_E4M3_MAX) - k * log_max
    # In-place mul_/add_: a broadcasting addcmul is several times slower on CPU.
    q = log_mag.mul_(k[:, None]).add_(offset[:, None]).exp2_().mul_(nonzero).copysign_(groups)
    return _ungroup(q, x).to(torch.float8_e4m3fn), amax, k16


def dequantize_fp8_expanded_torch(
    codes: torch.Tensor,
    amax: torch.Tensor,
    k16: torch.Tensor,
    group_size: int = 128,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Inverse of :func:`quantize_fp8_expanded_torch`: ``sign(q) · amax · (|q|/448)^(1/k)``."""
    _check_group_size(group_size)
    if codes.dtype != torch.float8_e4m3fn:
        raise TypeError(f"expanded codes must be float8_e4m3fn, got {codes.dtype}")
    _check_group_stats(codes, amax, group_size, "amax")
    _check_group_stats(codes, k16, group_size, "k16")
    q = _as_groups(codes, group_size)
    # x = max·(|q|/448)^(1/k) = 2^(log2|q|/k + log2(max) - log2(448)/k); zero codes give -inf, then 0.
    inv_k = _K_STEPS / k16.float()
    offset = amax.float().clamp_min(_TINY).log2() - math.log2(_E4M3_MAX) * inv_k
    mag = q.abs()
    nonzero = mag > 0
    x = mag.clamp_min_(_TINY).log2_().mul_(inv_k[:, None]).add_(offset[:, None]).exp2_().mul_(nonzero)
    return _ungroup(x.copysign_(q), codes).to(out_dtype)


# ---------------------------------------------------------------------------------------------------
# Triton kernels: one program handles ROWS groups as a [ROWS, GROUP] tile. Codes travel as uint8 bit
# patterns encoded and decoded here with integer ops, because (a) Ampere (sm_80) has no E4M3 type in
# Triton and (b) the interpreter's fp32->fp8 cast drops the rounding carry (measured: 31.5 -> 16 in
# E4M3). The encoder rounds to nearest-even like torch's cast, so codes match the torch reference bit
# for bit wherever the fp32 inputs to the cast match.
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
def _quantize_kernel(x_ptr, codes_ptr, scales_ptr, numel, FP8_MAX: tl.constexpr, MANT: tl.constexpr,
                     BIAS: tl.constexpr, GROUP: tl.constexpr, ROWS: tl.constexpr):
    rows, offsets, mask, row_mask = _tile(tl.program_id(0), numel, GROUP, ROWS)
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(x), axis=1)
    scale = tl.where(amax > 0, amax / FP8_MAX, 1.0)
    q = tl.minimum(tl.math.div_rn(tl.abs(x), scale[:, None]), FP8_MAX)
    tl.store(codes_ptr + offsets, _encode_fp8(q, _sign_bit(x), MANT, BIAS), mask=mask)
    tl.store(scales_ptr + rows, scale, mask=row_mask)


@triton.jit
def _dequantize_kernel(codes_ptr, scales_ptr, out_ptr, numel, MANT: tl.constexpr, BIAS: tl.constexpr,
                       GROUP: tl.constexpr, ROWS: tl.constexpr):
    rows, offsets, mask, row_mask = _tile(tl.program_id(0), numel, GROUP, ROWS)
    mag, negative = _decode_fp8(tl.load(codes_ptr + offsets, mask=mask, other=0), MANT, BIAS)
    x = mag * tl.load(scales_ptr + rows, mask=row_mask, other=1.0)[:, None]
    tl.store(out_ptr + offsets, tl.where(negative, -x, x).to(out_ptr.dtype.element_ty), mask=mask)


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
    k16 = tl.clamp(tl.floor(LOG2_RANGE / (log_max - log_min) * 16.0), 1.0, 255.0)
    k = k16 / 16.0
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
    inv_k = 16.0 / tl.load(k16_ptr + rows, mask=row_mask, other=16).to(tl.float32)
    offset = tl.log2(tl.maximum(amax, TINY)) - LOG2_E4M3_MAX * inv_k
    x = tl.where(q > 0, tl.exp2(offset[:, None] + tl.log2(tl.maximum(q, TINY)) * inv_k[:, None]), 0.0)
    tl.store(out_ptr + offsets, tl.where(negative, -x, x).to(out_ptr.dtype.element_ty), mask=mask)


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
    _check_group_size(group_size)
    if codes.dtype != torch.float8_e4m3fn:
        raise TypeError(f"expanded codes must be float8_e4m3fn, got {codes.dtype}")
    _check_group_stats(codes, amax, group_size, "amax")
    _check_group_stats(codes, k16, group_size, "k16")
    codes = codes.contiguous()
    out = torch.empty(codes.shape, dtype=out_dtype, device=codes.device)
    if codes.numel():
        _launch(_dequantize_expanded_kernel, codes.numel(), group_size, codes.view(torch.uint8),
                amax.float().contiguous(), k16.contiguous(), out, **_DEQUANTIZE_EXPANDED_CONSTANTS)
    return out


# ---------------------------------------------------------------------------------------------------
# Public ops: Triton or torch per kernels.backend.
# ---------------------------------------------------------------------------------------------------


def quantize_fp8(
    x: torch.Tensor, group_size: int = 128, fp8_dtype: torch.dtype = torch.float8_e4m3fn
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group FP8 quantisation: ``(codes shaped like x, fp32 scales per group)``; see :func:`quantize_fp8_torch`."""
    impl = quantize_fp8_triton if use_triton(x.device) else quantize_fp8_torch
    return impl(x, group_size, fp8_dtype)


def dequantize_fp8(
    codes: torch.Tensor, scales: torch.Tensor, group_size: int = 128, out_dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Inverse of :func:`quantize_fp8`; see :func:`dequantize_fp8_torch`."""
    impl = dequantize_fp8_triton if use_triton(codes.device) else dequantize_fp8_torch
    return impl(codes, scales, group_size, out_dtype)


def quantize_fp8_expanded(
    x: torch.Tensor, group_size: int = 128
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """COAT dynamic-range-expanded E4M3 quantisation: ``(codes, amax, k16)``; see the module docstring."""
    impl = quantize_fp8_expanded_triton if use_triton(x.device) else quantize_fp8_expanded_torch
    return impl(x, group_size)


def dequantize_fp8_expanded(
    codes: torch.Tensor,
    amax: torch.Tensor,
    k16: torch.Tensor,
    group_size: int = 128,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Inverse of :func:`quantize_fp8_expanded`; see :func:`dequantize_fp8_expanded_torch`."""
    impl = dequantize_fp8_expanded_triton if use_triton(codes.device) else dequantize_fp8_expanded_torch
    return impl(codes, amax, k16, group_size, out_dtype)


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
