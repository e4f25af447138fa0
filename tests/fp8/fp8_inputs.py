"""Inputs shared by the FP8 oracle tests (test_fp8_kernels.py) and the Triton cases they launch."""

import torch


def crafted_plain_inputs(dtype: torch.dtype, numel: int = 1 << 16) -> torch.Tensor:
    """Values that probe every rounding path of plain quantisation in groups of 128, representable in bf16:

    * groups led by 448 (scale exactly 1): every tie between neighbouring E4M3 values, subnormal ties
      included, both signs; values at and just below the max; the smallest normal and subnormal; ±0;
    * random groups spanning 6 decades with bf16's 8-bit mantissas, where ``x / amax`` often lands on or
      next to an E4M3 tie and the scale ``amax / 448`` is inexact: the cases where one ulp in the scale
      moves a code.
    """
    e4m3 = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    e4m3 = e4m3[e4m3.isfinite() & (e4m3 >= 0)].unique()
    ties = (e4m3[1:] + e4m3[:-1]) / 2  # exact midpoints: round-to-nearest-even decides each one
    edges = torch.tensor([448.0, 447.0, 440.0, 432.0, 416.0, 2.0**-6, 2.0**-9, 2.0**-10, 1.5 * 2.0**-9, 0.0, -0.0])
    special = torch.cat([ties, -ties, edges])
    groups = [torch.cat([torch.tensor([448.0]), chunk]) for chunk in special.split(127)]
    groups = [torch.cat([g, g.new_zeros(128 - g.numel())]) for g in groups]
    head = torch.cat(groups)
    gen = torch.Generator().manual_seed(3)
    count = numel - head.numel()
    rest = torch.randn(count, generator=gen) * torch.logspace(-3, 3, count)
    return torch.cat([head, rest.bfloat16().float()]).to(dtype)
