"""``LoRASegments``: a batch's rows grouped by adapter, built once per step and passed to every LoRA op.

Public through :mod:`kernels.lora`. Segment 0 holds the base-model rows (adapter -1), segment ``a + 1``
adapter ``a``'s rows; ``row_order`` lists the rows segment by segment (stable: arrival order holds within
an adapter) and ``ends`` the segments' ends in it. The torch implementation walks ``runs`` on the host;
the Triton kernels read ``row_order`` and ``ends`` on the device. Both are built at most once per batch
(lazily, so a CPU step never builds device tensors it does not read): a serving step builds one
``LoRASegments`` and hands it to the shrink and expand of every adapted layer, instead of each launch
sorting the same rows again (four torch ops per launch cost more host time than a decode step's LoRA
kernels, measured on an H200).
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Sequence
from functools import cached_property

import torch

INT_TYPES = (torch.int32, torch.int64)


class LoRASegments:
    """Which adapter each of a batch's rows uses (-1: none), grouped into one segment per adapter.

    Args:
        rows: the adapter of each row, as host ints (a serving engine's packed rows: built without
            touching the device) or as an int tensor ``row_adapter [T]`` (its device is the batch's).
        num_adapters: rows of the page tables the ops will read; adapters lie in ``[-1, num_adapters)``.
        device: where the kernels' tensors go for host ``rows`` (default CPU).
    """

    def __init__(self, rows: Sequence[int] | torch.Tensor, num_adapters: int, device: torch.device | str | None = None):
        self.num_adapters = num_adapters
        self._tensor = rows if isinstance(rows, torch.Tensor) else None
        if self._tensor is not None:
            if rows.dim() != 1 or rows.dtype not in INT_TYPES:
                raise ValueError(f"row_adapter must be a 1-D int tensor, got {tuple(rows.shape)} {rows.dtype}")
            self.device = rows.device
            self._list = None
            # Value checks read the tensor, which would synchronise a GPU stream: CPU tensors only.
            if rows.device.type == "cpu" and rows.numel():
                self._check_range(int(rows.min()), int(rows.max()))
        else:
            self.device = torch.device(device or "cpu")
            self._list = list(rows)
            if self._list:
                self._check_range(min(self._list), max(self._list))
        self.num_rows = len(rows)

    def _check_range(self, lo: int, hi: int) -> None:
        if lo < -1 or hi >= self.num_adapters:
            raise ValueError(f"row_adapter values must lie in [-1, {self.num_adapters - 1}], got min {lo} max {hi}")

    @cached_property
    def _host_rows(self) -> list[int]:
        return self._list if self._list is not None else self._tensor.tolist()

    @cached_property
    def packed(self) -> bool:
        """Rows already ascending by adapter (a serving engine packs them so): ``row_order`` is the identity."""
        rows = self._host_rows
        return all(a <= b for a, b in zip(rows, rows[1:]))

    @cached_property
    def _counts(self) -> list[int]:
        """Rows per segment: base-model rows, then each adapter's."""
        counter = collections.Counter(self._host_rows)
        return [counter.get(a, 0) for a in range(-1, self.num_adapters)]

    @cached_property
    def runs(self) -> list[tuple[int, int, int]]:
        """``(adapter, start, stop)``: positions in ``row_order`` of each adapter's rows (adapters >= 0 with rows)."""
        if self.packed:  # one pass over the rows, no table-sized loop
            runs, start = [], 0
            for adapter, group in itertools.groupby(self._host_rows):
                count = sum(1 for _ in group)
                if adapter >= 0:
                    runs.append((adapter, start, start + count))
                start += count
            return runs
        # Only the adapters that have rows: a table of many adapters (MoE experts: adapters x experts
        # entries) must not cost a loop over every entry per call.
        counter = collections.Counter(self._host_rows)
        runs, start = [], counter.get(-1, 0)
        for adapter in sorted(a for a in counter if a >= 0):
            runs.append((adapter, start, start + counter[adapter]))
            start += counter[adapter]
        return runs

    def rows(self, start: int, stop: int) -> slice | torch.Tensor:
        """The batch rows at positions ``[start, stop)`` of ``row_order``: a slice when ``packed``, else indices."""
        return slice(start, stop) if self.packed else self.row_order[start:stop]

    @cached_property
    def _schedule(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._tensor is not None:
            row_order = torch.argsort(self._tensor, stable=True)
            ends = torch.bincount(self._tensor.long() + 1, minlength=self.num_adapters + 1).cumsum(0)
            return row_order, ends
        rows = self._host_rows
        order = range(len(rows)) if self.packed else sorted(range(len(rows)), key=rows.__getitem__)
        both = torch.tensor([*order, *itertools.accumulate(self._counts)], dtype=torch.long).to(self.device)
        return both[: len(rows)], both[len(rows) :]  # one host-to-device copy

    @cached_property
    def adapters_used(self) -> int:
        """One past the largest adapter index a row uses (0: none), read without touching the device: for
        host rows exactly, for a tensor ``num_adapters``. Layers that regroup rows size their groups by it."""
        if self._list is None:
            return self.num_adapters
        return max(self._list, default=-1) + 1

    @cached_property
    def row_adapter(self) -> torch.Tensor:
        """``[T]`` int64 on the batch's device: each row's adapter (-1: none), in row order. Layers that
        regroup the rows (MoE experts: by adapter and expert) read it; one host-to-device copy per batch."""
        if self._tensor is not None:
            return self._tensor.long()
        return torch.tensor(self._list, dtype=torch.long).to(self.device)

    @property
    def row_order(self) -> torch.Tensor:
        """``[T]`` int64 on the batch's device: the rows, segment by segment."""
        return self._schedule[0]

    @property
    def ends(self) -> torch.Tensor:
        """``[num_adapters + 1]`` int64 on the batch's device: each segment's end in ``row_order``."""
        return self._schedule[1]
