"""Expert-LoRA adapters streamed through the HTTP server: concurrent streams of two adapters with LoRA on a
tiny Mixtral's fused experts (one also on attention and the router) and of the base model, each equal to
PEFT's greedy ``generate`` for that adapter alone, decoded by the same tokenizer; in-process and through the
``lora-serve`` command (its engine in a process of its own). The engine-level oracle with logits is
tests/lora_serve/test_moe_lora.py.
"""

from __future__ import annotations

import copy
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import torch
import transformers

from lora_serve import Engine, EngineConfig
from lora_serve.testing import serve_in_subprocess

PROMPT = "Mixture of experts"
NEW_TOKENS = 10
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
ADAPTERS = {"experts": (4, [], EXPERTS), "attn+experts": (12, ["q_proj", "o_proj"], ["mlp.gate.weight", *EXPERTS])}


def tiny_mixtral() -> torch.nn.Module:
    config = transformers.MixtralConfig(
        vocab_size=96, hidden_size=44, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
        head_dim=12, intermediate_size=40, num_local_experts=6, num_experts_per_tok=2, max_position_embeddings=128,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(config)
    with torch.no_grad():  # decisive routing and clear logit margins (see test_moe_lora.tiny_moe)
        for name, param in model.named_parameters():
            if param.dim() == 3:
                param.normal_(0.0, 0.1)
            elif name.endswith("gate.weight"):
                param.normal_(0.0, 0.5)
            elif param.dim() > 1:
                param.mul_(4)
    model.set_experts_implementation("eager")
    return model.eval()


def _setup(tmp_path, lora, serve):
    """The base, its adapters under ``tmp_path/adapters``, the tokenizer and each model's expected text."""
    base = tiny_mixtral()
    for seed, (name, (rank, modules, params)) in enumerate(ADAPTERS.items()):
        lora.save_adapter(base, tmp_path / "adapters" / name, rank, modules, seed=seed, std=0.1,
                          target_parameters=params)
    tokenizer = serve.char_tokenizer(vocab_size=96)
    prompt_ids = tokenizer(PROMPT)["input_ids"]
    root = tmp_path / "adapters"
    expected = {name: lora.peft_generate(base, root / name, prompt_ids, NEW_TOKENS) for name in ADAPTERS}
    expected["tiny-mixtral"] = lora.hf_generate(base, prompt_ids, NEW_TOKENS)
    assert len({tuple(t) for t in expected.values()}) == 3  # each adapter changes the tokens
    return base, tokenizer, {m: tokenizer.decode(t, skip_special_tokens=True) for m, t in expected.items()}


def _stream_all(client, expected: dict[str, str]) -> None:
    """Two concurrent streams per model, all in flight together; each must read as expected."""

    def stream(model: str) -> str:
        chunks = client.completions.create(model=model, prompt=PROMPT, max_tokens=NEW_TOKENS, temperature=0,
                                           stream=True)
        return "".join(c.choices[0].text for c in chunks if c.choices)

    models = [*expected] * 2
    with ThreadPoolExecutor(len(models)) as pool:
        texts = list(pool.map(stream, models))
    for model, text in zip(models, texts):
        assert text == expected[model], model


def test_concurrent_streams_of_expert_adapters_equal_peft(tmp_path, lora, serve):
    base, tokenizer, expected = _setup(tmp_path, lora, serve)
    engine = Engine(copy.deepcopy(base), tokenizer, EngineConfig(pool_slots=8000, max_batch_tokens=64))
    for name in ADAPTERS:
        engine.add_adapter(name, tmp_path / "adapters" / name)
    server = serve.start_server(engine, serve.ServerConfig(model_name="tiny-mixtral",
                                                           adapter_root=tmp_path / "adapters", api_key=serve.API_KEY))
    try:
        _stream_all(server.openai(), expected)
        server.wait_until_idle()
    finally:
        server.stop()


@pytest.mark.slow  # a lora-serve process
def test_lora_serve_command_streams_expert_adapters_equal_peft(tmp_path, lora, serve):
    base, tokenizer, expected = _setup(tmp_path, lora, serve)
    base.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    args = ["--model", str(tmp_path / "model"), "--adapter-root", str(tmp_path / "adapters"), "--pool-slots", "8000",
            "--served-model-name", "tiny-mixtral", "--api-key", serve.API_KEY]
    with serve_in_subprocess(args) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=serve.API_KEY, max_retries=0, timeout=120)
        _stream_all(client, expected)
