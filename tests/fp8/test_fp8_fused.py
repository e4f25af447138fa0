"""The fused C++ FP8AdamW step (kernels._fp8_cpu) against the torch reference path of FP8AdamW.

The reference (dequantise -> adamw_math -> quantise in torch ops, itself tested against torch's AdamW and
COAT's formulas) is the oracle. Both run the same fp32 arithmetic in the same order; they differ only in
the last bit of log2/exp2 (SLEEF in the extension, MKL/SLEEF inside torch). Measured on 1.2M values over
5 steps: a last-bit difference in an exponent such as log2|q|/k + log2(amax) - log2(448)/k (up to ~30 in
size) is a ~1e-6 relative difference in the moment it produces, so parameters agree to ~2e-6 of lr and
most bit for bit (99.5%); codes are equal in all but ~2e-6 of values (one E4M3 step apart); a group's
exponent k16 differs in ~1e-4 of groups, where log2(max/min) falls on a 1/16 boundary and the last bits
decide the floor.
"""

import warnings

import pytest
import torch

from kernels import _fp8_cpu
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
            # The moments agree to ~1e-6 relative (see the module docstring), so the updates (about lr in
            # size) do too: measured largest difference 3.0e-6 * lr.
            torch.testing.assert_close(p, q, rtol=0, atol=1e-5 * hyper["lr"])
            ours_state, ref_state = opt.state[p], ref_opt.state[q]
            assert ours_state["step"] == ref_state["step"] == step + 1
            for key in ("exp_avg", "exp_avg_sq"):
                assert ours_state[key].dtype == torch.float8_e4m3fn and ours_state[f"{key}_k16"].dtype == torch.uint8
                # Measured: largest relative difference 5.3e-6 (the moments differ by that much).
                torch.testing.assert_close(ours_state[f"{key}_amax"], ref_state[f"{key}_amax"], rtol=2e-5, atol=0)
                same_k = ours_state[f"{key}_k16"] == ref_state[f"{key}_k16"]
                assert same_k.float().mean() >= 0.995, key  # see the module docstring: floor boundaries
                diff = (_codes(ours_state[key]) - _codes(ref_state[key])).abs()
                n = diff.numel()
                in_same_k = diff[same_k.repeat_interleave(group_size)[:n]]
                assert in_same_k.max() <= 1 and (in_same_k > 0).float().mean() <= 1e-3, key


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
