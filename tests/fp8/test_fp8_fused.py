"""The fused C++ FP8AdamW step (kernels._fp8_cpu) against the torch reference path of FP8AdamW.

The reference (dequantise -> adamw_math -> quantise in torch ops, itself tested against torch's AdamW and
COAT's formulas) is the oracle. The fused step replaces the reference's per-value log2/exp2 with decode
tables (exp2 polynomial, relative error < 1.7e-7, per group) and a log2 polynomial (absolute error < 4.5e-6)
for the encode; the bounds below follow from those (see the header of kernels/_fp8_cpu.cpp):

* decoded moments differ by a few 1e-7 relative (polynomial error plus the fp32 rounding of exponents up to
  ~30 in size), so the updates, about lr in size, agree to ~1e-5 * lr, and each group's amax (the largest
  updated moment) to ~1e-6 relative of the group's old amax: we allow 2e-5 relative;
* the encode exponent y = k*log2|x| + offset differs by at most 16 * 4.5e-6 plus the moment's own relative
  difference times k, far below the 0.096 that separates neighbouring E4M3 codes in y, so where k16 agrees a
  code differs by at most one step, as long as the moment is not dominated by cancellation (lerp of a decoded
  moment and a gradient of opposite sign: there the absolute error of the decoded moment, ~1e-6 * amax,
  can flip a near-zero result's sign); we check every code whose reference moment is >= 1e-3 * amax, where
  the relative error stays below 1e-3 (y error < 0.016);
* k16 = floor(16 * range / log2(max/min)) differs, by one, only where that quotient lies within ~1e-5 of an
  integer: measured ~1e-4 of groups over 1.2M values; we allow 0.5%.
"""

import warnings

import pytest
import torch

from kernels import _fp8_cpu
from kernels.fp8 import dequantize_fp8_expanded
from moeplug.fp8 import FP8AdamW

pytestmark = pytest.mark.skipif(_fp8_cpu.load_extension() is None, reason="no C++ compiler for the extension")

# A partial last group, an exact multiple of the group size, one big enough for several threads' chunks.
SHAPES = [(129, 67), (4096,), (300, 333)]


def _pair(group_size: int, **hyper):
    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(s) * 0.1) for s in SHAPES]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opts = (FP8AdamW(ours, fused=True, group_size=group_size, **hyper),
            FP8AdamW(ref, fused=False, group_size=group_size, **hyper))
    return ours, ref, opts


def _codes(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8).reshape(-1).to(torch.int16)


@pytest.mark.parametrize("group_size", [16, 128])
def test_one_step_from_the_same_state_matches_the_reference(group_size):
    hyper = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05)
    ours, ref, (opt, ref_opt) = _pair(group_size, **hyper)
    gen = torch.Generator().manual_seed(1)
    for step in range(4):
        for p, q in zip(ours, ref):
            # Gradients over several decades so groups span wide ranges (small k) and narrow ones (big k).
            q.grad = torch.randn(p.shape, generator=gen) * torch.rand(p.shape, generator=gen).pow(6)
            p.grad = q.grad.clone()
            if step:  # start each step from the reference's state, so one step is compared
                opt.state[p] = {k: v.clone() for k, v in ref_opt.state[q].items()}
                with torch.no_grad():
                    p.copy_(q)
        opt.step()
        ref_opt.step()
        for p, q in zip(ours, ref):
            # The moments agree to a few 1e-7 relative (see the module docstring), so the updates (about lr
            # in size) do too: measured largest difference 6e-6 * lr.
            torch.testing.assert_close(p, q, rtol=0, atol=1e-5 * hyper["lr"])
            ours_state, ref_state = opt.state[p], ref_opt.state[q]
            assert ours_state["step"] == ref_state["step"] == step + 1
            for key in ("exp_avg", "exp_avg_sq"):
                assert ours_state[key].dtype == torch.float8_e4m3fn and ours_state[f"{key}_k16"].dtype == torch.uint8
                # Measured: largest relative difference 4.1e-6 (see the module docstring).
                torch.testing.assert_close(ours_state[f"{key}_amax"], ref_state[f"{key}_amax"], rtol=2e-5, atol=0)
                k_diff = ours_state[f"{key}_k16"].int() - ref_state[f"{key}_k16"].int()
                assert k_diff.abs().max() <= 1 and (k_diff == 0).float().mean() >= 0.995, key  # floor boundaries
                diff = (_codes(ours_state[key]) - _codes(ref_state[key])).abs()
                n = diff.numel()
                ref_moment = dequantize_fp8_expanded(ref_state[key], ref_state[f"{key}_amax"],
                                                     ref_state[f"{key}_k16"], group_size).reshape(-1)
                amax = ref_state[f"{key}_amax"].repeat_interleave(group_size)[:n]
                checked = (k_diff == 0).repeat_interleave(group_size)[:n] & (ref_moment.abs() >= 1e-3 * amax)
                assert diff[checked].max() <= 1 and (diff[checked] > 0).float().mean() <= 1e-3, key


def test_training_matches_the_reference_path_and_resumes_bit_exactly(tmp_path):
    """A model trained with the fused step follows the reference path's losses (errors do not compound
    beyond quantisation noise), and a save -> load -> resume is bit for bit."""
    def run(fused, steps, model=None, opt=None):
        torch.manual_seed(3)
        model = model or torch.nn.Sequential(torch.nn.Linear(96, 160), torch.nn.Tanh(), torch.nn.Linear(160, 96))
        opt = opt or FP8AdamW(model.parameters(), lr=3e-3, fused=fused)
        gen = torch.Generator().manual_seed(len(opt.state))
        losses = []
        for _ in range(steps):
            x = torch.randn(32, 96, generator=gen)
            loss = (model(x) - x.flip(1)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return model, opt, losses

    _, _, fused_losses = run(True, 40)
    _, _, ref_losses = run(False, 40)
    assert fused_losses[-1] < 0.8 * fused_losses[0]  # it trains
    # Measured: largest relative difference 2.6e-4 over the 40 steps (a flipped code now and then).
    torch.testing.assert_close(torch.tensor(fused_losses), torch.tensor(ref_losses), rtol=1e-3, atol=0)

    model, opt, _ = run(True, 5)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
    saved = torch.load(tmp_path / "ckpt.pt")
    restored, restored_opt, _ = run(True, 0)
    restored.load_state_dict(saved["model"])
    restored_opt.load_state_dict(saved["opt"])
    _, _, after = run(True, 5, model, opt)
    _, _, restored_after = run(True, 5, restored, restored_opt)
    assert after == restored_after


def test_bad_fused_argument_and_unbuildable_extension(monkeypatch):
    with pytest.raises(ValueError, match="fused='yes'"):
        FP8AdamW([torch.nn.Parameter(torch.ones(3))], fused="yes")

    def broken_load(*args, **kwargs):
        raise OSError("no compiler")

    monkeypatch.setattr("torch.utils.cpp_extension.load", broken_load)
    _fp8_cpu.load_extension.cache_clear()
    try:
        param = torch.nn.Parameter(torch.randn(4096))
        param.grad = torch.randn(4096)
        with pytest.warns(RuntimeWarning, match="no compiler"):
            FP8AdamW([param]).step()  # fused=None falls back to the torch path
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # warned once only
            FP8AdamW([param]).step()
        with pytest.raises(RuntimeError, match="could not be built"):
            FP8AdamW([param], fused=True).step()
    finally:
        _fp8_cpu.load_extension.cache_clear()
