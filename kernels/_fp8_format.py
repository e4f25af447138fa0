"""The FP8 formats' constants and argument checks, shared by every FP8 implementation in ``kernels``.

One owner for what :mod:`kernels.fp8` (torch references and dispatch), :mod:`kernels._fp8_triton` (Triton
kernels) and :mod:`kernels.fp8_adamw` (the optimizer step) all need; imports torch only, so none of them
has to import another to read a constant. See :mod:`kernels.fp8` for what the formats are.
"""

import math

import torch

FP8_MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}
E4M3_MAX = FP8_MAX[torch.float8_e4m3fn]
# COAT's target range for |x|^k: log2(448² / 2).
EXPANSION_LOG2_RANGE = math.log2(E4M3_MAX**2 / 2)
K_STEPS = 16  # k is a multiple of 1/16
K16_MIN, K16_MAX = 1, 255  # the range a uint8 holds, excluding k = 0
# The expanded format treats magnitudes below fp32's smallest normal as zero: such moments are far below
# any eps, GPUs flush them in log2 anyway, and on CPU log2 of zeros and subnormals runs 10-40x slower
# than of normal numbers, so zeros are clamped to this before the log and masked out after.
TINY = torch.finfo(torch.float32).tiny
FLOAT_INPUTS = (torch.float32, torch.float16, torch.bfloat16)


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for non-negative ints (``triton.cdiv`` without importing Triton)."""
    return -(-a // b)


def n_groups(numel: int, group_size: int) -> int:
    """Groups of ``group_size`` values a tensor of ``numel`` values is split into (the last zero-padded)."""
    return cdiv(numel, group_size)


def check_group_size(group_size: int) -> None:
    if not (isinstance(group_size, int) and group_size >= 2 and group_size & (group_size - 1) == 0):
        raise ValueError(f"group_size={group_size!r} must be a power of two >= 2 (a Triton block size)")


def check_input(x: torch.Tensor, group_size: int) -> None:
    check_group_size(group_size)
    if x.dtype not in FLOAT_INPUTS:
        raise TypeError(f"FP8 quantisation takes {FLOAT_INPUTS} tensors, got {x.dtype}")


def check_fp8(dtype: torch.dtype) -> float:
    """``dtype``'s largest finite value; ``TypeError`` for a dtype that is not a supported FP8 format."""
    if dtype not in FP8_MAX:
        raise TypeError(f"fp8_dtype={dtype} is not supported; expected one of {list(FP8_MAX)}")
    return FP8_MAX[dtype]


def check_group_stats(codes: torch.Tensor, stats: torch.Tensor, group_size: int, name: str) -> None:
    expected = n_groups(codes.numel(), group_size)
    if stats.numel() != expected:
        raise ValueError(
            f"{name} has {stats.numel()} entries but {codes.numel()} codes in groups of {group_size} "
            f"need {expected}"
        )


def check_expanded(codes: torch.Tensor, amax: torch.Tensor, k16: torch.Tensor, group_size: int) -> None:
    """Validate the inputs of a range-expanded dequantisation (every backend)."""
    check_group_size(group_size)
    if codes.dtype != torch.float8_e4m3fn:
        raise TypeError(f"expanded codes must be float8_e4m3fn, got {codes.dtype}")
    check_group_stats(codes, amax, group_size, "amax")
    check_group_stats(codes, k16, group_size, "k16")
