"""LoRA on fused MoE expert projections: one ``PagedLoRA`` over (adapter, expert) pairs.

Public through :mod:`kernels.lora`. An adapter that puts LoRA on a fused experts parameter (PEFT's
``target_parameters=["mlp.experts.gate_up_proj", ...]``) has one ``A_e [r, in]`` / ``B_e [out, r]`` pair per
expert ``e``, all of one rank. Serving it in a mixed batch means: every (token, chosen expert) row adds its
row's adapter's expert-e LoRA. That is exactly SGMV over *virtual adapters* ``m * E + e`` (m: the adapter's
page-table index, E: the number of experts), so the existing shrink/expand kernels apply it unchanged:
:meth:`PagedExpertLoRA.segments` groups a step's (row, expert) pairs by (adapter, expert), and
:func:`kernels.lora.add_lora` does one grouped shrink and one grouped expand over all of them, each pair
doing its own rank's work, the adapter weights read from the paged pool (any rank, no ``W + ΔW``).

:func:`add_expert_lora` is the op a serving layer calls. On GPU it is that Triton shrink/expand. The torch
implementation groups the pairs by adapter only and does each adapter's pairs at once over ``[E, r, in]``
views of the pool (batched matmuls of gathered factors, or one grouped GEMM per factor for many rows),
because one small GEMM per (adapter, expert) pair (the per-segment torch path of ``add_lora``) cost ~150 µs
of host time each: 75% of a Qwen3-MoE (E32/k4) decode step with 10 adapters.
"""

from __future__ import annotations

import itertools

import torch

from . import backend
from ._lora_segments import LoRASegments
from .grouped_gemm import grouped_mm


class PagedExpertLoRA:
    """One fused experts projection's adapters in the page pool (the ``PagedLoRA`` protocol, per expert).

    The adapter at table index ``m`` owns entries ``m * E .. m * E + E - 1`` of ``self.paged`` (a
    :class:`kernels.lora.PagedLoRA` of capacity ``capacity * E``), one per expert. An adapter's slots are laid
    out expert by expert, each expert's part as ``PagedLoRA.pack`` lays out one linear.

    Args:
        paged: a ``PagedLoRA`` of capacity ``capacity * num_experts`` over the projection's in/out features.
        num_experts: E, the experts of the fused parameter.
    """

    def __init__(self, paged, num_experts: int):
        if num_experts <= 0 or paged.capacity % num_experts:
            raise ValueError(f"a PagedLoRA of capacity {paged.capacity} cannot hold {num_experts} experts per adapter")
        self.paged = paged
        self.num_experts = num_experts
        self.capacity = paged.capacity // num_experts
        self.in_features, self.out_features = paged.in_features, paged.out_features
        # Per adapter index: (its slots as a [E, per-expert slots, D] pool view, or the slot list to gather
        # when they are scattered; rank; scale), for the torch implementation.
        self._host: list[tuple[torch.Tensor, int, float] | None] = [None] * self.capacity

    @property
    def num_set(self) -> int:
        """Adapter indices holding an adapter (0: nothing to apply)."""
        return self.paged.num_set // self.num_experts

    def slots_needed(self, rank: int) -> int:
        """Pool slots for one adapter of ``rank`` on every expert."""
        return self.num_experts * self.paged.slots_needed(rank)

    def pack(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Lay out ``A [E, r, in]`` and ``B [E, out, r]`` as ``slots_needed(r)`` pool rows, expert by expert."""
        e, rank = self.num_experts, a.shape[-2] if a.dim() == 3 else -1
        expected_a, expected_b = (e, rank, self.in_features), (e, self.out_features, rank)
        if a.dim() != 3 or tuple(a.shape) != expected_a or tuple(b.shape) != expected_b:
            raise ValueError(
                f"expert LoRA needs A {expected_a} and B {expected_b} (experts, ...), got {tuple(a.shape)} and "
                f"{tuple(b.shape)}"
            )
        return torch.cat([self.paged.pack(a[i], b[i]) for i in range(e)])

    def set_adapter(self, index: int, slots: torch.Tensor, rank: int, scale: float) -> None:
        """Point adapter index ``index`` at ``slots`` (host int64, laid out by ``pack``) for ``rank``."""
        if slots.numel() != self.slots_needed(rank):
            raise ValueError(
                f"an expert adapter of rank {rank} needs {self.slots_needed(rank)} slots, got {slots.numel()}"
            )
        per_expert = self.paged.slots_needed(rank)
        for expert in range(self.num_experts):
            part = slots[expert * per_expert : (expert + 1) * per_expert]
            self.paged.set_adapter(index * self.num_experts + expert, part, rank, scale)
        pool = self.paged.pool
        first = int(slots[0]) if slots.numel() else 0
        if torch.equal(slots, torch.arange(first, first + slots.numel(), dtype=slots.dtype)):
            block = pool.narrow(0, first, slots.numel()).view(self.num_experts, per_expert, pool.shape[1])
        else:
            block = slots.to(pool.device)
        self._host[index] = (block, rank, float(scale))

    def clear_adapter(self, index: int) -> None:
        """Forget adapter index ``index`` on every expert."""
        for expert in range(self.num_experts):
            self.paged.clear_adapter(index * self.num_experts + expert)
        self._host[index] = None

    def expert_weights(self, index: int) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """The adapter at ``index`` as ``(A [E, r, in], Bᵀ [E, r, out], scale)`` (None: not set): views of the
        pool when its slots are one ascending run (the usual case), else gathered from them."""
        if self._host[index] is None:
            return None
        block, rank, scale = self._host[index]
        pool, e = self.paged.pool, self.num_experts
        if not block.is_floating_point():
            block = pool.index_select(0, block).view(e, -1, pool.shape[1])
        split = rank * self.paged.chunks_in
        a = block[:, :split].reshape(e, rank, -1)[:, :, : self.in_features]
        bt = block[:, split:].reshape(e, rank, -1)[:, :, : self.out_features]
        return a, bt, scale

    def is_set(self, index: int) -> bool:
        """Whether an adapter is set at ``index``."""
        return self.paged.is_set(index * self.num_experts)

    def segments(
        self, row_adapter: torch.Tensor, row_expert: torch.Tensor, adapters: int | None = None
    ) -> LoRASegments:
        """The (row, expert) pairs grouped by (adapter, expert), for :func:`add_expert_lora`.

        Args:
            row_adapter: ``[S]`` int, the adapter table index of each pair's row (-1: base model, adds nothing).
            row_expert: ``[S]`` int, each pair's expert in ``[0, E)``.
            adapters: a bound on the adapter indices used (``row_adapter < adapters``), default ``capacity``:
                the Triton kernels scan ``adapters * E + 1`` segment ends per program, so a step that knows
                it uses indices 0-9 of 64 passes 10.
        Built on the pairs' device without reading them on the host (no stream synchronisation on a GPU);
        one grouping serves every projection of the layer that shares this ``capacity`` and ``E``.
        """
        if row_adapter.shape != row_expert.shape or row_adapter.dim() != 1:
            raise ValueError(
                f"row_adapter and row_expert must be 1-D of one length, got {tuple(row_adapter.shape)} and "
                f"{tuple(row_expert.shape)}"
            )
        virtual = torch.where(row_adapter >= 0, row_adapter.long() * self.num_experts + row_expert.long(), -1)
        adapters = self.capacity if adapters is None else min(adapters, self.capacity)
        return LoRASegments(virtual, adapters * self.num_experts)


def add_expert_lora(y: torch.Tensor, x: torch.Tensor, tables: PagedExpertLoRA, segments: LoRASegments) -> torch.Tensor:
    """``y[s] += scale_a · (x[s] A_{a,e}ᵀ) B_{a,e}ᵀ`` for each (row, expert) pair ``s`` of adapter ``a``, expert
    ``e``, in place; ``segments`` from :meth:`PagedExpertLoRA.segments`. Returns ``y``.

    Triton on GPU (``add_lora`` over the (adapter, expert) entries); on CPU, per adapter, two batched products
    over all its pairs (module docstring).
    """
    from .lora import add_lora  # lora.py imports this module

    if backend.use_triton(y.device):
        return add_lora(y, x, tables.paged, segments)
    if x.dim() != 2 or y.dim() != 2 or x.shape[0] != y.shape[0] or x.shape[0] != segments.num_rows:
        raise ValueError(
            f"x and y must have the segments' {segments.num_rows} rows, got {tuple(x.shape)} {tuple(y.shape)}"
        )
    if (x.shape[1], y.shape[1]) != (tables.in_features, tables.out_features):
        raise ValueError(
            f"tables are for {tables.in_features} -> {tables.out_features}, got {x.shape[1]} -> {y.shape[1]}"
        )
    e = tables.num_experts
    # Runs are (adapter * E + expert, start, stop), ascending: consecutive runs of one adapter form its group.
    for adapter, group in itertools.groupby(segments.runs, key=lambda run: run[0] // e):
        group = list(group)
        weights = tables.expert_weights(adapter)
        if weights is None:  # this adapter does not adapt this projection
            continue
        counts = [0] * e
        for virtual, start, stop in group:
            counts[virtual % e] = stop - start
        rows = segments.rows(group[0][1], group[-1][2])
        delta = _per_expert_lora(x[rows], *weights[:2], counts).mul_(weights[2])
        if isinstance(rows, slice):
            y[rows] += delta
        else:
            y.index_put_((rows,), delta, accumulate=True)
    return y


def _per_expert_lora(x: torch.Tensor, lora_a: torch.Tensor, lora_bt: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """``(x[s] A_eᵀ) Bᵀ_e`` for rows ``x`` sorted by expert, ``counts[e]`` of them for expert ``e``.

    Few rows per expert (decode): each row's A and Bᵀ gathered and two batched matmuls. Many (prefill): one
    grouped GEMM per factor, whose fixed cost on CPU (~200 µs at E=32, measured) a decode step cannot repay,
    while gathering every row's factors costs 8x more than it at 16 rows per expert.
    """
    e = len(counts)
    if x.shape[0] <= 4 * e:
        experts = torch.repeat_interleave(torch.arange(e, device=x.device), torch.tensor(counts, device=x.device))
        v = torch.bmm(x.unsqueeze(1), lora_a.index_select(0, experts).transpose(1, 2))
        return torch.bmm(v, lora_bt.index_select(0, experts)).squeeze(1)
    offsets = torch.tensor(list(itertools.accumulate(counts)), device=x.device)
    return grouped_mm(grouped_mm(x, lora_a.transpose(1, 2), offsets), lora_bt, offsets)
