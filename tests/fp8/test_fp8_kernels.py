"""FP8 group quantisation (kernels.fp8): torch references against independent oracles, and the Triton
kernels against the references (in a subprocess, see triton_interpreter_cases.py): in Triton's interpreter
or, with the ``device`` fixture on CUDA (tests/conftest.py), compiled for the GPU."""

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from kernels import fp8
from tests.fp8.fp8_inputs import crafted_plain_inputs

E4M3 = torch.float8_e4m3fn


def _group_loop_plain(x: torch.Tensor, group_size: int, fp8_dtype: torch.dtype):
    """Oracle: one group at a time, torch's own fp8 cast."""
    flat, codes, scales = x.reshape(-1).float(), [], []
    for start in range(0, flat.numel(), group_size):
        group = flat[start:start + group_size]
        amax = group.abs().max()
        scale = amax / fp8.FP8_MAX[fp8_dtype] if amax > 0 else torch.tensor(1.0)
        codes.append((group / scale).to(fp8_dtype))
        scales.append(scale)
    return torch.cat(codes).view(x.shape), torch.stack(scales)


def _coat_literal(x: torch.Tensor, group_size: int):
    """Oracle: COAT's expansion exactly as PAPERS.md writes it (centre c, scale s), in float64.

    Returns the float64 values before the E4M3 cast and the paper's dequantisation of given codes."""
    flat = x.reshape(-1).double()
    pre, params = [], []
    for start in range(0, flat.numel(), group_size):
        group = flat[start:start + group_size]
        mag = group.abs()
        hi, lo = mag.max(), mag[mag > 0].min()
        k = math.floor(math.log2(448.0**2 / 2) / math.log2(hi / lo) * 16) / 16 if hi > lo else 255 / 16
        k = min(max(k, 1 / 16), 255 / 16)
        c = math.sqrt(hi * lo)
        s = (hi / c) ** k / 448.0
        pre.append(torch.sign(group) * (mag / c) ** k / s)
        params.append((k, c, s))
    return torch.cat(pre), params


@pytest.mark.parametrize("numel", [1, 7, 100, 1000])
@pytest.mark.parametrize("group_size", [16, 128])
@pytest.mark.parametrize("fp8_dtype", [E4M3, torch.float8_e5m2])
def test_plain_reference_matches_group_loop(numel, group_size, fp8_dtype):
    x = torch.randn(numel) * 10
    x[::5] = 0
    codes, scales = fp8.quantize_fp8_torch(x, group_size, fp8_dtype)
    want_codes, want_scales = _group_loop_plain(x, group_size, fp8_dtype)
    assert torch.equal(scales, want_scales)
    assert torch.equal(codes.view(torch.uint8), want_codes.view(torch.uint8))
    restored = fp8.dequantize_fp8_torch(codes, scales, group_size)
    # Round-to-nearest: at most half a step, i.e. 2^-(mantissa bits + 1) of the group's scale·2^exponent.
    mantissa = 3 if fp8_dtype == E4M3 else 2
    bound = 2.0 ** -(mantissa + 1) * x.abs() + scales.repeat_interleave(group_size)[:numel] * 2.0**-9
    assert ((restored - x).abs() <= bound).all()


@pytest.mark.parametrize("numel", [1, 7, 129, 1000])
def test_expanded_reference_matches_coat_formulas(numel):
    gen = torch.Generator().manual_seed(numel)
    x = torch.randn(numel, generator=gen) * torch.logspace(-3, 1, numel)
    x[4::9] = 0
    codes, amax, k16 = fp8.quantize_fp8_expanded_torch(x, 128)
    pre, params = _coat_literal(x, 128)
    assert [k for k, _, _ in params] == (k16.double() / 16).tolist()
    # Same value before the cast up to fp32 rounding: codes agree except at rare rounding boundaries.
    want = pre.float().to(E4M3)
    steps = (codes.view(torch.uint8).int() - want.view(torch.uint8).int()).abs()
    assert steps.max() <= 1 and (steps > 0).float().mean() < 0.01
    # The paper's dequantisation x = sign(q)·|q·s|^(1/k)·c of our codes equals ours (centre cancels).
    q = codes.double().view(-1)
    paper = torch.cat([
        torch.sign(g) * (g.abs() * s) ** (1 / k) * c
        for g, (k, c, s) in zip(q.split(128), params)
    ])
    ours = fp8.dequantize_fp8_expanded_torch(codes, amax, k16, 128)
    torch.testing.assert_close(ours.double(), paper, rtol=2e-6, atol=1e-30)


def _trained_adam_moments() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(exp_avg, exp_avg_sq) of each weight matrix after 100 torch AdamW steps on a small MLP regression."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 256),
                              torch.nn.GELU(), torch.nn.Linear(256, 10))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    inputs, targets = torch.randn(512, 64), torch.randn(512, 10)
    for _ in range(100):
        batch = torch.randint(0, 512, (64,))
        loss = (net(inputs[batch]) - targets[batch]).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return [(opt.state[layer.weight]["exp_avg"], opt.state[layer.weight]["exp_avg_sq"]) for layer in net[::2]]


def _mean_relative_error(x: torch.Tensor, restored: torch.Tensor) -> float:
    nonzero = x != 0
    return ((restored - x).abs()[nonzero] / x.abs()[nonzero]).mean().item()


def test_expansion_lowers_error_on_adam_moments():
    for exp_avg, exp_avg_sq in _trained_adam_moments():
        for x, max_ratio in ((exp_avg_sq, 0.3), (exp_avg, 0.7)):
            plain = _mean_relative_error(x, fp8.dequantize_fp8_torch(*fp8.quantize_fp8_torch(x, 128), 128))
            expanded = _mean_relative_error(
                x, fp8.dequantize_fp8_expanded_torch(*fp8.quantize_fp8_expanded_torch(x, 128), 128))
            # Measured here: plain E4M3 2.2% for both moments; expanded 0.3-0.5% for exp_avg_sq (median
            # k 5-8: a group's second moments span a narrow range) and 1.3% for exp_avg (median k 1.9).
            assert expanded < max_ratio * plain, (expanded, plain)


def test_fp8_decode_is_exact_for_every_code():
    codes = torch.arange(256, dtype=torch.uint8)
    for fp8_dtype in (E4M3, torch.float8_e5m2):
        values = codes.view(fp8_dtype)
        finite = values.float().isfinite()
        ours = fp8._fp8_to_float(values)
        assert torch.equal(ours[finite], values.float()[finite])


def test_zero_groups_and_signed_zeros():
    x = torch.zeros(300)
    x[200] = -0.0
    for quantize, dequantize in ((fp8.quantize_fp8_torch, fp8.dequantize_fp8_torch),
                                 (fp8.quantize_fp8_expanded_torch, fp8.dequantize_fp8_expanded_torch)):
        packed = quantize(x, 128)
        restored = dequantize(*packed, 128)
        assert torch.equal(restored, x) and torch.equal(torch.signbit(restored), torch.signbit(x))


def test_errors_name_the_bad_value():
    x = torch.randn(10)
    with pytest.raises(ValueError, match="group_size=100"):
        fp8.quantize_fp8(x, 100)
    with pytest.raises(TypeError, match="int64"):
        fp8.quantize_fp8(torch.ones(10, dtype=torch.int64), 16)
    with pytest.raises(TypeError, match="fp8_dtype"):
        fp8.quantize_fp8(x, 16, torch.float16)
    codes, scales = fp8.quantize_fp8(x, 16)
    with pytest.raises(ValueError, match="scales has 3 entries"):
        fp8.dequantize_fp8(codes, torch.ones(3), 16)


@pytest.mark.slow  # every FP8 kernel under the Triton interpreter (~20 s)
def test_triton_kernels_match_references(device):
    cases = Path(__file__).with_name("triton_interpreter_cases.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env |= {"MOEPLUG_TEST_DEVICE": device.type, "PYTHONWARNINGS": "ignore"}
    if device.type == "cpu":
        env["TRITON_INTERPRET"] = "1"
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(cases)],
                          env=env, capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).parents[2])
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]


# ---------------------------------------------------------------------------------------------------
# The plain format's real guarantee: IEEE quotients, round-to-nearest-even codes, on every device.
# ---------------------------------------------------------------------------------------------------

_LAYOUT = {E4M3: (3, 7), torch.float8_e5m2: (2, 15)}  # mantissa bits, exponent bias


def _rne_fp8_bits(values: np.ndarray, fp8_dtype: torch.dtype) -> np.ndarray:
    """Oracle: E4M3/E5M2 bit patterns of finite fp64 values within the format's range, rounded to nearest
    even, from frexp and np.rint (half to even) alone; no torch cast involved."""
    mant_bits, bias = _LAYOUT[fp8_dtype]
    mag = np.abs(values)
    _, exp2 = np.frexp(mag)  # mag = f·2^exp2 with f in [0.5, 1)
    exponent = np.maximum(exp2 - 1, 1 - bias)  # below the normal range: the subnormal step 2^(1-bias-m)
    steps = np.rint(mag / np.exp2(exponent - mant_bits)).astype(np.int64)  # exact: a power-of-two scale
    carry = steps == 2 << mant_bits  # rounded up to the next binade
    exponent, steps = exponent + carry, np.where(carry, 1 << mant_bits, steps)
    normal = steps >= 1 << mant_bits
    biased = np.where(normal, exponent + bias, 0)
    code = (biased << mant_bits) | (steps - np.where(normal, 1 << mant_bits, 0))
    return (code | np.where(np.signbit(values), 0x80, 0)).astype(np.uint8)


def _ieee_div32(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """fp32 a / b correctly rounded: the fp64 quotient of two fp32 values rounds to the same fp32 as the
    exact one (53 >= 2·24 + 2 bits, so double rounding is innocuous)."""
    return (a.astype(np.float64) / b.astype(np.float64)).astype(np.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fp8_dtype", [E4M3, torch.float8_e5m2])
def test_plain_reference_is_the_ieee_round_to_nearest_even_result(dtype, fp8_dtype):
    x = crafted_plain_inputs(dtype)
    codes, scales = fp8.quantize_fp8_torch(x, 128, fp8_dtype)
    groups = x.float().view(-1, 128).numpy()
    amax = np.abs(groups).max(axis=1)
    fp8_max = np.full_like(amax, fp8.FP8_MAX[fp8_dtype])
    want_scales = np.where(amax > 0, _ieee_div32(amax, fp8_max), np.float32(1.0))
    assert np.array_equal(scales.numpy(), want_scales)
    quotient = np.clip(_ieee_div32(groups, want_scales[:, None]), -fp8_max[0], fp8_max[0])
    want = _rne_fp8_bits(quotient.astype(np.float64), fp8_dtype).reshape(-1)
    assert np.array_equal(codes.view(torch.uint8).numpy(), want)
    # The inputs exercise what broke on CUDA: scales from a multiplication by the rounded reciprocal (what
    # torch on CUDA computes for `tensor / float`) move codes at near-ties.
    reciprocal_scales = (amax * np.float32(1.0 / fp8.FP8_MAX[fp8_dtype])).astype(np.float32)
    reciprocal_scales = np.where(amax > 0, reciprocal_scales, np.float32(1.0))
    moved = _rne_fp8_bits(np.clip(_ieee_div32(groups, reciprocal_scales[:, None]), -fp8_max[0], fp8_max[0])
                          .astype(np.float64), fp8_dtype).reshape(-1) != want
    assert moved.sum() > 0


def test_plain_reference_is_device_independent(device):
    """Runs on CUDA with MOEPLUG_TEST_DEVICE=cuda: the torch reference on the device, the torch reference
    on the CPU and the Triton kernel (compiled there; the interpreter covers it on CPU in
    triton_interpreter_cases.py) give the same scales and codes, on inputs where a reciprocal-scaled
    reference would not (test above)."""
    x = crafted_plain_inputs(torch.bfloat16)
    cpu_codes, cpu_scales = fp8.quantize_fp8_torch(x, 128)
    dev_codes, dev_scales = (t.cpu() for t in fp8.quantize_fp8_torch(x.to(device), 128))
    assert torch.equal(dev_scales, cpu_scales)
    assert torch.equal(dev_codes.view(torch.uint8), cpu_codes.view(torch.uint8))
