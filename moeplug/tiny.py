"""Tiny, seeded, offline MoE models for every supported family (tests, demos, benchmarks).

Sizes are deliberately awkward (hidden 44, head_dim 12, expert width 40) so nothing passes by accident of
block alignment. Nothing is downloaded: each model is built from its transformers config.
"""

from __future__ import annotations

import torch
import transformers

_COMMON = dict(vocab_size=96, hidden_size=44, num_attention_heads=4, num_key_value_heads=2,
               num_hidden_layers=2, max_position_embeddings=128, tie_word_embeddings=False,
               head_dim=12, bos_token_id=1, eos_token_id=2, pad_token_id=0)

# family -> (config class name, overrides on top of _COMMON)
TINY_CONFIGS: dict[str, tuple[str, dict]] = {
    "mixtral": ("MixtralConfig", dict(intermediate_size=40, num_local_experts=6, num_experts_per_tok=2,
                                      router_aux_loss_coef=0.02)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(intermediate_size=56, moe_intermediate_size=40, num_experts=6,
                                         num_experts_per_tok=2, shared_expert_intermediate_size=52,
                                         norm_topk_prob=False, router_aux_loss_coef=0.02)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(intermediate_size=56, moe_intermediate_size=40, num_experts=6,
                                         num_experts_per_tok=3, head_dim=12, norm_topk_prob=True,
                                         router_aux_loss_coef=0.02)),
    # OLMoE's q/k norms assume hidden_size == heads * head_dim.
    "olmoe": ("OlmoeConfig", dict(hidden_size=48, intermediate_size=40, num_experts=6, num_experts_per_tok=2,
                                  router_aux_loss_coef=0.02)),
    "deepseek_v3": ("DeepseekV3Config", dict(intermediate_size=56, moe_intermediate_size=40, n_routed_experts=8,
                                             num_experts_per_tok=2, n_group=2, topk_group=1, n_shared_experts=1,
                                             first_k_dense_replace=1, routed_scaling_factor=2.5,
                                             q_lora_rank=24, kv_lora_rank=16, qk_rope_head_dim=8,
                                             qk_nope_head_dim=12, v_head_dim=12, num_key_value_heads=4,
                                             head_dim=8)),  # DeepSeek: head_dim is the rope part
    "gpt_oss": ("GptOssConfig", dict(intermediate_size=40, num_local_experts=6, num_experts_per_tok=2,
                                     head_dim=12, sliding_window=16, router_aux_loss_coef=0.02)),
}


def tiny_config(family: str, **overrides) -> transformers.PretrainedConfig:
    """The tiny config of `family` (see `TINY_CONFIGS`), with optional overrides."""
    if family not in TINY_CONFIGS:
        raise ValueError(f"no tiny config for family {family!r}; available: {list(TINY_CONFIGS)}")
    class_name, family_overrides = TINY_CONFIGS[family]
    config_cls = getattr(transformers, class_name)
    return config_cls(**{**_COMMON, **family_overrides, **overrides})


def tiny_model(family: str, seed: int = 0, **overrides) -> transformers.PreTrainedModel:
    """A randomly initialised fp32 causal LM of `family` in eval mode, reproducible from `seed`.

    Router weights get a larger scale than transformers' default init so that routing is
    decisive (not near-uniform) and tests exercise uneven expert loads.
    """
    config = tiny_config(family, **overrides)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2 and ("router" in name or name.endswith("gate.weight")):
                param.normal_(0.0, 0.5)
            elif param.dim() == 3:  # fused experts: default init may leave them empty/zero
                param.normal_(0.0, 0.1)
            elif name.endswith("_bias") or name.endswith("router.bias"):
                param.normal_(0.0, 0.1)
    return model.eval()
