"""Shared-basis LoRA (Compress-then-Serve): many adapters as one basis pair plus a small core per adapter.

Adapter ``a`` of a group updates a linear by ``ΔW_a = U Σ_a V^T`` (``U [out, c]``, ``V [in, c]`` shared by
the group, ``Σ_a [c, c]`` its own), so for a batch whose rows use different adapters of the group

    y[t] += ((x[t] V) Σ_{a_t}^T) U^T

is one GEMM down to rank ``c`` for all rows, one ``[1, c] x [c, c]`` product per row (batched), and one
GEMM back up: the cost of serving one adapter of rank ``c``, however many adapters the rows use.

Plain torch ops, so the same code runs on CPU and GPU (cuBLAS GEMMs and a batched GEMM); no row is
gathered or sorted. Inference only.
"""

from __future__ import annotations

import torch

__all__ = ["add_shared_lora"]


def add_shared_lora(y: torch.Tensor, x: torch.Tensor, v: torch.Tensor, ut: torch.Tensor, cores: torch.Tensor,
                    mask: torch.Tensor | None = None) -> torch.Tensor:
    """``y[t] += ((x[t] v) cores[t]^T) ut`` in place for every row ``t`` (where ``mask[t]``); returns ``y``.

    Args:
        y: ``[T, out]`` float rows, updated in place.
        x: ``[T, in]`` float rows (same dtype as ``y``).
        v: ``[in, c]`` the group's down basis ``V``.
        ut: ``[c, out]`` the group's up basis transposed, ``U^T``.
        cores: ``[T, c, c]`` each row's core ``Σ`` (any value on rows outside ``mask``, even non-finite).
        mask: ``[T]`` bool, the rows of this group (None: all rows). Other rows are left unchanged.
    """
    t, c = x.shape[0], v.shape[1]
    if x.dim() != 2 or y.dim() != 2 or y.shape[0] != t or v.shape[0] != x.shape[1] or ut.shape != (c, y.shape[1]):
        raise ValueError(f"x [T, in] {tuple(x.shape)}, y [T, out] {tuple(y.shape)}, v [in, c] {tuple(v.shape)} and "
                         f"ut [c, out] {tuple(ut.shape)} do not fit together")
    if cores.shape != (t, c, c):
        raise ValueError(f"cores must be [T={t}, c={c}, c={c}], got {tuple(cores.shape)}")
    if mask is not None and (mask.shape != (t,) or mask.dtype != torch.bool):
        raise ValueError(f"mask must be bool [{t}], got {tuple(mask.shape)} {mask.dtype}")
    w = torch.bmm((x @ v).unsqueeze(1), cores.transpose(1, 2)).squeeze(1)  # [T, c]
    if mask is not None:  # where, not a product: a masked row's core may hold stale pool values
        w = torch.where(mask.unsqueeze(1), w, 0)
    return y.addmm_(w, ut)
