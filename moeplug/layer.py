"""MoELayer: router + grouped experts (+ shared expert), for models you build yourself.

For Hugging Face models use `moeplug.patch_model`, which plugs the same routing, experts and
losses into the model's own modules instead of replacing them.
"""

from __future__ import annotations

import torch
from torch import nn

from .balance import RouterStats
from .config import MoEConfig
from .ep_layout import expert_parallel
from .experts import ACT_FNS, GroupedExperts, shard_experts_
from .router import route
from .state import MoEState, account_routing


class SwiGLUMLP(nn.Module):
    """A dense gated MLP (the shared expert): down(act(gate(x)) * up(x))."""

    def __init__(self, hidden_size: int, intermediate_size: int, activation: str = "silu"):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.act_fn = ACT_FNS[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[..., H] -> [..., H]."""
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class MoELayer(nn.Module):
    """A dropless-by-default Mixture-of-Experts MLP block.

    forward(hidden [..., H], token_mask=None) returns [..., H]. After each forward:
      - `aux_loss`: the weighted balancing + z-loss of this call (a tensor with gradient, or None);
        add it to your loss (sum it over the model's MoELayers).
      - `stats`: a `RouterStats` with tokens per expert, dropped assignments, losses, entropy.
    `selection_bias` ([E] buffer, zeros) is added to scores when choosing experts only; the
    aux-loss-free balancing update of `BalanceController` writes it. The layer's `MoEState`
    (attribute `moeplug`, shared with its experts) holds its layout, step accounting and results.
    """

    def __init__(self, config: MoEConfig):
        super().__init__()
        self.config = config
        self.router = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = GroupedExperts(config.num_experts, config.hidden_size, config.intermediate_size,
                                      config.activation)
        ep = expert_parallel(config.ep_size, config.num_experts)
        if ep.ep_size > 1:  # the same init on every rank, then each keeps its own experts
            shard_experts_(self.experts, ep, ("gate_up_proj", "down_proj"))
        self.shared_expert = None
        self.shared_expert_gate = None
        if config.shared_intermediate_size:
            self.shared_expert = SwiGLUMLP(config.hidden_size, config.shared_intermediate_size, config.activation)
            if config.shared_expert_gate:
                self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False)
        self.register_buffer("selection_bias", torch.zeros(config.num_experts))
        MoEState.attach(config, self, self.experts, ep, "selection_bias")

    @property
    def aux_loss(self) -> torch.Tensor | None:
        """The weighted auxiliary loss of the last forward (None when no loss applies)."""
        return self.moeplug.aux_loss

    @property
    def stats(self) -> RouterStats | None:
        """Routing statistics of the last forward."""
        return self.moeplug.stats

    def forward(self, hidden: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Route every token of `hidden` [..., H]; `token_mask` [...] excludes padding from losses."""
        cfg = self.config
        if hidden.shape[-1] != cfg.hidden_size:
            raise ValueError(f"hidden states have size {hidden.shape[-1]} in the last dim, "
                             f"expected hidden_size={cfg.hidden_size}")
        tokens = hidden.reshape(-1, cfg.hidden_size)
        router_in = tokens
        if self.training and cfg.jitter > 0:
            router_in = tokens * torch.empty_like(tokens).uniform_(1 - cfg.jitter, 1 + cfg.jitter)
        routing = route(self.router(router_in), cfg, self.selection_bias)
        out = self.experts(tokens, routing.top_k_index, routing.top_k_weights,
                           may_drop=cfg.capacity_factor is not None)
        if self.shared_expert is not None:
            shared = self.shared_expert(tokens)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(tokens)) * shared
            out = out + shared
        num_sequences = hidden.shape[0] if hidden.dim() == 3 else 1
        account_routing(self.moeplug, routing, self.training, token_mask, num_sequences)
        return out.view_as(hidden)
