"""LoRA on fused MoE expert projections: one ``PagedLoRA`` over (adapter, expert) pairs.

Public through :mod:`kernels.lora`. An adapter that puts LoRA on a fused experts parameter (PEFT's
``target_parameters=["mlp.experts.gate_up_proj", ...]``) has one ``A_e [r, in]`` / ``B_e [out, r]`` pair per
expert ``e``, all of one rank. Serving it in a mixed batch means: every (token, chosen expert) row adds its
row's adapter's expert-e LoRA. That is exactly SGMV over *virtual adapters* ``m * E + e`` (m: the adapter's
page-table index, E: the number of experts), so the existing shrink/expand kernels apply it unchanged:
:meth:`PagedExpertLoRA.segments` groups a step's (row, expert) pairs by (adapter, expert), and
:func:`kernels.lora.add_lora` does one grouped shrink and one grouped expand over all of them, each pair
doing its own rank's work, the adapter weights read from the paged pool (any rank, no ``W + ΔW``).
"""

from __future__ import annotations

import torch

from ._lora_segments import LoRASegments


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
            raise ValueError(f"an expert adapter of rank {rank} needs {self.slots_needed(rank)} slots, got {slots.numel()}")
        per_expert = self.paged.slots_needed(rank)
        for expert in range(self.num_experts):
            part = slots[expert * per_expert : (expert + 1) * per_expert]
            self.paged.set_adapter(index * self.num_experts + expert, part, rank, scale)

    def clear_adapter(self, index: int) -> None:
        """Forget adapter index ``index`` on every expert."""
        for expert in range(self.num_experts):
            self.paged.clear_adapter(index * self.num_experts + expert)

    def is_set(self, index: int) -> bool:
        """Whether an adapter is set at ``index``."""
        return self.paged.is_set(index * self.num_experts)

    def segments(self, row_adapter: torch.Tensor, row_expert: torch.Tensor) -> LoRASegments:
        """The (row, expert) pairs grouped by (adapter, expert), for :func:`kernels.lora.add_lora` on ``paged``.

        Args:
            row_adapter: ``[S]`` int, the adapter table index of each pair's row (-1: base model, adds nothing).
            row_expert: ``[S]`` int, each pair's expert in ``[0, E)``.
        Built on the pairs' device without reading them on the host (no stream synchronisation on a GPU);
        one grouping serves every projection of the layer that shares this ``capacity`` and ``E``.
        """
        if row_adapter.shape != row_expert.shape or row_adapter.dim() != 1:
            raise ValueError(
                f"row_adapter and row_expert must be 1-D of one length, got {tuple(row_adapter.shape)} and "
                f"{tuple(row_expert.shape)}"
            )
        virtual = torch.where(row_adapter >= 0, row_adapter.long() * self.num_experts + row_expert.long(), -1)
        return LoRASegments(virtual, self.paged.capacity)
