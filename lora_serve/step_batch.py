"""``StepBatch``: what one engine step's forward needs, built once by the engine and read by every layer.

* ``attention``: the paged-attention metadata (page rows to write, decode and prefill page tables). It
  reaches the attention implementation as the ``lora_serve_batch`` keyword of ``model(...)``, which
  transformers forwards to every attention call.
* ``lora``: the rows grouped by adapter (a ``kernels.LoRASegments``; None when no row uses an adapter),
  handed to ``kernels.add_lora`` by every adapted linear. Transformers calls linears with the hidden
  states alone, so the wrappers read the step from the engine's ``ActiveStep``, which holds it only for
  the duration of the forward (as vLLM's punica wrapper holds its per-step metadata).

The rows come packed: each sequence's new tokens side by side, sequences grouped by adapter (stable, so
arrival order holds within an adapter), so every adapter's rows are one contiguous segment.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from kernels.lora import LoRASegments

from .kv_layout import KVLayout
from .paged_attention import AttentionBatch, ScheduledSequence
from .request import Request


@dataclass(frozen=True)
class StepBatch:
    """One step's packed tokens and the metadata every attention and adapted linear layer reads."""

    input_ids: torch.Tensor  # [1, T]
    position_ids: torch.Tensor  # [1, T]
    logits_rows: torch.Tensor  # [S]: packed rows whose next token is sampled
    attention: AttentionBatch
    lora: LoRASegments | None

    @classmethod
    def build(
        cls,
        scheduled: list[tuple[Request, int]],
        adapter_index: Callable[[str], int],
        pool: torch.Tensor,
        layout: KVLayout,
        num_adapters: int,
    ) -> tuple[StepBatch, list[Request]]:
        """Pack ``(request, new tokens)`` pairs; return the batch and the requests to sample, in row order.

        ``adapter_index`` maps a request's adapter to its page-table index; ``num_adapters`` is the tables' size.
        """
        ids, positions, rows, sequences, last_rows, sampled = [], [], [], [], [], []
        keyed = sorted(
            ((adapter_index(r.adapter) if r.adapter else -1, r, c) for r, c in scheduled), key=lambda t: t[0]
        )
        for adapter, request, count in keyed:
            start = request.num_computed
            ids += request.all_ids[start : start + count]
            positions += range(start, start + count)
            rows += [adapter] * count
            sequences.append(ScheduledSequence(start, count, request.pages))
            if start + count == len(request.all_ids):  # the whole context is in: sample the next token
                last_rows.append(len(ids) - 1)
                sampled.append(request)
        device = pool.device
        batch = cls(
            input_ids=torch.tensor([ids], device=device),
            position_ids=torch.tensor([positions], device=device),
            logits_rows=torch.tensor(last_rows, dtype=torch.long, device=device),
            attention=AttentionBatch.build(pool, layout, sequences),
            lora=LoRASegments(rows, num_adapters, device) if rows and rows[-1] >= 0 else None,
        )
        return batch, sampled


class ActiveStep:
    """The step batch a forward is running, for the layers that transformers calls without it (linears)."""

    def __init__(self):
        self.batch: StepBatch | None = None

    @contextlib.contextmanager
    def running(self, batch: StepBatch) -> Iterator[StepBatch]:
        """Make ``batch`` the active step inside the block (nothing is active outside it)."""
        self.batch = batch
        try:
            yield batch
        finally:
            self.batch = None
