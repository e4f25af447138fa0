"""Top-k routing: scores, group-limited selection, renormalisation and capacity dropping.

Everything here works on router logits of shape [T, E] (T tokens, E experts) and is shared by
`MoELayer` and the routers `patch_model` installs into Hugging Face models.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .config import MoEConfig


@dataclass
class Routing:
    """The outcome of routing T tokens to k of E experts.

    Attributes:
        logits: [T, E] raw router logits.
        scores: [T, E] per-expert probabilities the balancing losses use (softmax, or sigmoid
            scores normalised to sum to 1 per token).
        top_k_index: [T, k] chosen experts; a slot dropped by capacity holds E (a sentinel
            that the experts skip).
        top_k_weights: [T, k] gate weights; 0 at dropped slots.
        selected: [T, k] the experts chosen before capacity dropping (what balancing counts).
        dropped: number of dropped (token, expert) assignments, a 0-dim tensor.
    """

    logits: torch.Tensor
    scores: torch.Tensor
    top_k_index: torch.Tensor
    top_k_weights: torch.Tensor
    selected: torch.Tensor
    dropped: torch.Tensor


def check_logits(logits: torch.Tensor, num_experts: int) -> None:
    """Raise a clear error for router logits of the wrong width or with NaN/inf values.

    The value check reads a tensor on the host, so it runs in eager mode only: under
    torch.compile / torch.export it is left out (a data-dependent branch cannot be traced).
    """
    if logits.shape[-1] != num_experts:
        raise ValueError(f"router logits have {logits.shape[-1]} experts, expected {num_experts}")
    if torch.compiler.is_compiling():
        return
    if not torch.isfinite(logits).all():
        bad = (~torch.isfinite(logits)).any(dim=-1).nonzero().flatten()[:5].tolist()
        raise FloatingPointError(
            f"router logits contain NaN or inf (first bad token rows: {bad}); "
            "check the hidden states feeding the router, e.g. for an overflow in lower precision"
        )


def _group_limited_mask(choice_scores: torch.Tensor, num_groups: int, topk_groups: int) -> torch.Tensor:
    """Boolean [T, E] mask of experts in each token's best `topk_groups` groups.

    A group's strength is the sum of its two best scores, as DeepSeek-V3 ranks groups.
    """
    tokens, experts = choice_scores.shape
    grouped = choice_scores.view(tokens, num_groups, experts // num_groups)
    best = grouped.topk(min(2, experts // num_groups), dim=-1).values.sum(dim=-1)
    keep_groups = best.topk(topk_groups, dim=-1).indices
    group_mask = torch.zeros_like(best, dtype=torch.bool).scatter_(1, keep_groups, True)
    return group_mask.unsqueeze(-1).expand_as(grouped).reshape(tokens, experts)


def routing_scores(logits: torch.Tensor, score_func: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(gate scores, balancing probabilities), both [T, E] fp32, from router logits [T, E].

    Softmax scores are their own probabilities; sigmoid scores (DeepSeek-V3) are normalised to sum
    to 1 per token for the balancing losses.
    """
    logits32 = logits.float()
    if score_func == "softmax":
        scores = torch.softmax(logits32, dim=-1)
        return scores, scores
    scores = torch.sigmoid(logits32)
    return scores, scores / scores.sum(dim=-1, keepdim=True)


def capped_routing(logits: torch.Tensor, probs: torch.Tensor, selected: torch.Tensor, weights: torch.Tensor,
                   config: MoEConfig) -> Routing:
    """The `Routing` of chosen experts [T, k] and gate weights, after `config`'s capacity dropping."""
    index, weights, dropped = apply_capacity(selected, weights, probs, config.num_experts,
                                             config.capacity_factor, config.drop_policy)
    return Routing(logits, probs, index, weights, selected, dropped)


def route(logits: torch.Tensor, config: MoEConfig, selection_bias: torch.Tensor | None = None) -> Routing:
    """Route tokens from router logits [T, E] according to `config`.

    `selection_bias` ([E], optional) is added to the scores for choosing experts only, never to
    the gate weights (DeepSeek-V3's aux-loss-free balancing and `e_score_correction_bias`).
    Capacity dropping is applied when `config.capacity_factor` is set.
    """
    check_logits(logits, config.num_experts)
    gate_scores, probs = routing_scores(logits, config.score_func)
    choice_scores = gate_scores if selection_bias is None else gate_scores + selection_bias.float()
    if config.num_groups > 1:
        mask = _group_limited_mask(choice_scores, config.num_groups, config.topk_groups)
        choice_scores = choice_scores.masked_fill(~mask, float("-inf"))
    selected = choice_scores.topk(config.top_k, dim=-1).indices
    weights = gate_scores.gather(1, selected)
    if config.renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    weights = (weights * config.routed_scaling).to(logits.dtype)
    return capped_routing(logits, probs, selected, weights, config)


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """Assignments one expert may take: ceil(capacity_factor * tokens * top_k / experts)."""
    return math.ceil(capacity_factor * num_tokens * top_k / num_experts)


def apply_capacity(
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    probs: torch.Tensor,
    num_experts: int,
    capacity_factor: float | None,
    drop_policy: str = "probs",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Drop assignments beyond each expert's capacity.

    Returns (index, weights, dropped): dropped slots get index `num_experts` (skipped by the
    experts) and weight 0. Policy "probs" keeps an expert's highest-probability assignments;
    "position" keeps every token's first choice before any second choice, each in token order
    (GShard's and DeepSpeed's order).
    With `capacity_factor=None` nothing is dropped.
    """
    if capacity_factor is None:
        return top_k_index, top_k_weights, torch.zeros((), dtype=torch.long, device=top_k_index.device)
    tokens, k = top_k_index.shape
    capacity = expert_capacity(tokens, k, num_experts, capacity_factor)
    flat_expert = top_k_index.reshape(-1)
    if drop_policy == "probs":
        priority = -probs.gather(1, top_k_index).reshape(-1)
    else:
        choice, token = torch.meshgrid(torch.arange(k), torch.arange(tokens), indexing="ij")
        priority = (choice * tokens + token).t().reshape(-1).to(flat_expert.device, torch.float32)
    # Sort by priority, then stably by expert: each expert's slots end up in priority order,
    # so a slot's rank inside its expert is its position minus the expert's start.
    by_priority = priority.argsort(stable=True)
    order = by_priority[flat_expert[by_priority].argsort(stable=True)]
    counts = torch.bincount(flat_expert, minlength=num_experts)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(flat_expert)
    rank[order] = torch.arange(flat_expert.numel(), device=flat_expert.device) - starts[flat_expert[order]]
    keep = (rank < capacity).view(tokens, k)
    index = top_k_index.masked_fill(~keep, num_experts)
    weights = top_k_weights.masked_fill(~keep, 0)
    return index, weights, (~keep).sum()
