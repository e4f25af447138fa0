"""The plain-torch implementation of :mod:`kernels.lora`'s ops: one GEMM per adapter segment.

Each op walks the batch's :class:`~kernels.lora.LoRASegments` (built once per step) on the host. When the
rows are packed by adapter (a serving engine packs them so), a segment's rows are a slice: each adapter
costs one ``x @ Aᵀ`` and one ``addmm_`` into ``y``, with no row gather or scatter. ``add_lora`` reads each
adapter's A and Bᵀ as :class:`~kernels.lora.PagedLoRA` resolved them when the adapter was set (pool views,
or slot lists to gather), so a step reads no page table; ``shrink`` / ``expand`` gather from the tables.
A sorted, gathered version of the same GEMMs plus table reads and value checks for every adapter of every
layer every step was ~20 small ops each, which dominated decode on CPU.
"""

from __future__ import annotations

import math

import torch


def paged_rows(pool, table, adapter: int, rank: int, width: int, table_name: str) -> torch.Tensor:
    """Adapter ``adapter``'s first ``rank`` rank-rows of length ``width`` gathered from the pool: ``[rank, width]``."""
    chunks = math.ceil(width / pool.shape[1])
    slots = table[adapter, : rank * chunks].long()
    if rank and (int(slots.min()) < 0 or int(slots.max()) >= pool.shape[0]):
        raise ValueError(
            f"{table_name}[{adapter}] names slots outside the pool [0, {pool.shape[0]}) within its rank {rank}: "
            f"{slots.tolist()}"
        )
    return pool.index_select(0, slots).reshape(rank, chunks * pool.shape[1])[:, :width]


def _add_rows(y, rows, delta) -> None:
    """``y[rows] += delta``: in place on a slice, an accumulating scatter for index rows (distinct within a
    segment; index_put_ measured steadier than index_add_ on busy CPUs)."""
    if isinstance(rows, slice):
        y[rows].add_(delta)
    else:
        y.index_put_((rows,), delta, accumulate=True)


def shrink(x, pool, a_table, ranks, segments) -> torch.Tensor:
    """Torch :func:`kernels.lora.lora_shrink` (no validation): one gather and one GEMM per adapter segment."""
    rank_cols = a_table.shape[1] // math.ceil(x.shape[1] / pool.shape[1])
    v = x.new_zeros(x.shape[0], rank_cols)
    rank_list = ranks.tolist()
    for adapter, start, stop in segments.runs:
        rank = rank_list[adapter]
        rows = segments.rows(start, stop)
        lora_a = paged_rows(pool, a_table, adapter, rank, x.shape[1], "a_table")
        v[rows, :rank] = x[rows] @ lora_a.t()
    return v


def expand(y, v, pool, b_table, ranks, scales, segments) -> torch.Tensor:
    """Torch :func:`kernels.lora.lora_expand` (no validation): one gather and one GEMM per adapter segment."""
    rank_list, scale_list = ranks.tolist(), scales.tolist()
    for adapter, start, stop in segments.runs:
        rank = rank_list[adapter]
        rows = segments.rows(start, stop)
        lora_bt = paged_rows(pool, b_table, adapter, rank, y.shape[1], "b_table")
        _add_rows(y, rows, (v[rows, :rank] @ lora_bt).mul_(scale_list[adapter]))
    return y


def add_lora(y, x, weights, segments) -> torch.Tensor:
    """Torch :func:`kernels.lora.add_lora`: per segment ``y[rows] += scale · (x[rows] Aᵀ) Bᵀ``, in place."""
    for adapter, start, stop in segments.runs:
        resolved = weights.adapter_weights(adapter)
        if resolved is None:  # this adapter does not adapt this layer
            continue
        lora_a, lora_bt, scale = resolved
        rows = segments.rows(start, stop)
        if isinstance(rows, slice):
            y[rows].addmm_(x[rows] @ lora_a.t(), lora_bt, alpha=scale)
        else:
            _add_rows(y, rows, (x[rows] @ lora_a.t() @ lora_bt).mul_(scale))
    return y
