"""Triton FP8 kernels vs their torch references, run by test_fp8_kernels.py in a subprocess.

Not collected on its own (no ``test_`` prefix). On the CPU it must run with ``TRITON_INTERPRET=1`` set
before the FP8 kernels are defined, because ``@triton.jit`` decides interpreted vs compiled when it runs;
the parent test starts ``pytest`` on this file with the variable set in the child's environment only.
With the ``device`` fixture on CUDA (tests/conftest.py) the child runs without it and the kernels compile.

Inputs are drawn and the torch references computed on the CPU (the references test_fp8_kernels.py checks
against independent oracles); the kernels run on ``device`` and their results are compared on the CPU.
"""

import os

import pytest
import torch

from kernels import _fp8_triton as fp8_triton
from kernels import fp8
from kernels.backend import interpreter_enabled, use_backend
from tests.fp8.fp8_inputs import crafted_plain_inputs

assert interpreter_enabled() or torch.cuda.is_available(), "run through test_fp8_kernels.py (needs TRITON_INTERPRET=1)"

SIZES = [1, 7, 100, 129, 4099]  # odd sizes: single element, partial groups, several programs' worth


def _values(numel: int, dtype: torch.dtype) -> torch.Tensor:
    gen = torch.Generator().manual_seed(numel)
    x = torch.randn(numel, generator=gen) * torch.logspace(-4, 4, numel)  # groups with wide and narrow range
    x[::7] = 0.0
    x[3::11] = -0.0
    return x.to(dtype)


def _bits(codes: torch.Tensor) -> torch.Tensor:
    return codes.view(torch.uint8)


@pytest.mark.parametrize("numel", SIZES)
@pytest.mark.parametrize("group_size", [16, 128])
@pytest.mark.parametrize("fp8_dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_plain_matches_reference_bit_for_bit(numel, group_size, fp8_dtype, dtype, device):
    x = _values(numel, dtype)
    ref_codes, ref_scales = fp8.quantize_fp8_torch(x, group_size, fp8_dtype)
    codes, scales = (t.cpu() for t in fp8_triton.quantize_fp8_triton(x.to(device), group_size, fp8_dtype))
    assert torch.equal(scales, ref_scales)
    assert torch.equal(_bits(codes), _bits(ref_codes))  # integer encoder == torch's cast, signed zeros included
    for out_dtype in (torch.float32, dtype):
        expected = fp8.dequantize_fp8_torch(codes, scales, group_size, out_dtype)
        got = fp8_triton.dequantize_fp8_triton(codes.to(device), scales.to(device), group_size, out_dtype).cpu()
        assert got.dtype == out_dtype
        if out_dtype == torch.float32 or device.type == "cuda":
            assert torch.equal(got, expected)
        else:
            # The interpreter's fp32 -> bf16/fp16 cast rounds ties away from zero (measured: 35.625 ->
            # 35.75 in bf16) where torch and GPUs round to even: one ulp of the output dtype.
            eps = torch.finfo(out_dtype).eps
            torch.testing.assert_close(got.float(), expected.float(), rtol=eps, atol=0.0)


@pytest.mark.parametrize("fp8_dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_plain_matches_reference_at_ties_subnormals_and_max(dtype, fp8_dtype, device):
    """65,536 values with exact ties, subnormals, values at the max and bf16 groups whose codes sit next to
    ties: where a reference scaled by the rounded reciprocal moves codes (test_fp8_kernels.py)."""
    x = crafted_plain_inputs(dtype)
    ref_codes, ref_scales = fp8.quantize_fp8_torch(x, 128, fp8_dtype)
    codes, scales = (t.cpu() for t in fp8_triton.quantize_fp8_triton(x.to(device), 128, fp8_dtype))
    assert torch.equal(scales, ref_scales)
    assert torch.equal(_bits(codes), _bits(ref_codes))


@pytest.mark.parametrize("numel", SIZES)
@pytest.mark.parametrize("group_size", [16, 128])
def test_expanded_matches_reference(numel, group_size, device):
    x = _values(numel, torch.float32)
    ref_codes, ref_amax, ref_k16 = fp8.quantize_fp8_expanded_torch(x, group_size)
    codes, amax, k16 = (t.cpu() for t in fp8_triton.quantize_fp8_expanded_triton(x.to(device), group_size))
    assert torch.equal(amax, ref_amax) and torch.equal(k16, ref_k16)
    # Interpreter (numpy) or GPU (libdevice log2, ex2.approx, fused multiply-adds) and torch (SLEEF) compute
    # log2/exp2 differently in the last bits, so a code may land one step away at a rounding boundary;
    # measured here in the interpreter: none at these sizes.
    steps = (_bits(codes).int() - _bits(ref_codes).int()).abs()
    assert steps.max() <= 1 and (steps > 0).float().mean() <= 0.01
    expected = fp8.dequantize_fp8_expanded_torch(ref_codes, ref_amax, ref_k16, group_size)
    got = fp8_triton.dequantize_fp8_expanded_triton(
        ref_codes.to(device), ref_amax.to(device), ref_k16.to(device), group_size
    ).cpu()
    # Same library difference in the decode: a few fp32 ulps (measured max 7.5e-7 relative in the
    # interpreter). The GPU's ex2.approx (2 ulp) and a log2 error scaled by 1/k (up to 16) allow ~1e-5.
    torch.testing.assert_close(got, expected, rtol=4e-6 if device.type == "cpu" else 1e-5, atol=0.0)
    assert torch.equal(torch.signbit(got), torch.signbit(expected))


def test_public_ops_dispatch_to_triton_when_forced(device):
    x = _values(300, torch.float32).to(device)
    with use_backend("triton"):
        codes, scales = fp8.quantize_fp8(x, 16)
        restored = fp8.dequantize_fp8_expanded(*fp8.quantize_fp8_expanded(x, 128), 128)
    assert torch.equal(codes.view(torch.uint8), fp8_triton.quantize_fp8_triton(x, 16)[0].view(torch.uint8))
    packed = fp8_triton.quantize_fp8_expanded_triton(x, 128)
    assert torch.equal(restored, fp8_triton.dequantize_fp8_expanded_triton(*packed, 128))


def test_empty_tensor(device):
    codes, scales = fp8_triton.quantize_fp8_triton(torch.empty(0, device=device), 16)
    assert codes.shape == (0,) and scales.shape == (0,)
