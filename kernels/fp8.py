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

Each op exists as ``<op>_torch`` (plain torch, any device, here) and ``<op>_triton`` (Triton kernel, in
:mod:`kernels._fp8_triton`) with the same signature; ``<op>`` dispatches through :mod:`kernels.backend`.
Group sizes must be powers of two (a Triton block dimension).

What matches across backends and devices (tested in tests/fp8/test_fp8_kernels.py):

* plain ops: bit for bit — scales are the IEEE fp32 quotient ``absmax / fp8_max`` and codes the
  round-to-nearest-even E4M3/E5M2 value of the IEEE quotient ``x / scale`` (subnormal codes and signed
  zeros included), on CPU, CUDA and in Triton. Every division here is tensor by tensor: torch on CUDA
  computes ``tensor / python_float`` as ``tensor * (1 / float)`` (one rounding more), which moved ~1e-3 of
  the codes of bf16 inputs one step at near-ties (the H200 run's ``codes identical: False``, reproduced on
  CPU by scaling with ``fl(1/448)``).
* expanded ops: ``amax`` and ``k16`` bit for bit; codes within one step (fp32 ``log2``/``exp2`` differ in
  the last bit between libraries, and GPUs may fuse the multiply-adds; measured on an H200: 2.5e-6 of the
  codes one step off); dequantised values within a few fp32 ulps.
"""

import math

import torch

from ._fp8_format import (
    E4M3_MAX as _E4M3_MAX,
    EXPANSION_LOG2_RANGE as _EXPANSION_LOG2_RANGE,
    FP8_MAX,
    K16_MAX as _K16_MAX,
    K16_MIN as _K16_MIN,
    K_STEPS as _K_STEPS,
    TINY as _TINY,
    check_expanded as _check_expanded,
    check_fp8 as _check_fp8,
    check_group_size as _check_group_size,
    check_group_stats as _check_group_stats,
    check_input as _check_input,
    n_groups as _n_groups,
)
from .backend import use_triton

__all__ = [
    "FP8_MAX",
    "quantize_fp8",
    "dequantize_fp8",
    "quantize_fp8_expanded",
    "dequantize_fp8_expanded",
    "quantize_fp8_torch",
    "dequantize_fp8_torch",
    "quantize_fp8_expanded_torch",
    "dequantize_fp8_expanded_torch",
]


# ---------------------------------------------------------------------------------------------------
# torch references
# ---------------------------------------------------------------------------------------------------


def _fp8_to_float(codes: torch.Tensor) -> torch.Tensor:
    """Exact fp32 values of E4M3/E5M2 codes.

    torch's fp8 -> fp32 cast is a scalar loop on CPU, an order of magnitude slower than its
    fp32 -> fp8 cast. Both formats are an fp16 with bits cut off: E5M2 is fp16's top byte, and E4M3's
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
    padded = flat.new_empty(_n_groups(flat.numel(), group_size) * group_size)
    padded[: flat.numel()].copy_(flat)
    padded[flat.numel():].zero_()
    return padded.view(-1, group_size)


def _ungroup(groups: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return groups.reshape(-1)[: like.numel()].view(like.shape)


def _expansion_k16(log2_ratio: torch.Tensor) -> torch.Tensor:
    """COAT's per-group exponent times 16 from ``log2(max/min)``, as uint8 (a zero ratio — one distinct
    magnitude — gets the cap; all-zero groups, with ratio -inf, the harmless minimum).

    Written as ``(1 / ratio) · range · 16`` on purpose: that is what torch computes for ``float / tensor``
    on every device, and what the Triton kernel and the fused C++ step compute too."""
    k16 = torch.floor(log2_ratio.reciprocal() * _EXPANSION_LOG2_RANGE * _K_STEPS)
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
    # A tensor divisor, never a Python float: torch on CUDA turns `tensor / float` into a multiplication by
    # the rounded reciprocal, which differs from the IEEE quotient (and from CPU and Triton) by one ulp.
    scales = torch.where(amax > 0, amax / torch.full_like(amax, fp8_max), 1.0)
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
    _check_expanded(codes, amax, k16, group_size)
    q = _as_groups(codes, group_size)
    # x = max·(|q|/448)^(1/k) = 2^(log2|q|/k + log2(max) - log2(448)/k); zero codes masked (see _TINY).
    inv_k = _K_STEPS / k16.float()
    offset = amax.float().clamp_min(_TINY).log2() - math.log2(_E4M3_MAX) * inv_k
    mag = q.abs()
    nonzero = mag > 0
    x = mag.clamp_min_(_TINY).log2_().mul_(inv_k[:, None]).add_(offset[:, None]).exp2_().mul_(nonzero)
    return _ungroup(x.copysign_(q), codes).to(out_dtype)


# ---------------------------------------------------------------------------------------------------
# Public ops: Triton or torch per kernels.backend.
# ---------------------------------------------------------------------------------------------------


def _triton_ops():
    """The Triton launchers, imported on first use (``@triton.jit`` reads ``TRITON_INTERPRET`` when it
    runs, so tests can pick the interpreter before any FP8 kernel is defined)."""
    from . import _fp8_triton

    return _fp8_triton


def quantize_fp8(
    x: torch.Tensor, group_size: int = 128, fp8_dtype: torch.dtype = torch.float8_e4m3fn
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group FP8 quantisation: ``(codes shaped like x, fp32 scales per group)``; see :func:`quantize_fp8_torch`."""
    impl = _triton_ops().quantize_fp8_triton if use_triton(x.device) else quantize_fp8_torch
    return impl(x, group_size, fp8_dtype)


def dequantize_fp8(
    codes: torch.Tensor, scales: torch.Tensor, group_size: int = 128, out_dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Inverse of :func:`quantize_fp8`; see :func:`dequantize_fp8_torch`."""
    impl = _triton_ops().dequantize_fp8_triton if use_triton(codes.device) else dequantize_fp8_torch
    return impl(codes, scales, group_size, out_dtype)


def quantize_fp8_expanded(
    x: torch.Tensor, group_size: int = 128
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """COAT dynamic-range-expanded E4M3 quantisation: ``(codes, amax, k16)``; see the module docstring."""
    impl = _triton_ops().quantize_fp8_expanded_triton if use_triton(x.device) else quantize_fp8_expanded_torch
    return impl(x, group_size)


def dequantize_fp8_expanded(
    codes: torch.Tensor,
    amax: torch.Tensor,
    k16: torch.Tensor,
    group_size: int = 128,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Inverse of :func:`quantize_fp8_expanded`; see :func:`dequantize_fp8_expanded_torch`."""
    impl = (_triton_ops().dequantize_fp8_expanded_triton if use_triton(codes.device)
            else dequantize_fp8_expanded_torch)
    return impl(codes, amax, k16, group_size, out_dtype)
