"""Sparse upcycling: turn a dense Llama-family model into an MoE model of the matching HF family.

Every expert starts as a copy of the layer's dense MLP and the router's top-k weights are
renormalised to sum to 1, so the upcycled model computes the dense model's outputs at
initialisation (up to float rounding); routers start small and random so training can break the
symmetry. The result is a standard transformers model (Mixtral or Qwen3-MoE) that
`save_pretrained`/`from_pretrained` and `patch_model` handle like any other.
"""

from __future__ import annotations

import torch
import transformers
from torch import nn

# dense family -> (MoE config class, experts-count field, extra MoE config fields)
_TARGETS = {
    "llama": ("MixtralConfig", "num_local_experts", {}),
    "mistral": ("MixtralConfig", "num_local_experts", {}),
    "qwen3": ("Qwen3MoeConfig", "num_experts", {"norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": []}),
}
_SHARED_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps",
    "rope_parameters", "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id",
    "attention_dropout", "initializer_range",
)


def _moe_config(dense_config, num_experts: int, top_k: int):
    family = dense_config.model_type
    if family not in _TARGETS:
        raise ValueError(f"cannot upcycle model family {family!r}; supported: {list(_TARGETS)}")
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(dense_config, flag, False):
            raise ValueError(f"cannot upcycle a {family} model with {flag}=True: the MoE family has no such biases")
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k={top_k} must be between 1 and num_experts={num_experts}")
    class_name, experts_field, extra = _TARGETS[family]
    fields = {name: getattr(dense_config, name) for name in _SHARED_FIELDS if hasattr(dense_config, name)}
    if class_name == "Qwen3MoeConfig":
        fields["moe_intermediate_size"] = dense_config.intermediate_size
    return getattr(transformers, class_name)(
        **fields, **extra, **{experts_field: num_experts}, num_experts_per_tok=top_k)


def upcycle(model: nn.Module, num_experts: int, top_k: int, router_std: float = 0.02, seed: int = 0) -> nn.Module:
    """Return a new MoE causal LM whose experts are copies of `model`'s dense MLPs.

    Args:
        model: a dense transformers Llama, Mistral or Qwen3 causal LM (not modified).
        num_experts / top_k: experts per layer and experts per token.
        router_std: standard deviation of the random router weights.
        seed: seed for the router initialisation.
    """
    config = _moe_config(model.config, num_experts, top_k)
    moe = transformers.AutoModelForCausalLM.from_config(config, dtype=next(model.parameters()).dtype)
    dense_state = model.state_dict()
    state = {key: value for key, value in dense_state.items() if ".mlp." not in key}
    generator = torch.Generator().manual_seed(seed)
    for index in range(config.num_hidden_layers):
        prefix = f"model.layers.{index}.mlp."
        gate_up = torch.cat([dense_state[prefix + "gate_proj.weight"], dense_state[prefix + "up_proj.weight"]])
        state[prefix + "experts.gate_up_proj"] = gate_up.expand(num_experts, -1, -1).clone()
        state[prefix + "experts.down_proj"] = dense_state[prefix + "down_proj.weight"].expand(num_experts, -1, -1).clone()
        router = torch.randn(num_experts, config.hidden_size, generator=generator) * router_std
        state[prefix + "gate.weight"] = router.to(gate_up.dtype)
    missing, unexpected = moe.load_state_dict(state, strict=False)
    # Only non-persistent or tied entries may be absent; anything else means a layout change.
    missing = [key for key in missing if key not in dict(moe.named_buffers()) and not key.endswith("lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"upcycling left weights unmatched: missing {missing}, unexpected {unexpected}")
    return moe.to(next(model.parameters()).device).train(model.training)
