"""Load-balancing losses and routing statistics, computed per layer.

The load-balancing loss (LBL) is the normalised Switch form that Megatron-Core uses:

    LBL = E / (k * T_counts * T_probs) * sum_i P_i * count_i

with P_i the sum of expert i's router probability over the T_probs local tokens and count_i the
number of assignments expert i received over T_counts tokens. Uniform routing gives exactly 1.
Transformers' `load_balancing_loss_func` on one layer equals k times this value; over several
layers it pools experts of different layers by index, which this module never does.

For micro-batch balancing the counts are local (T_counts == T_probs). Global-batch balancing
passes counts summed over micro-batches and ranks instead (`counts=`, `counted_tokens=`):
gradients still flow only through the local probabilities.
"""

from __future__ import annotations

import functools

import torch

from .accounting import StepCounts


def expert_counts(selected: torch.Tensor, num_experts: int, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Assignments per expert, [E] float, from chosen experts [T, k] (masked tokens excluded).

    Indices >= num_experts (dropped-slot sentinels) are ignored.
    """
    weights = None
    if token_mask is not None:
        weights = token_mask.reshape(-1, 1).expand_as(selected).reshape(-1).float()
    flat = selected.reshape(-1)
    counts = torch.bincount(flat, weights=weights, minlength=num_experts + 1).float()
    return counts[:num_experts]


def load_balancing_loss(
    probs: torch.Tensor,
    selected: torch.Tensor,
    top_k: int,
    token_mask: torch.Tensor | None = None,
    counts: torch.Tensor | None = None,
    counted_tokens: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Normalised load-balancing loss of one layer (see the module docstring).

    Args:
        probs: [T, E] router probabilities (differentiable).
        selected: [T, k] experts the router chose (before capacity dropping).
        top_k: k.
        token_mask: optional [T] 1 for real tokens, 0 for padding.
        counts / counted_tokens: global assignment counts [E] and the number of tokens they
            were counted over; default: this batch's own.
    """
    num_experts = probs.shape[-1]
    mask = None if token_mask is None else token_mask.reshape(-1, 1).to(probs.dtype)
    prob_sum = (probs if mask is None else probs * mask).sum(dim=0)
    local_tokens = probs.new_tensor(probs.shape[0]) if mask is None else mask.sum()
    if counts is None:
        counts = expert_counts(selected, num_experts, token_mask)
        counted_tokens = local_tokens
    scale = num_experts / (top_k * counted_tokens * local_tokens.clamp(min=1))
    return scale * (prob_sum * counts.to(probs.dtype)).sum()


def sequence_load_balancing_loss(
    probs: torch.Tensor, selected: torch.Tensor, top_k: int, num_sequences: int,
    token_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean over sequences of each sequence's own LBL (DeepSeek-V3's sequence-wise loss).

    Tokens are laid out sequence by sequence: T = num_sequences * sequence_length.
    """
    tokens, num_experts = probs.shape
    if tokens % num_sequences:
        raise ValueError(f"{tokens} tokens cannot be split into {num_sequences} equal sequences")
    seq_probs = probs.view(num_sequences, -1, num_experts)
    seq_selected = selected.view(num_sequences, -1, selected.shape[-1])
    one_hot = torch.zeros(*seq_selected.shape[:2], num_experts + 1, device=probs.device, dtype=probs.dtype)
    one_hot.scatter_add_(2, seq_selected, torch.ones_like(seq_selected, dtype=probs.dtype))
    one_hot = one_hot[..., :num_experts]
    if token_mask is None:
        mask = probs.new_ones(num_sequences, seq_probs.shape[1], 1)
    else:
        mask = token_mask.reshape(num_sequences, -1, 1).to(probs.dtype)
    seq_tokens = mask.sum(dim=1).clamp(min=1)  # [S, 1]
    prob_sum = (seq_probs * mask).sum(dim=1)  # [S, E]
    counts = (one_hot * mask).sum(dim=1)  # [S, E]
    per_seq = num_experts / (top_k * seq_tokens.squeeze(-1) ** 2) * (prob_sum * counts).sum(dim=-1)
    return per_seq.mean()


def router_z_loss(logits: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2."""
    z = torch.logsumexp(logits.float(), dim=-1) ** 2
    if token_mask is None:
        return z.mean()
    mask = token_mask.reshape(-1).to(z.dtype)
    return (z * mask).sum() / mask.sum().clamp(min=1)


class RouterStats:
    """What one MoE layer did in its last forward pass, readable after a step.

    The forward only keeps its (detached) routing tensors; every value is computed on first access,
    so a forward pays no host synchronisation for statistics nobody reads, and compiles.
    `tokens_per_expert` counts kept assignments (after capacity, a CPU long tensor); `dropped`
    counts removed ones. Losses are the unweighted values (before coefficients); None when not computed.
    """

    def __init__(self, top_k_index: torch.Tensor, probs: torch.Tensor, dropped: torch.Tensor,
                 lbl: torch.Tensor | None = None, z_loss: torch.Tensor | None = None):
        self._index, self._probs, self._dropped = top_k_index.detach(), probs.detach(), dropped.detach()
        self._lbl = None if lbl is None else lbl.detach()
        self._z_loss = None if z_loss is None else z_loss.detach()

    @functools.cached_property
    def tokens_per_expert(self) -> torch.Tensor:
        """[E] assignments each expert received (capacity-dropped ones excluded)."""
        return expert_counts(self._index, self._probs.shape[-1]).long().cpu()

    @functools.cached_property
    def dropped(self) -> int:
        """Assignments removed by capacity dropping."""
        return int(self._dropped)

    @functools.cached_property
    def entropy(self) -> float:
        """Mean over tokens of the router distribution's entropy (nats)."""
        probs = self._probs.float()
        return float(-(probs * probs.clamp(min=1e-20).log()).sum(dim=-1).mean())

    @functools.cached_property
    def lbl(self) -> float | None:
        """The layer's load-balancing loss, or None."""
        return None if self._lbl is None else float(self._lbl)

    @functools.cached_property
    def z_loss(self) -> float | None:
        """The layer's router z-loss, or None."""
        return None if self._z_loss is None else float(self._z_loss)

    @property
    def max_over_mean(self) -> float:
        """Load of the busiest expert over the mean load (1.0 is perfectly balanced)."""
        mean = self.tokens_per_expert.float().mean()
        return float(self.tokens_per_expert.max() / mean) if mean > 0 else 0.0

    def __repr__(self) -> str:
        return (f"RouterStats(tokens_per_expert={self.tokens_per_expert.tolist()}, dropped={self.dropped}, "
                f"entropy={self.entropy:.4f}, lbl={self.lbl}, z_loss={self.z_loss})")


def track_step(step_counts: StepCounts | None, selected: torch.Tensor, num_experts: int, balance: str,
               token_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, float] | None:
    """Add a training micro-batch's expert counts to the layer's step accounting.

    Returns the running (counts, tokens) of the step, summed over ranks when `balance` is
    "global" (the global-batch loss needs them now), else None.
    """
    if step_counts is None:
        if balance == "global":
            raise RuntimeError(
                "balance='global' needs to know where optimizer steps end: create "
                "moeplug.BalanceController(model, optimizer) (or use the Trainer callback) before training")
        return None
    if _recomputing_in_backward():
        # Activation checkpointing runs this forward again during backward: the micro-batch is
        # already counted, and the recomputed loss must see the same running totals as before.
        running = step_counts.running(selected.device)
    else:
        tokens = selected.shape[0] if token_mask is None else token_mask.sum()
        running = step_counts.add(expert_counts(selected, num_experts, token_mask), tokens, sync=balance == "global")
    return running if balance == "global" else None


def _recomputing_in_backward() -> bool:
    """True while autograd's engine runs a backward pass (where checkpointing recomputes forwards)."""
    return torch._C._current_graph_task_id() != -1


def auxiliary_losses(
    logits: torch.Tensor, probs: torch.Tensor, selected: torch.Tensor, top_k: int, balance: str,
    aux_loss_coef: float, z_loss_coef: float, token_mask: torch.Tensor | None = None, num_sequences: int = 1,
    global_counts: tuple[torch.Tensor, float] | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Weighted auxiliary loss of one layer and its unweighted parts: (total, lbl, z_loss).

    `balance` is "micro", "sequence", "global" or "none" (no loss for "hf"/"none"). "global" uses
    `global_counts` from `track_step`; without them (evaluation) it falls back to micro-batch counts.
    Returns (None, None, None) when no loss applies.
    """
    lbl = z = None
    if balance == "global" and aux_loss_coef > 0 and global_counts is not None:
        lbl = load_balancing_loss(probs, selected, top_k, token_mask, *global_counts)
    elif balance in ("micro", "global") and aux_loss_coef > 0:
        lbl = load_balancing_loss(probs, selected, top_k, token_mask)
    elif balance == "sequence" and aux_loss_coef > 0:
        lbl = sequence_load_balancing_loss(probs, selected, top_k, num_sequences, token_mask)
    if z_loss_coef > 0:
        z = router_z_loss(logits, token_mask)
    if lbl is None and z is None:
        return None, None, None
    total = 0.0
    if lbl is not None:
        total = total + aux_loss_coef * lbl
    if z is not None:
        total = total + z_loss_coef * z
    return total, lbl, z
