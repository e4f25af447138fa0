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
value, e.g. -1). The maximal rank is ``R = a_table.shape[1] // cK``. :class:`PagedLoRA` keeps one layer's
tables (and packs adapters into this layout); :func:`add_lora` applies them in one call.
:class:`PagedExpertLoRA` holds a fused MoE experts projection's adapters as one ``PagedLoRA`` over
(adapter, expert) pairs; :func:`add_expert_lora` applies them (the same kernels on GPU).

Segments. Every op takes the batch's rows grouped by adapter as a :class:`LoRASegments`, built once per
step and passed to every layer's ops (vLLM's punica wrapper builds its metadata once per step the same
way); a ``row_adapter`` tensor is accepted too and grouped for that one call.

Inference only: these ops are not differentiable (the serving engine never needs gradients).
Each call runs the Triton kernel (``_lora_triton.py``) or the plain-torch implementation (``_lora_torch.py``),
as :mod:`kernels.backend` decides; callers never choose.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from . import _lora_torch, backend
from ._lora_experts import PagedExpertLoRA, add_expert_lora
from ._lora_segments import INT_TYPES, LoRASegments

__all__ = ["LoRASegments", "PagedExpertLoRA", "PagedLoRA", "add_expert_lora", "add_lora", "lora_expand", "lora_shrink"]


def lora_shrink(x, pool, a_table, ranks, segments) -> torch.Tensor:
    """``v[t, j] = Σ_k x[t, k] · A_a[j, k]`` for ``a`` = row t's adapter and ``j < ranks[a]``; 0 elsewhere.

    Args:
        x: ``[T, K]`` float rows.
        pool: ``[P, D]`` page pool, same dtype and device as ``x``.
        a_table: ``[num_adapters, R * ceil(K / D)]`` int32/int64 slot indices of each adapter's A.
        ranks: ``[num_adapters]`` int rank of each adapter (``1 <= rank <= R``).
        segments: the rows' adapters as :class:`LoRASegments`, or a ``row_adapter [T]`` int tensor; -1 means
            no adapter (its ``v`` row is all zero).

    Returns:
        ``v``: ``[T, R]`` of ``x``'s dtype; columns at or beyond a row's rank are zero.
    """
    _validate(x, pool, a_table, ranks, "a_table")
    segments = _segments(x, a_table, segments)
    if backend.use_triton(x.device):
        from . import _lora_triton

        return _lora_triton.shrink(x, pool, a_table, ranks, segments)
    return _lora_torch.shrink(x, pool, a_table, ranks, segments)


def lora_expand(y, v, pool, b_table, ranks, scales, segments) -> torch.Tensor:
    """``y[t, n] += scales[a] · Σ_{j < ranks[a]} v[t, j] · B_a[n, j]`` for ``a`` = row t's adapter, in place.

    Args:
        y: ``[T, N]`` float output rows, updated in place; rows with adapter -1 are left unchanged.
        v: ``[T, R]`` shrink result (same dtype as ``y``); columns at or beyond a row's rank are not read.
        pool: ``[P, D]`` page pool, same dtype and device as ``y``.
        b_table: ``[num_adapters, R * ceil(N / D)]`` int32/int64 slot indices of each adapter's Bᵀ.
        ranks: ``[num_adapters]`` int rank of each adapter.
        scales: ``[num_adapters]`` float scale of each adapter (``alpha / r``, or rsLoRA's ``alpha / √r``).
        segments: :class:`LoRASegments` or a ``row_adapter [T]`` int tensor (-1 for none), as in :func:`lora_shrink`.

    Returns:
        ``y`` itself.
    """
    _validate(y, pool, b_table, ranks, "b_table")
    segments = _segments(y, b_table, segments)
    rank_cols = b_table.shape[1] // math.ceil(y.shape[1] / pool.shape[1])
    if v.dim() != 2 or v.shape[0] != y.shape[0] or v.shape[1] < rank_cols or v.dtype != y.dtype:
        raise ValueError(
            f"v must be [T={y.shape[0]}, R>={rank_cols}] of dtype {y.dtype}, got {tuple(v.shape)} {v.dtype}"
        )
    if scales.shape != ranks.shape or not scales.is_floating_point():
        raise ValueError(f"scales must be a float tensor of shape {tuple(ranks.shape)}, got {tuple(scales.shape)}")
    if backend.use_triton(y.device):
        from . import _lora_triton

        return _lora_triton.expand(y, v, pool, b_table, ranks, scales, segments)
    return _lora_torch.expand(y, v, pool, b_table, ranks, scales, segments)


def add_lora(y: torch.Tensor, x: torch.Tensor, weights: PagedLoRA, segments: LoRASegments) -> torch.Tensor:
    """``y[t] += scale_a · (x[t] A_aᵀ) B_aᵀ`` for ``a`` = row t's adapter, in place: :func:`lora_shrink` then
    :func:`lora_expand` over one layer's :class:`PagedLoRA`. Checks shapes only (no tensor is read: the
    tables were checked when each adapter was set, the segments when they were built). Returns ``y``."""
    if x.dim() != 2 or y.dim() != 2 or x.shape[0] != y.shape[0] or x.shape[0] != segments.num_rows:
        raise ValueError(
            f"x [T, in] and y [T, out] must have the segments' T={segments.num_rows} rows, "
            f"got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    if (x.shape[1], y.shape[1]) != (weights.in_features, weights.out_features):
        raise ValueError(
            f"weights are for {weights.in_features} -> {weights.out_features}, got {x.shape[1]} -> {y.shape[1]}"
        )
    if segments.num_adapters > weights.capacity:
        raise ValueError(f"segments name {segments.num_adapters} adapters; the tables hold {weights.capacity}")
    if backend.use_triton(y.device):
        from . import _lora_triton

        v = _lora_triton.shrink(x, weights.pool, weights.a_table, weights.ranks, segments)
        return _lora_triton.expand(y, v, weights.pool, weights.b_table, weights.ranks, weights.scales, segments)
    return _lora_torch.add_lora(y, x, weights, segments)


def _segments(x, table, segments) -> LoRASegments:
    """``segments`` itself, checked against the batch and the table, or a ``row_adapter`` tensor grouped."""
    if isinstance(segments, LoRASegments):
        if segments.num_rows != x.shape[0] or segments.num_adapters > table.shape[0]:
            raise ValueError(
                f"segments of {segments.num_rows} rows and {segments.num_adapters} adapters do not fit "
                f"{x.shape[0]} rows and a table of {table.shape[0]} adapters"
            )
        return segments
    if segments.shape != (x.shape[0],) or segments.dtype not in INT_TYPES:
        raise ValueError(f"row_adapter must be int [{x.shape[0]}], got {tuple(segments.shape)} {segments.dtype}")
    return LoRASegments(segments, table.shape[0])


def _validate(x, pool, table, ranks, table_name: str) -> None:
    if x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"rows must be a 2-D float tensor [T, hidden], got {tuple(x.shape)} {x.dtype}")
    if pool.dim() != 2 or pool.dtype != x.dtype or pool.device != x.device:
        raise ValueError(
            f"pool must be [P, D] of {x.dtype} on {x.device}, got {tuple(pool.shape)} {pool.dtype} on {pool.device}"
        )
    chunks = math.ceil(x.shape[1] / pool.shape[1])
    if table.dim() != 2 or table.dtype not in INT_TYPES or table.shape[1] % chunks != 0:
        raise ValueError(
            f"{table_name} must be int32/int64 [num_adapters, max_rank * {chunks}] "
            f"(ceil({x.shape[1]} / D={pool.shape[1]}) slots per rank-row), got {tuple(table.shape)} {table.dtype}"
        )
    if ranks.shape != (table.shape[0],) or ranks.dtype not in INT_TYPES:
        raise ValueError(f"ranks must be int [{table.shape[0]}], got {tuple(ranks.shape)} {ranks.dtype}")
    # Value checks read the tensors, which would synchronise a GPU stream: CPU tensors only.
    max_rank = table.shape[1] // chunks
    if ranks.device.type == "cpu" and not bool(((ranks >= 0) & (ranks <= max_rank)).all()):
        raise ValueError(f"ranks must lie in [0, {max_rank}] (the table's max rank), got {ranks.tolist()}")


class PagedLoRA:
    """One linear layer's adapters in the page pool: the tables the kernels read, in the layout above.

    Row ``m`` of ``a_table`` / ``b_table`` lists the pool slots of the adapter set at index ``m`` (A's
    rank-rows, then Bᵀ's); an index never set, or cleared, has rank 0 and adds nothing. When an adapter is
    set, its A and Bᵀ are also resolved for the torch implementation: views of the pool when its slots are
    one ascending run (the usual case), else the slot lists to gather each step.
    """

    def __init__(self, pool: torch.Tensor, in_features: int, out_features: int, capacity: int):
        self.pool, self.in_features, self.out_features, self.capacity = pool, in_features, out_features, capacity
        width = pool.shape[1]
        self.chunks_in, self.chunks_out = math.ceil(in_features / width), math.ceil(out_features / width)
        device = pool.device
        self.a_table = torch.zeros(capacity, 0, dtype=torch.long, device=device)
        self.b_table = torch.zeros(capacity, 0, dtype=torch.long, device=device)
        self.ranks = torch.zeros(capacity, dtype=torch.long, device=device)
        self.scales = torch.zeros(capacity, dtype=pool.dtype, device=device)
        self.num_set = 0  # indices holding an adapter; 0 -> nothing to apply
        self._host: list[tuple[torch.Tensor, torch.Tensor, float] | None] = [None] * capacity

    def slots_needed(self, rank: int) -> int:
        """Pool slots for one adapter of ``rank`` (A rank-rows plus Bᵀ rank-rows)."""
        return rank * (self.chunks_in + self.chunks_out)

    def pack(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Lay out ``A [r, in]`` and ``B [out, r]`` as ``slots_needed(r)`` pool rows: A's chunks, then Bᵀ's."""
        width = self.pool.shape[1]
        a_rows = nn.functional.pad(a, (0, self.chunks_in * width - a.shape[1])).reshape(-1, width)
        b_rows = nn.functional.pad(b.t(), (0, self.chunks_out * width - b.shape[0])).reshape(-1, width)
        return torch.cat([a_rows, b_rows])

    def set_adapter(self, index: int, slots: torch.Tensor, rank: int, scale: float) -> None:
        """Point index ``index`` at ``slots`` (host int64, laid out by ``pack``) for an adapter of ``rank``."""
        in_pool = not slots.numel() or 0 <= int(slots.min()) <= int(slots.max()) < self.pool.shape[0]
        if slots.numel() != self.slots_needed(rank) or not in_pool:
            raise ValueError(
                f"an adapter of rank {rank} needs {self.slots_needed(rank)} slots in [0, {self.pool.shape[0]}), "
                f"got {slots.numel()}"
            )
        self._ensure_rank_capacity(rank)
        split = rank * self.chunks_in
        self.a_table[index, :split] = slots[:split].to(self.a_table.device)
        self.b_table[index, : rank * self.chunks_out] = slots[split:].to(self.b_table.device)
        self.ranks[index] = rank
        self.scales[index] = scale
        self.num_set += self._host[index] is None
        self._host[index] = (self._rows(slots[:split], rank), self._rows(slots[split:], rank), float(scale))

    def clear_adapter(self, index: int) -> None:
        """Forget index ``index``; its rank drops to 0 so stale slots are never read."""
        self.ranks[index] = 0
        self.scales[index] = 0.0
        self.num_set -= self._host[index] is not None
        self._host[index] = None

    def is_set(self, index: int) -> bool:
        """Whether an adapter is set at ``index`` (read on the host)."""
        return self._host[index] is not None

    def adapter_weights(self, index: int) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """The adapter at ``index`` as ``(A [r, in], Bᵀ [r, out], scale)`` (None: not set): pool views, or
        gathered from the pool when its slots are scattered."""
        host = self._host[index]
        if host is None:
            return None
        a, bt, scale = host
        return self._gathered(a, self.chunks_in)[:, : self.in_features], self._gathered(bt, self.chunks_out)[
            :, : self.out_features
        ], scale

    def _rows(self, slots: torch.Tensor, rank: int) -> torch.Tensor:
        """``[rank, chunks * D]`` view of the pool if ``slots`` is one ascending run, else the slots (pool's device)."""
        first = int(slots[0]) if slots.numel() else 0
        if torch.equal(slots, torch.arange(first, first + slots.numel(), dtype=slots.dtype, device=slots.device)):
            return self.pool.narrow(0, first, slots.numel()).view(rank, -1)
        return slots.to(self.pool.device)

    def _gathered(self, rows: torch.Tensor, chunks: int) -> torch.Tensor:
        """``rows`` itself if it is a pool view, else the rank-rows gathered from its slot indices."""
        if rows.is_floating_point():
            return rows
        return self.pool.index_select(0, rows).view(-1, chunks * self.pool.shape[1])

    def _ensure_rank_capacity(self, rank: int) -> None:
        # Tables are as wide as the largest rank seen, rounded up to a power of two so that a stream of
        # growing ranks reallocates only a few times.
        width = self.a_table.shape[1] // self.chunks_in
        if rank <= width:
            return
        new_width = 1 << (rank - 1).bit_length()
        self.a_table = nn.functional.pad(self.a_table, (0, (new_width - width) * self.chunks_in))
        self.b_table = nn.functional.pad(self.b_table, (0, (new_width - width) * self.chunks_out))
