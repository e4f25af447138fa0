"""One dataclass of MoE options, validated up front so mistakes fail with a clear message."""

from __future__ import annotations

import math
from dataclasses import dataclass

SCORE_FUNCS = ("softmax", "sigmoid")
DROP_POLICIES = ("probs", "position")
# "hf" keeps transformers' own balancing loss untouched (the drop-in default of `patch_model`);
# the others are computed per layer by moeplug.
BALANCE_MODES = ("hf", "micro", "sequence", "global", "none")
ACTIVATIONS = ("silu", "gelu", "relu")


def _choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; expected one of {list(allowed)}")


@dataclass
class MoEConfig:
    """Options of one MoE layer (router, experts, balancing).

    Shapes:
        hidden_size: model width H. intermediate_size: width I of each routed expert's
        SwiGLU MLP. shared_intermediate_size: width of the always-on shared expert (0: none).
    Routing:
        score_func: "softmax" (Mixtral, Qwen) or "sigmoid" (DeepSeek-V3) router scores.
        renormalize: rescale the k selected weights to sum to 1.
        num_groups / topk_groups: DeepSeek-V3 group-limited routing (experts split into
            `num_groups` groups; only the best `topk_groups` groups are eligible). 1/1: off.
        routed_scaling: factor applied to the routed weights (DeepSeek-V3's routed_scaling_factor).
        jitter: multiplicative uniform noise (1 +- jitter) on router inputs during training.
    Capacity:
        capacity_factor: None is dropless. Otherwise each expert keeps at most
            ceil(capacity_factor * tokens * top_k / num_experts) assignments; the rest are dropped
            (their gate weight becomes 0) and counted.
        drop_policy: which assignments an over-full expert keeps: "probs" (highest router score)
            or "position" (first choices before second choices, each in token order).
    Losses (added to the model loss by `patch_model`; kept in `MoELayer.aux_loss`):
        balance: "micro" (per micro-batch, per layer), "sequence" (per sequence, DeepSeek-V3),
            "global" (expert frequencies over all micro-batches of the optimizer step and all
            data-parallel ranks; needs a `BalanceController`), "none", or "hf" (only with
            `patch_model`: keep transformers' own loss, which pools all layers' experts by index).
        aux_loss_coef: coefficient of the load-balancing loss; None takes the model's own.
        z_loss_coef: coefficient of the router z-loss (ST-MoE); 0 disables it.
    Parallelism:
        ep_size: shard the experts over this many ranks (expert parallelism, see
            `moeplug.dispatch`); 1 keeps every expert on every rank.
    """

    num_experts: int = 8
    top_k: int = 2
    hidden_size: int = 64
    intermediate_size: int = 128
    shared_intermediate_size: int = 0
    shared_expert_gate: bool = False
    activation: str = "silu"
    score_func: str = "softmax"
    renormalize: bool = True
    num_groups: int = 1
    topk_groups: int = 1
    routed_scaling: float = 1.0
    jitter: float = 0.0
    capacity_factor: float | None = None
    drop_policy: str = "probs"
    balance: str = "micro"
    aux_loss_coef: float | None = 0.01
    z_loss_coef: float = 0.0
    ep_size: int = 1

    def __post_init__(self) -> None:
        for name in ("num_experts", "top_k", "hidden_size", "intermediate_size", "num_groups", "topk_groups",
                     "ep_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k={self.top_k} exceeds num_experts={self.num_experts}")
        if self.shared_intermediate_size < 0:
            raise ValueError(f"shared_intermediate_size={self.shared_intermediate_size} must be >= 0")
        _choice("score_func", self.score_func, SCORE_FUNCS)
        _choice("drop_policy", self.drop_policy, DROP_POLICIES)
        _choice("balance", self.balance, BALANCE_MODES)
        _choice("activation", self.activation, ACTIVATIONS)
        if self.num_experts % self.num_groups:
            raise ValueError(f"num_groups={self.num_groups} must divide num_experts={self.num_experts}")
        if self.topk_groups > self.num_groups:
            raise ValueError(f"topk_groups={self.topk_groups} exceeds num_groups={self.num_groups}")
        if self.top_k > self.topk_groups * (self.num_experts // self.num_groups):
            raise ValueError(
                f"top_k={self.top_k} exceeds the {self.topk_groups} eligible groups x "
                f"{self.num_experts // self.num_groups} experts per group"
            )
        if self.num_experts % self.ep_size:
            raise ValueError(f"ep_size={self.ep_size} must divide num_experts={self.num_experts}")
        if self.capacity_factor is not None and not (self.capacity_factor > 0 and math.isfinite(self.capacity_factor)):
            raise ValueError(f"capacity_factor={self.capacity_factor!r} must be a positive number or None")
        if not 0 <= self.jitter < 1:
            raise ValueError(f"jitter={self.jitter} must be in [0, 1)")
        for name in ("aux_loss_coef", "z_loss_coef"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name}={value} must be >= 0")
