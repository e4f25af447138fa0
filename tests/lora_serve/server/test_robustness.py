"""Bad input gets OpenAI error bodies and the server keeps serving; disconnects, unloads and heavy concurrent
traffic leave the pool fully free; run-time adapter loads stay under the adapter root; metrics move.
"""

from __future__ import annotations

import asyncio
import copy
import json
import threading
import time

import httpx
import openai
import pytest

from lora_serve import Engine, EngineConfig

NUM_ADAPTERS = 112  # ad0..ad9 for single tests, 100 for the load test, 2 loaded at run time
PROMPT = "The pool"
LONG = {"max_tokens": 200, "temperature": 0, "ignore_eos": True}  # far longer than a test waits for
LONG_CLIENT = {"max_tokens": 200, "temperature": 0, "extra_body": {"ignore_eos": True}}  # the same, for openai


@pytest.fixture(scope="module")
def setup(tmp_path_factory, lora, serve):
    root = tmp_path_factory.mktemp("root")
    outside = tmp_path_factory.mktemp("outside")
    base = lora.tiny_model("qwen2")
    ranks = [4, 8, 16]
    for i in range(NUM_ADAPTERS):
        lora.save_adapter(base, root / f"ad{i}", ranks[i % 3], ["q_proj", "v_proj", "down_proj"][: 1 + i % 3], seed=i)
    lora.save_adapter(base, outside / "evil", 4, ["q_proj"], seed=99)
    (root / "broken").mkdir()
    (root / "broken" / "adapter_config.json").write_text("{not json")
    tokenizer = serve.char_tokenizer()
    # Room for all adapters at once, and a batch bound well under 200 concurrent requests (so they queue).
    config = EngineConfig(pool_slots=60_000, max_batch_tokens=256, max_batch_size=48, max_resident_adapters=128)
    engine = Engine(copy.deepcopy(base), tokenizer, config)
    for i in range(NUM_ADAPTERS - 2):  # the last two are left for the run-time load tests
        engine.add_adapter(f"ad{i}", root / f"ad{i}")
    server = serve.start_server(engine, serve.ServerConfig(
        model_name="base", adapter_root=root, api_key=serve.API_KEY, unload_timeout=0
    ))
    yield base, root, outside, tokenizer, server
    server.stop()


def _auth(serve) -> dict:
    return {"Authorization": f"Bearer {serve.API_KEY}"}


@pytest.mark.parametrize(
    "body, status, param, words",
    [
        (b'{"model": "base", "prompt": ', 400, None, "not valid JSON"),
        ({"model": "nope", "prompt": "x"}, 404, "model", "'nope' does not exist"),
        ({"model": "base", "prompt": "x" * 300}, 400, "prompt", "exceeds the model's context length 256"),
        ({"model": "base", "prompt": "x" * 4000}, 400, "prompt", "4000 characters, more than the 256 tokens"),
        ({"model": "base", "prompt": [5] * 300}, 400, "prompt", "the prompt has 300 tokens"),
        ({"model": "base", "prompt": ""}, 400, "prompt", "prompt is empty"),
        ({"model": "base", "prompt": [[False]]}, 400, "prompt", "token ids must be non-negative integers"),
        ({"model": "base", "prompt": "x", "stop_token_ids": [-1]}, 400, "stop_token_ids.0", "greater than or equal"),
        ({"model": "base", "prompt": "x", "seed": 1.5}, 400, "seed", "valid integer"),
        ({"model": "base", "prompt": "x", "ignore_eos": "yes"}, 400, "ignore_eos", "valid boolean"),
        ({"model": "base", "prompt": "x", "max_tokens": 2.5}, 400, "max_tokens", "valid integer"),
        ({"model": "base", "prompt": "x", "repetition_penalty": 1.2}, 400, None, "repetition_penalty is not supported"),
        ({"model": "base", "prompt": "x", "response_format": {"type": "json_object"}}, 400, None,
         'response_format is not supported by this server (omit it or send {"type": "text"})'),
        ({"model": "base", "prompt": "x", "functions": [{"name": "f"}]}, 400, None, "functions is not supported"),
        ({"model": "base", "prompt": "x", "tool_choice": "auto"}, 400, None, "tool_choice is not supported"),
        ({"model": "base", "prompt": "x", "presence_penalty": 0.5}, 400, None, "presence_penalty is not supported"),
        ({"model": "m" * 300, "prompt": "x"}, 400, "model", "at most 256 characters"),
        ({"model": "base", "prompt": "x", "temperature": -0.5}, 400, "temperature", "greater than or equal to 0"),
        ({"model": "base", "prompt": "x", "top_p": 0}, 400, "top_p", "greater than 0"),
        ({"model": "base", "prompt": "x", "max_tokens": 0}, 400, "max_tokens", "greater than or equal to 1"),
        ({"model": "base", "prompt": "x", "n": 3}, 400, None, "n is not supported by this server (omit it or send 1)"),
        ({"model": "base", "prompt": ["a", "b"]}, 400, "prompt", "only one prompt per request"),
        ({"model": "base", "prompt": [5, 9999]}, 400, "prompt", "outside the vocabulary [0, 211)"),
        ({"model": "base", "prompt": "x", "stop": [""]}, 400, "stop.0", "at least 1 character"),
        ({"prompt": "x"}, 400, "model", "Field required"),
    ],
)
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(setup, serve, body, status, param, words):
    server = setup[-1]
    with server.http() as http:
        kwargs = {"content": body, "headers": {**_auth(serve), "Content-Type": "application/json"}} \
            if isinstance(body, bytes) else {"json": body, "headers": _auth(serve)}
        response = http.post("/v1/completions", **kwargs)
        error = response.json()["error"]
        assert response.status_code == status, error
        assert set(error) == {"message", "type", "param", "code"}
        assert error["param"] == param and words in error["message"], error
        ok = http.post("/v1/completions", json={"model": "ad0", "prompt": "x", "max_tokens": 2}, headers=_auth(serve))
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2


def test_openai_client_raises_typed_errors(setup):
    client = setup[-1].openai()
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="ghost", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="base", prompt="x", temperature=3)


def test_disconnect_mid_stream_aborts_and_frees_pages(setup, serve, slow_steps):
    server = setup[-1]
    aborted_before = server.metric("lora_serve_requests_total", model="ad1", finish_reason="abort")
    with server.http() as http:
        body = {"model": "ad1", "prompt": PROMPT, "stream": True, **LONG}
        with http.stream("POST", "/v1/completions", json=body, headers=_auth(serve)) as response:
            events = (line for line in response.iter_lines() if line.startswith("data: "))
            for _ in range(3):
                json.loads(next(events).removeprefix("data: "))
            assert server.engine.stats().pool.kv > 0  # the request holds KV pages now
        # Leaving the block closes the connection without reading the rest.
    server.wait_until_idle()
    assert server.engine.stats().pool.kv == 0
    assert server.metric("lora_serve_requests_total", model="ad1", finish_reason="abort") == aborted_before + 1


def test_disconnect_while_waiting_for_a_whole_answer_aborts(setup, serve, slow_steps):
    server = setup[-1]
    aborted_before = server.metric("lora_serve_requests_total", model="ad6", finish_reason="abort")
    with httpx.Client(base_url=server.url, timeout=0.5) as http:  # gives up long before 200 tokens
        with pytest.raises(httpx.ReadTimeout):
            http.post("/v1/completions", json={"model": "ad6", "prompt": PROMPT, **LONG}, headers=_auth(serve))
    server.wait_until_idle()
    assert server.metric("lora_serve_requests_total", model="ad6", finish_reason="abort") == aborted_before + 1


def test_runtime_load_is_confined_to_the_adapter_root(setup, lora, serve):
    base, root, outside, tokenizer, server = setup
    with server.http() as http:
        def load(name, path):
            return http.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)},
                             headers=_auth(serve))

        for path in (outside / "evil", f"../{outside.name}/evil", root / ".." / outside.name / "evil"):
            refused = load("evil", path)
            assert refused.status_code == 403 and refused.json()["error"]["code"] == "path_not_allowed", path
        broken = load("broken", "broken")
        assert broken.status_code == 400 and "not valid JSON" in broken.json()["error"]["message"]
        assert str(root) not in broken.json()["error"]["message"]
        assert load("base", "ad98").status_code == 409  # would shadow the base model
        assert load("nothing", "no/such/dir").status_code == 404

        name = f"ad{NUM_ADAPTERS - 2}"
        loaded = load(name, name)  # relative to the root
        assert loaded.status_code == 200 and loaded.json()["parent"] == "base"
        assert load(name, name).status_code == 409  # already loaded
    assert name in {m.id for m in server.openai().models.list()}
    prompt_ids = tokenizer(PROMPT)["input_ids"]
    expected = tokenizer.decode(lora.peft_generate(base, root / name, prompt_ids, 8), skip_special_tokens=True)
    answer = server.openai().completions.create(model=name, prompt=PROMPT, max_tokens=8, temperature=0)
    assert answer.choices[0].text == expected


@pytest.fixture
def slow_steps(setup, monkeypatch):
    """Make each engine step take at least 20 ms, so a request is surely still running when the test acts
    (the tiny model would otherwise finish it before the client has read its first chunk)."""
    engine = setup[-1].engine
    step = engine.step

    def slow_step():
        time.sleep(0.02)
        return step()

    monkeypatch.setattr(engine, "step", slow_step)


def _unload(server, serve, name, timeout=None):
    with server.http() as http:
        body = {"lora_name": name} if timeout is None else {"lora_name": name, "timeout": timeout}
        return http.post("/v1/unload_lora_adapter", json=body, headers=_auth(serve))


def test_unload_waits_for_running_requests(setup, serve, slow_steps):
    server = setup[-1]
    client = server.openai()
    stream = client.completions.create(model="ad2", prompt=PROMPT, stream=True, max_tokens=40, temperature=0,
                                       extra_body={"ignore_eos": True})
    chunks = [next(stream)]  # the request is running
    result = {}
    unloader = threading.Thread(target=lambda: result.update(response=_unload(server, serve, "ad2", timeout=60)))
    unloader.start()
    # While it waits, the adapter takes no new requests, but the running one goes on. The unloader thread
    # may start late on a loaded machine: requests accepted before it marks the adapter are short and fine.
    deadline = time.monotonic() + 30
    with pytest.raises(openai.NotFoundError, match="being unloaded"):
        while time.monotonic() < deadline:
            client.completions.create(model="ad2", prompt=PROMPT, max_tokens=2)
            time.sleep(0.05)
    chunks += list(stream)
    unloader.join(timeout=60)
    assert chunks[-1].choices[0].finish_reason == "length"
    assert result["response"].status_code == 200 and result["response"].json()["aborted_requests"] == 0
    assert "ad2" not in {m.id for m in client.models.list()}
    server.wait_until_idle()


def test_unload_after_timeout_aborts_only_that_adapters_requests(setup, lora, serve, slow_steps):
    base, root, _, tokenizer, server = setup
    client = server.openai()
    doomed = client.completions.create(model="ad3", prompt=PROMPT, stream=True, **LONG_CLIENT)
    other = client.completions.create(model="ad4", prompt=PROMPT, stream=True, max_tokens=40, temperature=0)
    next(doomed)
    text = next(other).choices[0].text
    response = _unload(server, serve, "ad3")  # the server's unload_timeout is 0
    assert response.status_code == 200 and response.json()["aborted_requests"] == 1
    with pytest.raises(openai.APIError, match="aborted"):
        list(doomed)
    # The neighbour in the same batches is untouched: its whole text still matches PEFT.
    text += "".join(c.choices[0].text for c in other)
    prompt_ids = tokenizer(PROMPT)["input_ids"]
    assert text == tokenizer.decode(lora.peft_generate(base, root / "ad4", prompt_ids, 40), skip_special_tokens=True)
    server.wait_until_idle()
    assert _unload(server, serve, "ad3").status_code == 404


def test_unloading_the_adapter_of_the_only_running_request_ends_its_stream(setup, serve, slow_steps):
    # Nothing else runs, so the engine has no other work that would flush a pending abort.
    server = setup[-1]
    doomed = server.openai().completions.create(model="ad5", prompt=PROMPT, stream=True, **LONG_CLIENT)
    next(doomed)
    assert _unload(server, serve, "ad5").json()["aborted_requests"] == 1
    with pytest.raises(openai.APIError, match="aborted"):
        list(doomed)
    server.wait_until_idle()
    assert server.metric("lora_serve_requests_total", model="ad5", finish_reason="abort") == 1


def test_concurrent_streams_over_many_adapters_with_hot_load_and_unload(setup, serve):
    server = setup[-1]
    client = server.async_openai()
    adapters = [f"ad{i}" for i in range(10, NUM_ADAPTERS - 2)]
    assert len(adapters) == 100
    loads_before = server.metric("lora_serve_adapter_loads_total")
    tokens_before = server.metric("lora_serve_generation_tokens_total", model="ad10")

    async def one(i):
        stream = await client.completions.create(model=adapters[i % len(adapters)], prompt=f"{PROMPT} {i}",
                                                 stream=True, max_tokens=6, temperature=0,
                                                 extra_body={"ignore_eos": True})
        return [chunk async for chunk in stream]

    async def churn():
        # Adapter management while traffic runs: load one, unload another nobody uses.
        with server.http() as http:
            late = f"ad{NUM_ADAPTERS - 1}"
            loaded = await asyncio.to_thread(http.post, "/v1/load_lora_adapter",
                                             json={"lora_name": late, "lora_path": late}, headers=_auth(serve))
        return loaded.status_code, (await asyncio.to_thread(_unload, server, serve, "ad0")).status_code

    async def run():
        return await asyncio.gather(churn(), *(one(i) for i in range(200)))

    statuses, *results = asyncio.run(run())
    assert statuses == (200, 200)
    assert all(r[-1].choices[0].finish_reason == "length" for r in results)
    server.wait_until_idle()
    stats = server.engine.stats()
    assert stats.pool.free + stats.pool.adapters == stats.pool.total
    assert server.metric("lora_serve_adapter_loads_total") > loads_before
    assert server.metric("lora_serve_generation_tokens_total", model="ad10") == tokens_before + 2 * 6  # i = 0, 100
    assert server.metric("lora_serve_pool_slots", use="kv") == 0
    assert server.metric("lora_serve_requests_waiting") == 0
    assert server.metric("lora_serve_request_latency_seconds_count") >= 200
