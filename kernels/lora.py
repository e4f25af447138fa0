"""Batched multi-LoRA (SGMV semantics) reading adapter weights from a paged pool (S-LoRA unified paging).

One call applies many adapters of different ranks to one mixed batch: each row names its adapter (or -1 for
the base model), and each adapter does only its own rank's work. ``y += scale · (x Aᵀ) Bᵀ`` is split, as in
Punica, into :func:`lora_shrink` (``v = x Aᵀ``, down to rank) and :func:`lora_expand` (``y += scale · v Bᵀ``).

Paged layout. ``pool`` is ``[P, D]``; each row ("slot") holds one D-wide vector. For adapter a:

* PEFT ``lora_A.weight`` is ``[r_a, K]``. Its rank-row j (a K-vector) spans ``cK = ceil(K / D)`` slots:
  elements ``c*D .. min(K, (c+1)*D) - 1`` live in slot ``a_table[a, j*cK + c]``.
* PEFT ``lora_B.weight`` is ``[N, r_a]``. Rank-row j of its transpose (an N-vector) spans ``cN = ceil(N / D)``
  slots ``b_table[a, j*cN + c]``.

Tables are int32/int64 ``[num_adapters, max_rank * c]``; entries past an adapter's rank are ignored (any
value, e.g. -1). The maximal rank is ``R = a_table.shape[1] // cK``.

Inference only: these ops are not differentiable (the serving engine never needs gradients).
Each call runs the Triton kernel or the plain-torch reference, as :mod:`kernels.backend` decides.
"""

import math

import torch

from . import backend


def lora_shrink(x, pool, a_table, ranks, row_adapter) -> torch.Tensor:
    """``v[t, j] = Σ_k x[t, k] · A_a[j, k]`` for ``a = row_adapter[t]`` and ``j < ranks[a]``; 0 elsewhere.

    Args:
        x: ``[T, K]`` float rows.
        pool: ``[P, D]`` page pool, same dtype and device as ``x``.
        a_table: ``[num_adapters, R * ceil(K / D)]`` int32/int64 slot indices of each adapter's A.
        ranks: ``[num_adapters]`` int rank of each adapter (``1 <= rank <= R``).
        row_adapter: ``[T]`` int adapter of each row; -1 means no adapter (its ``v`` row is all zero).

    Returns:
        ``v``: ``[T, R]`` of ``x``'s dtype; columns at or beyond a row's rank are zero.
    """
    _validate(x, pool, a_table, ranks, row_adapter, "a_table")
    if backend.use_triton(x.device):
        from . import _lora_triton

        return _lora_triton.shrink(x, pool, a_table, ranks, row_adapter)
    return reference_shrink(x, pool, a_table, ranks, row_adapter)


def lora_expand(y, v, pool, b_table, ranks, scales, row_adapter) -> torch.Tensor:
    """``y[t, n] += scales[a] · Σ_{j < ranks[a]} v[t, j] · B_a[n, j]`` for ``a = row_adapter[t]``, in place.

    Args:
        y: ``[T, N]`` float output rows, updated in place; rows with adapter -1 are left unchanged.
        v: ``[T, R]`` shrink result (same dtype as ``y``); columns at or beyond a row's rank are not read.
        pool: ``[P, D]`` page pool, same dtype and device as ``y``.
        b_table: ``[num_adapters, R * ceil(N / D)]`` int32/int64 slot indices of each adapter's Bᵀ.
        ranks: ``[num_adapters]`` int rank of each adapter.
        scales: ``[num_adapters]`` float scale of each adapter (``alpha / r``, or rsLoRA's ``alpha / √r``).
        row_adapter: ``[T]`` int adapter of each row, -1 for none.

    Returns:
        ``y`` itself.
    """
    _validate(y, pool, b_table, ranks, row_adapter, "b_table")
    rank_cols = b_table.shape[1] // math.ceil(y.shape[1] / pool.shape[1])
    if v.dim() != 2 or v.shape[0] != y.shape[0] or v.shape[1] < rank_cols or v.dtype != y.dtype:
        raise ValueError(
            f"v must be [T={y.shape[0]}, R>={rank_cols}] of dtype {y.dtype}, got {tuple(v.shape)} {v.dtype}"
        )
    if scales.shape != ranks.shape or not scales.is_floating_point():
        raise ValueError(f"scales must be a float tensor of shape {tuple(ranks.shape)}, got {tuple(scales.shape)}")
    if backend.use_triton(y.device):
        from . import _lora_triton

        return _lora_triton.expand(y, v, pool, b_table, ranks, scales, row_adapter)
    return reference_expand(y, v, pool, b_table, ranks, scales, row_adapter)


def _validate(x, pool, table, ranks, row_adapter, table_name: str) -> None:
    if x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"rows must be a 2-D float tensor [T, hidden], got {tuple(x.shape)} {x.dtype}")
    if pool.dim() != 2 or pool.dtype != x.dtype or pool.device != x.device:
        raise ValueError(
            f"pool must be [P, D] of {x.dtype} on {x.device}, got {tuple(pool.shape)} {pool.dtype} on {pool.device}"
        )
    chunks = math.ceil(x.shape[1] / pool.shape[1])
    int_types = (torch.int32, torch.int64)
    if table.dim() != 2 or table.dtype not in int_types or table.shape[1] % chunks != 0:
        raise ValueError(
            f"{table_name} must be int32/int64 [num_adapters, max_rank * {chunks}] "
            f"(ceil({x.shape[1]} / D={pool.shape[1]}) slots per rank-row), got {tuple(table.shape)} {table.dtype}"
        )
    if ranks.shape != (table.shape[0],) or ranks.dtype not in int_types:
        raise ValueError(f"ranks must be int [{table.shape[0]}], got {tuple(ranks.shape)} {ranks.dtype}")
    if row_adapter.shape != (x.shape[0],) or row_adapter.dtype not in int_types:
        raise ValueError(
            f"row_adapter must be int [{x.shape[0]}], got {tuple(row_adapter.shape)} {row_adapter.dtype}"
        )
    # Value checks read the tensors, which would synchronise a GPU stream: CPU tensors only.
    max_rank = table.shape[1] // chunks
    if ranks.device.type == "cpu" and not bool(((ranks >= 0) & (ranks <= max_rank)).all()):
        raise ValueError(f"ranks must lie in [0, {max_rank}] (the table's max rank), got {ranks.tolist()}")
    if row_adapter.device.type == "cpu" and row_adapter.numel():
        lo, hi = int(row_adapter.min()), int(row_adapter.max())
        if lo < -1 or hi >= table.shape[0]:
            raise ValueError(f"row_adapter values must lie in [-1, {table.shape[0] - 1}], got min {lo} max {hi}")


# ---------------------------------------------------------------------------------------------- reference
def _adapter_segments(row_adapter: torch.Tensor):
    """Yield ``(adapter, rows)`` for every adapter present (not -1), ``rows`` an index tensor; one sort."""
    sorted_ids, order = torch.sort(row_adapter, stable=True)
    ids, counts = torch.unique_consecutive(sorted_ids, return_counts=True)
    for a, rows in zip(ids.tolist(), order.split(counts.tolist())):
        if a >= 0:
            yield a, rows


def _paged_rows(pool, table, adapter: int, rank: int, width: int, table_name: str) -> torch.Tensor:
    """Adapter ``adapter``'s first ``rank`` rank-rows of length ``width`` gathered from the pool: ``[rank, width]``."""
    chunks = math.ceil(width / pool.shape[1])
    slots = table[adapter, : rank * chunks].long()
    if rank and (int(slots.min()) < 0 or int(slots.max()) >= pool.shape[0]):
        raise ValueError(
            f"{table_name}[{adapter}] names slots outside the pool [0, {pool.shape[0]}) within its rank {rank}: "
            f"{slots.tolist()}"
        )
    return pool.index_select(0, slots).reshape(rank, chunks * pool.shape[1])[:, :width]


def reference_shrink(x, pool, a_table, ranks, row_adapter) -> torch.Tensor:
    """Plain-torch :func:`lora_shrink` (no validation): one gather and one GEMM per adapter in the batch."""
    rank_cols = a_table.shape[1] // math.ceil(x.shape[1] / pool.shape[1])
    v = x.new_zeros(x.shape[0], rank_cols)
    rank_list = ranks.tolist()
    for a, rows in _adapter_segments(row_adapter):
        r = rank_list[a]
        lora_a = _paged_rows(pool, a_table, a, r, x.shape[1], "a_table")
        v[rows, :r] = x.index_select(0, rows) @ lora_a.t()
    return v


def reference_expand(y, v, pool, b_table, ranks, scales, row_adapter) -> torch.Tensor:
    """Plain-torch :func:`lora_expand` (no validation): one gather and one GEMM per adapter in the batch."""
    rank_list, scale_list = ranks.tolist(), scales.tolist()
    for a, rows in _adapter_segments(row_adapter):
        r = rank_list[a]
        lora_bt = _paged_rows(pool, b_table, a, r, y.shape[1], "b_table")
        delta = (v.index_select(0, rows)[:, :r] @ lora_bt).mul_(scale_list[a])
        # Rows are distinct within a segment; index_put_ measured steadier than index_add_ on busy CPUs.
        y.index_put_((rows,), delta, accumulate=True)
    return y
