"""Engine input checks that protect every other request in the batch."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lora_serve import Engine, EngineConfig, SamplingParams


def test_out_of_vocabulary_prompt_is_refused_and_the_engine_keeps_serving():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    expected = model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4, do_sample=False)[0, 3:].tolist()
    engine = Engine(model, config=EngineConfig(pool_mb=4))
    with pytest.raises(ValueError, match=r"\[50, -1\] are outside the vocabulary \[0, 50\)"):
        engine.submit([1, 50, -1], SamplingParams(max_tokens=4))
    out = engine.generate([[5, 6, 7]], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    assert out[0].token_ids == expected
