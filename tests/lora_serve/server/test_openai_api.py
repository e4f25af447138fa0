"""The official ``openai`` client against a real server: completions and chat, streamed and not, for the base
model and several adapters, equal PEFT's greedy ``generate`` decoded by the same tokenizer.
"""

from __future__ import annotations

import copy

import openai
import pytest

from lora_serve import Engine, EngineConfig

PROMPT = "Hello, world"
NEW_TOKENS = 12
# name -> (rank, targets); "team/c" checks a nested name (the CLI names root adapters by relative path).
ADAPTERS = {
    "a": (8, ["q_proj", "v_proj"]),
    "b": (4, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    "team/c": (16, ["o_proj", "down_proj"]),
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory, lora, serve):
    root = tmp_path_factory.mktemp("adapters")
    base = lora.tiny_model("llama")
    for seed, (name, (rank, targets)) in enumerate(ADAPTERS.items()):
        lora.save_adapter(base, root / name, rank, targets, seed=seed)
    tokenizer = serve.char_tokenizer()
    engine = Engine(copy.deepcopy(base), tokenizer, EngineConfig(pool_slots=4000, max_batch_tokens=64))
    for name in ADAPTERS:
        engine.add_adapter(name, root / name)
    server = serve.start_server(engine, serve.ServerConfig(model_name="tiny-llama", adapter_root=root,
                                                           api_key=serve.API_KEY))
    yield base, root, tokenizer, server
    server.stop()


def _expected(setup, lora, model: str, prompt_ids: list[int]) -> list[int]:
    """The oracle: transformers' greedy generate for the base model, PEFT's for an adapter."""
    base, root, _, _ = setup
    if model == "tiny-llama":
        return lora.hf_generate(base, prompt_ids, NEW_TOKENS)
    return lora.peft_generate(base, root / model, prompt_ids, NEW_TOKENS)


@pytest.mark.parametrize("model", ["tiny-llama", *ADAPTERS])
def test_completions_equal_peft_generate(setup, lora, model):
    _, _, tokenizer, server = setup
    client = server.openai()
    prompt_ids = tokenizer(PROMPT)["input_ids"]
    expected = _expected(setup, lora, model, prompt_ids)
    expected_text = tokenizer.decode(expected, skip_special_tokens=True)
    if model != "tiny-llama":  # the adapter must matter, or serving the base model instead would pass
        assert expected != _expected(setup, lora, "tiny-llama", prompt_ids)

    whole = client.completions.create(model=model, prompt=PROMPT, max_tokens=NEW_TOKENS, temperature=0)
    assert whole.model == model
    assert whole.choices[0].text == expected_text
    assert whole.usage.prompt_tokens == len(prompt_ids)
    assert whole.usage.completion_tokens == len(expected)
    assert whole.choices[0].finish_reason == ("length" if len(expected) == NEW_TOKENS else "stop")

    chunks = list(client.completions.create(
        model=model, prompt=PROMPT, max_tokens=NEW_TOKENS, temperature=0, stream=True,
        stream_options={"include_usage": True},
    ))
    text_chunks = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].text for c in text_chunks) == expected_text
    assert [c.choices[0].finish_reason for c in text_chunks][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == len(expected)  # the usage chunk closes the stream

    # A prompt given as token ids is served as is.
    by_ids = client.completions.create(model=model, prompt=prompt_ids, max_tokens=NEW_TOKENS, temperature=0)
    assert by_ids.choices[0].text == expected_text


@pytest.mark.parametrize("model", ["tiny-llama", "b"])
def test_chat_completions_use_the_chat_template(setup, lora, model):
    _, _, tokenizer, server = setup
    client = server.openai()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    # Written out by hand, not rendered by the template under test.
    rendered = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    prompt_ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(prompt_ids[:1]) == ["<|im_start|>"]  # markers are single tokens
    expected_text = tokenizer.decode(_expected(setup, lora, model, prompt_ids), skip_special_tokens=True)

    whole = client.chat.completions.create(model=model, messages=messages, max_tokens=NEW_TOKENS, temperature=0)
    assert whole.choices[0].message.role == "assistant"
    assert whole.choices[0].message.content == expected_text
    assert whole.usage.prompt_tokens == len(prompt_ids)

    chunks = list(client.chat.completions.create(
        model=model, messages=messages, max_completion_tokens=NEW_TOKENS, temperature=0, stream=True
    ))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected_text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_models_lists_the_base_model_and_every_adapter(setup):
    _, root, _, server = setup
    models = {m.id: m for m in server.openai().models.list()}
    assert set(models) == {"tiny-llama", *ADAPTERS}
    assert models["team/c"].parent == "tiny-llama" and models["team/c"].root == str(root / "team/c")


def test_sampling_with_a_seed_is_reproducible(setup):
    _, _, _, server = setup
    client = server.openai()

    def sample(seed):
        return client.completions.create(
            model="a", prompt=PROMPT, max_tokens=NEW_TOKENS, temperature=1.5, top_p=0.9, seed=seed,
            extra_body={"top_k": 50, "ignore_eos": True},
        ).choices[0].text

    first = sample(7)
    assert sample(7) == first
    assert len({sample(s) for s in (8, 9, 10)} | {first}) > 1  # a different seed draws differently


def test_metrics_count_served_requests_per_model_and_not_refused_ones(setup):
    _, _, _, server = setup
    client = server.openai()

    def counts():
        return (server.metric("lora_serve_requests_total", model="a", finish_reason="length"),
                server.metric("lora_serve_generation_tokens_total", model="a"),
                server.metric("lora_serve_prompt_tokens_total", model="a"),
                server.metric("lora_serve_http_errors_total", status="400"))

    before = counts()
    client.completions.create(model="a", prompt="abc", max_tokens=5, temperature=0, extra_body={"ignore_eos": True})
    with pytest.raises(openai.BadRequestError):  # refused by the engine: too long for the context
        client.completions.create(model="a", prompt="x" * 300)
    after = counts()
    assert [a - b for a, b in zip(after, before)] == [1, 5, 3, 1]
    assert server.metric("lora_serve_pool_capacity_slots") == 4000
    assert server.metric("lora_serve_adapters", state="registered") == len(ADAPTERS)


def test_api_key_is_required_on_v1_but_not_on_health(setup, serve):
    _, _, _, server = setup
    with pytest.raises(openai.AuthenticationError) as info:
        server.openai(api_key="wrong").models.list()
    assert info.value.body["code"] == "invalid_api_key"
    with server.http() as http:
        response = http.post("/v1/completions", json={"model": "a", "prompt": "x"})
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
        assert http.get("/health").json() == {"status": "ok"}
