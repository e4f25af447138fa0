"""Tiny seeded base models and random PEFT adapters saved as PEFT writes them.

The tests run under ``--import-mode=importlib``, where test modules cannot import siblings, so the
helpers are handed out as fixtures (``lora``: a namespace of the functions below).
"""

from __future__ import annotations

import copy
import types

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

_COMMON = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=211,
    max_position_embeddings=256,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),
    # A sliding window shorter than the prompts checks the windowed masks too.
    "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": 6}),
    "mixtral": (MixtralConfig, MixtralForCausalLM, {"num_local_experts": 4, "num_experts_per_tok": 2}),
}


def tiny_model(family: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A randomly initialised fp32 causal LM of ``family`` (seeded); ``overrides`` change its config."""
    config_cls, model_cls, extra = FAMILIES[family]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**{**_COMMON, **extra, **overrides})).eval()
    # HF's init is small (std 0.02): scale weights up so logits have clear margins and a wrong
    # attention mask or LoRA row changes the argmax (a test that cannot fail is useless).
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(4)
    return model


def save_adapter(
    base: torch.nn.Module, path, rank: int, targets: list[str], seed: int, std: float = 0.3, **lora_options
) -> None:
    """Save a PEFT LoRA adapter for ``base`` with random N(0, std) A and B (PEFT would init B to zero)."""
    config = LoraConfig(r=rank, lora_alpha=lora_options.pop("alpha", 2 * rank), target_modules=targets, **lora_options)
    peft_model = get_peft_model(copy.deepcopy(base), config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * std)
    peft_model.save_pretrained(str(path))


def peft_generate(base: torch.nn.Module, adapter_path, prompt: list[int], max_new_tokens: int) -> list[int]:
    """The oracle: PEFT's own greedy ``generate`` with adapter ``adapter_path`` alone."""
    model = PeftModel.from_pretrained(copy.deepcopy(base), str(adapter_path)).eval()
    return hf_generate(model, prompt, max_new_tokens)


def hf_generate(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Greedy transformers ``generate`` of one prompt; returns only the new tokens."""
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=max_new_tokens, do_sample=False,
        )
    return out[0, len(prompt) :].tolist()


@pytest.fixture(scope="session")
def lora():
    """The helpers of this module: ``lora.tiny_model``, ``lora.save_adapter``, ``lora.peft_generate``, ..."""
    return types.SimpleNamespace(
        tiny_model=tiny_model, save_adapter=save_adapter, peft_generate=peft_generate, hf_generate=hf_generate
    )
