"""Shared-basis LoRA (Compress-then-Serve): many adapters as shared bases plus a small core per adapter.

Adapter ``a`` in group ``g`` updates a linear by ``ΔW_a = U_g Σ_a V_g^T`` (``U_g [out, c]``, ``V_g [in, c]``
shared by the group, ``Σ_a [c, c]`` its own). The groups of a collection sit side by side as blocks of
``V = [V_1 ... V_K]`` (``[in, K c]``) and ``U^T = [U_1 ... U_K]^T`` (``[K c, out]``), so for a batch whose rows
use any adapters of any groups

    y[t] += ((x[t] V)[block g_t] Σ_{a_t}^T) U^T[block g_t]

is one GEMM down to ``K c`` for all rows, one ``[1, c] x [c, c]`` product per row (batched), and one GEMM
back up (``add_shared_lora``): the cost of one adapter of rank ``K c``, however many adapters the rows use.
When rows come in long runs per adapter (prefill), ``add_shared_lora_runs`` does three rank-``c`` GEMMs
per run instead, which costs ``K`` times fewer FLOPs than the block GEMMs.

Plain torch ops, so the same code runs on CPU and GPU (GEMMs and a batched GEMM); inference only.
"""

from __future__ import annotations

import torch

__all__ = ["add_shared_lora", "add_shared_lora_runs"]


def _check(y, x, v, ut) -> None:
    if x.dim() != 2 or y.dim() != 2 or y.shape[0] != x.shape[0] or v.shape[0] != x.shape[1] or ut.shape != (v.shape[1], y.shape[1]):
        raise ValueError(f"x [T, in] {tuple(x.shape)}, y [T, out] {tuple(y.shape)}, v [in, K c] {tuple(v.shape)} and "
                         f"ut [K c, out] {tuple(ut.shape)} do not fit together")


def add_shared_lora(y: torch.Tensor, x: torch.Tensor, v: torch.Tensor, ut: torch.Tensor, cores: torch.Tensor,
                    blocks: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``y[t] += ((x[t] v)[blocks[t]] cores[t]^T) ut[blocks[t]]`` in place for every row with ``mask[t]``.

    Args:
        y: ``[T, out]`` float rows, updated in place; rows outside ``mask`` are left unchanged.
        x: ``[T, in]`` float rows (same dtype as ``y``).
        v: ``[in, K c]`` the groups' down bases side by side; ``ut``: ``[K c, out]`` their up bases transposed.
        cores: ``[T, c, c]`` each row's core (any value, even non-finite, on rows outside ``mask``).
        blocks: ``[T]`` int64, each row's group (block) in ``[0, K)`` (any value in range outside ``mask``).
        mask: ``[T]`` bool, the rows that use one of these adapters.

    Returns:
        ``y``.
    """
    _check(y, x, v, ut)
    t, c = x.shape[0], cores.shape[-1]
    if cores.shape != (t, c, c) or v.shape[1] % c:
        raise ValueError(f"cores must be [T={t}, c, c] with c dividing K c={v.shape[1]}, got {tuple(cores.shape)}")
    if blocks.shape != (t,) or mask.shape != (t,) or mask.dtype != torch.bool:
        raise ValueError(f"blocks and mask must be [{t}] (int64, bool), got {tuple(blocks.shape)} and {tuple(mask.shape)}")
    k = v.shape[1] // c
    index = blocks.view(t, 1, 1).expand(t, 1, c)
    z = (x @ v).view(t, k, c).gather(1, index)  # [T, 1, c]: each row's own block
    w = torch.bmm(z, cores.transpose(1, 2))
    w = torch.where(mask.view(t, 1, 1), w, 0)  # where, not a product: a masked row's core may be stale
    return y.addmm_(w.new_zeros(t, k, c).scatter_(1, index, w).view(t, k * c), ut)


def add_shared_lora_runs(y: torch.Tensor, x: torch.Tensor, v: torch.Tensor, ut: torch.Tensor,
                         runs: list[tuple[int, int, int, torch.Tensor]]) -> torch.Tensor:
    """``y[s:e] += ((x[s:e] v_b) core^T) ut_b`` in place for each run ``(s, e, b, core [c, c])``, where ``v_b``,
    ``ut_b`` are block ``b`` of ``v [in, K c]`` and ``ut [K c, out]`` (as in :func:`add_shared_lora`). Returns ``y``."""
    _check(y, x, v, ut)
    for start, stop, block, core in runs:
        c = core.shape[0]
        if core.shape != (c, c) or not 0 <= block < v.shape[1] // c or not 0 <= start <= stop <= x.shape[0]:
            raise ValueError(f"run ({start}, {stop}, block {block}, core {tuple(core.shape)}) does not fit "
                             f"{x.shape[0]} rows and {v.shape[1] // max(c, 1)} blocks")
        cols = slice(block * c, (block + 1) * c)
        y[start:stop].addmm_((x[start:stop] @ v[:, cols]) @ core.t(), ut[cols])
    return y
