"""``lora-serve`` with its engine in its own process (the default), end to end over HTTP: the greedy text equals
the in-process engine's and PEFT's, adapters hot-load and unload (an unload aborts the adapter's running stream
after its timeout), a client that goes away aborts its request, and the metrics count it all.
"""

from __future__ import annotations

import os
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from lora_serve import Engine, EngineConfig, SamplingParams
from lora_serve.testing import serve_in_subprocess
from tests.lora_serve.server.step_injection import SLOW_STEP, inject

pytestmark = pytest.mark.slow  # a lora-serve process with its engine process: `make test`, not `make test-fast`
PROMPT = "The pool"


@pytest.fixture(scope="module")
def setup(tmp_path_factory, lora, serve):
    root = tmp_path_factory.mktemp("process_http")
    base = lora.tiny_model("llama")
    base.save_pretrained(root / "model")
    tokenizer = serve.char_tokenizer()
    tokenizer.save_pretrained(root / "model")
    lora.save_adapter(base, root / "adapters" / "ad0", 4, ["q_proj", "v_proj"], seed=0)  # served from the start
    args = ["--model", str(root / "model"), "--pool-slots", "8000", "--served-model-name", "base",
            "--adapter-root", str(root / "adapters"), "--unload-timeout", "0", "--log-level", "warning"]
    env = {**os.environ, "PYTHONPATH": inject(root, SLOW_STEP)}
    with serve_in_subprocess(args, timeout=180, env=env) as server:
        yield base, root, tokenizer, server


def _client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=60)


def test_greedy_text_equals_the_in_process_engine_and_peft(setup, lora):
    base, root, tokenizer, server = setup
    prompt_ids = tokenizer(PROMPT)["input_ids"]
    engine = Engine(str(root / "model"), config=EngineConfig(pool_slots=8000))
    engine.add_adapter("ad0", root / "adapters" / "ad0")
    (expected,) = engine.generate([PROMPT], SamplingParams(max_tokens=12, temperature=0), "ad0")
    assert expected.token_ids == lora.peft_generate(base, root / "adapters" / "ad0", prompt_ids, 12)
    whole = _client(server).completions.create(model="ad0", prompt=PROMPT, max_tokens=12, temperature=0)
    assert whole.choices[0].text == expected.text
    streamed = _client(server).completions.create(model="ad0", prompt=PROMPT, max_tokens=12, temperature=0,
                                                  stream=True)
    assert "".join(chunk.choices[0].text for chunk in streamed) == expected.text


def test_hot_load_then_unload_aborts_the_running_stream(setup, lora):
    base, root, tokenizer, server = setup
    lora.save_adapter(base, root / "adapters" / "ad1", 8, ["o_proj", "down_proj"], seed=1)  # a new adapter
    with httpx.Client(base_url=server.url, timeout=60) as http:
        loaded = http.post("/v1/load_lora_adapter", json={"lora_name": "ad1", "lora_path": "ad1"})
        assert loaded.status_code == 200, loaded.text
        expected = lora.peft_generate(base, root / "adapters" / "ad1", tokenizer(PROMPT)["input_ids"], 8)
        answer = _client(server).completions.create(model="ad1", prompt=PROMPT, max_tokens=8, temperature=0)
        assert answer.choices[0].text == tokenizer.decode(expected, skip_special_tokens=True)

        doomed = _client(server).completions.create(model="ad1", prompt=PROMPT, max_tokens=240, temperature=0,
                                                    stream=True, extra_body={"ignore_eos": True})
        next(doomed)
        unloaded = http.post("/v1/unload_lora_adapter", json={"lora_name": "ad1"})  # --unload-timeout 0
        assert unloaded.status_code == 200 and unloaded.json()["aborted_requests"] == 1
        with pytest.raises(openai.APIError, match="aborted"):
            list(doomed)
        assert "ad1" not in {m.id for m in _client(server).models.list()}
        with pytest.raises(openai.NotFoundError):
            _client(server).completions.create(model="ad1", prompt=PROMPT, max_tokens=2)


def test_a_client_that_goes_away_aborts_its_request(setup, serve):
    server = setup[-1]
    with httpx.Client(base_url=server.url, timeout=60) as http:
        body = {"model": "ad0", "prompt": PROMPT, "stream": True, "max_tokens": 240, "ignore_eos": True}
        with http.stream("POST", "/v1/completions", json=body) as response:
            next(line for line in response.iter_lines() if line.startswith("data: "))
        # Leaving the block closed the connection; the engine process frees the request's pages.
        deadline = time.monotonic() + 30
        while (_metric(http, "lora_serve_requests_total", model="ad0", finish_reason="abort"),
               _metric(http, "lora_serve_pool_slots", use="kv")) != (1, 0):
            assert time.monotonic() < deadline, http.get("/metrics").text
            time.sleep(0.1)


def _metric(http: httpx.Client, name: str, **labels: str) -> float:
    """One sample of ``/metrics`` (0 when absent)."""
    for family in text_string_to_metric_families(http.get("/metrics").text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0
