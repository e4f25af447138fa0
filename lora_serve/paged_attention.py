"""Paged attention over the unified pool, plugged into Hugging Face models as an attention implementation.

The engine runs the model on a packed batch (batch size 1, every scheduled sequence's new tokens
concatenated, explicit ``position_ids``), so the model's own projections, rotary embeddings, MoE blocks
and LoRA wrappers run unchanged. Attention is the one place where sequences must be kept apart; the
function registered here writes the step's new keys/values into each token's pool slots and attends
every sequence to its own page table:

* sequences with one new token (decode, or the last chunk of a prefill) are padded to the longest
  context and done in one batched SDPA call;
* sequences with several new tokens (prefill chunks) get one SDPA call each, so short decodes are
  never padded to a long prompt.

The per-step metadata travels to the attention function as the ``lora_serve_batch`` keyword (the step's
``StepBatch``, whose ``attention`` is an ``AttentionBatch``), which transformers forwards untouched from
``model(...)`` to every attention call.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from .kv_layout import KVLayout

ATTENTION_NAME = "lora_serve_paged"
BATCH_KWARG = "lora_serve_batch"


@dataclass
class ScheduledSequence:
    """One sequence's part of a step: ``num_new`` tokens after ``num_cached`` already in its page table."""

    num_cached: int
    num_new: int
    pages: torch.Tensor  # [num_cached + num_new, slots_per_token]


@dataclass
class AttentionBatch:
    """Step metadata shared by every layer's attention call (built once per step)."""

    pool: torch.Tensor
    layout: KVLayout
    write_slots: torch.Tensor  # [T, S]: page rows of the step's new tokens, in packed order
    decode_rows: torch.Tensor  # [Bd]: packed row of each single-token sequence
    decode_pages: torch.Tensor  # [Bd, Lmax, S], padded with slot 0 (masked out)
    decode_lengths: torch.Tensor  # [Bd]: context length including the new token
    prefills: list[tuple[int, int, int, torch.Tensor]]  # (row_start, num_new, num_cached, pages)
    decode_all_longest: bool = False  # every decode sequence has the longest context (no padding)
    _masks: dict = field(default_factory=dict)

    @classmethod
    def build(cls, pool: torch.Tensor, layout: KVLayout, sequences: list[ScheduledSequence]) -> AttentionBatch:
        """Pack ``sequences`` (in the same order as their tokens in the step's input) into metadata."""
        device = pool.device
        write, decode_rows, decode_pages, decode_lengths, prefills = [], [], [], [], []
        row = 0
        for seq in sequences:
            total = seq.num_cached + seq.num_new
            write.append(seq.pages[seq.num_cached : total])
            if seq.num_new == 1:
                decode_rows.append(row)
                decode_pages.append(seq.pages[:total])
                decode_lengths.append(total)
            else:
                prefills.append((row, seq.num_new, seq.num_cached, seq.pages[:total].to(device)))
            row += seq.num_new
        longest = max(decode_lengths, default=0)
        padded = torch.zeros(len(decode_pages), longest, layout.slots_per_token, dtype=torch.long)
        for i, pages in enumerate(decode_pages):
            padded[i, : pages.shape[0]] = pages
        return cls(
            pool=pool,
            layout=layout,
            write_slots=torch.cat(write).to(device),
            decode_rows=torch.tensor(decode_rows, dtype=torch.long, device=device),
            decode_pages=padded.to(device),
            decode_lengths=torch.tensor(decode_lengths, dtype=torch.long, device=device),
            prefills=prefills,
            decode_all_longest=min(decode_lengths, default=0) == longest,
        )

    def decode_mask(self, window: int | None) -> torch.Tensor | None:
        """``[Bd, 1, 1, Lmax]`` bool: key ``j`` is visible to the new token at position ``length - 1``.

        None when every key is visible (all decodes as long as the longest, no window cutting in), so SDPA
        skips building and applying a mask; equal-length decodes are the common case of a closed batch.
        """
        key = ("decode", window)
        longest = self.decode_pages.shape[1]
        if self.decode_all_longest and (window is None or window >= longest):
            return None
        if key not in self._masks:
            positions = torch.arange(self.decode_pages.shape[1], device=self.pool.device)
            last = (self.decode_lengths - 1)[:, None]
            visible = positions[None, :] <= last
            if window is not None:
                visible &= positions[None, :] > last - window
            self._masks[key] = visible[:, None, None, :]
        return self._masks[key]

    def prefill_mask(self, index: int, window: int | None) -> torch.Tensor:
        """``[1, 1, num_new, context]`` bool causal (and sliding-window) mask of prefill chunk ``index``."""
        key = (index, window)
        if key not in self._masks:
            _, num_new, num_cached, pages = self.prefills[index]
            keys = torch.arange(pages.shape[0], device=self.pool.device)
            queries = num_cached + torch.arange(num_new, device=self.pool.device)
            visible = keys[None, :] <= queries[:, None]
            if window is not None:
                visible &= keys[None, :] > queries[:, None] - window
            self._masks[key] = visible[None, None]
        return self._masks[key]


def _attend(query, pages, batch: AttentionBatch, layer: int, mask, scaling: float) -> torch.Tensor:
    """SDPA of ``query [B, H, q, hd]`` against the keys/values in ``pages [B, L, S]``."""
    b, length = pages.shape[0], pages.shape[1]
    head_dim = query.shape[-1]
    key, value = (
        t.reshape(b, length, -1, head_dim).transpose(1, 2).to(query.dtype)
        for t in batch.layout.read(batch.pool, layer, pages)
    )
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling, enable_gqa=True)


def paged_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention implementation with the transformers signature; ``query`` is ``[1, H, T, hd]`` (packed).

    ``attention_mask`` is ignored: the masks come from the step's page tables. Returns ``[1, T, H, hd]``.
    """
    step = kwargs.get(BATCH_KWARG)  # a StepBatch (step_batch.py)
    if step is None:
        raise RuntimeError(
            f"attention implementation {ATTENTION_NAME!r} needs the {BATCH_KWARG!r} keyword; "
            "this model is owned by a lora_serve.Engine and must be run through it"
        )
    batch: AttentionBatch = step.attention
    layer = module.layer_idx
    tokens = query.shape[2]
    packed_q = query[0].transpose(0, 1)  # [T, H, hd]
    batch.layout.write(
        batch.pool, layer, key[0].transpose(0, 1).reshape(tokens, -1), value[0].transpose(0, 1).reshape(tokens, -1),
        batch.write_slots,
    )
    if not batch.prefills:  # decodes only: rows are already in order, no gather/scatter of queries
        att = _attend(packed_q.unsqueeze(2), batch.decode_pages, batch, layer, batch.decode_mask(sliding_window), scaling)
        return att.squeeze(2).unsqueeze(0), None
    out = torch.empty_like(packed_q)
    if batch.decode_rows.numel():
        q = packed_q[batch.decode_rows].unsqueeze(2)  # [Bd, H, 1, hd]
        att = _attend(q, batch.decode_pages, batch, layer, batch.decode_mask(sliding_window), scaling)
        out[batch.decode_rows] = att.squeeze(2)
    for i, (start, num_new, _, pages) in enumerate(batch.prefills):
        q = packed_q[start : start + num_new].transpose(0, 1).unsqueeze(0)  # [1, H, q, hd]
        att = _attend(q, pages[None], batch, layer, batch.prefill_mask(i, sliding_window), scaling)
        out[start : start + num_new] = att[0].transpose(0, 1)
    return out.unsqueeze(0), None


AttentionInterface.register(ATTENTION_NAME, paged_attention_forward)
