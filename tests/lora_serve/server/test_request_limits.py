"""Issue 16 regressions over HTTP: what one request may cost (body size, auth before the body, tokenizing
off the event loop, no echoed inputs), one failing request or a dead engine, and the served OpenAPI document.
"""

from __future__ import annotations

import copy
import socket
import threading

import httpx
import pytest

from lora_serve import Engine, EngineConfig

LIMIT = 64 * 1024


@pytest.fixture(scope="module")
def setup(lora, serve):
    base = lora.tiny_model("llama")
    tokenizer = serve.char_tokenizer()
    engine = Engine(copy.deepcopy(base), tokenizer, EngineConfig(pool_slots=4000))
    server = serve.start_server(engine, serve.ServerConfig(model_name="base", api_key=serve.API_KEY,
                                                           max_body_bytes=LIMIT))
    yield base, tokenizer, server
    server.stop()


def _auth(serve) -> dict:
    return {"Authorization": f"Bearer {serve.API_KEY}"}


def _raw(server, head: bytes) -> bytes:
    """Send ``head`` (request line and headers, no body) and read the answer the server gives anyway."""
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(head)
        answer = b""
        while b"\r\n\r\n" not in answer or len(answer.partition(b"\r\n\r\n")[2]) < _length(answer):
            answer += sock.recv(65536)
        return answer


def _length(answer: bytes) -> int:
    for line in answer.partition(b"\r\n\r\n")[0].lower().split(b"\r\n"):
        if line.startswith(b"content-length:"):
            return int(line.split(b":")[1])
    return 0


def test_api_key_is_checked_before_the_body_is_read(setup):
    server = setup[-1]
    # A 32 MB body is announced but never sent: a server that read it first would wait until the timeout.
    answer = _raw(server, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                          b"Content-Length: 33554432\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 401 ") and b"invalid_api_key" in answer, answer[:300]


def test_bodies_over_the_limit_get_413_by_header_and_when_streamed(setup, serve):
    server = setup[-1]
    auth = f"Authorization: Bearer {serve.API_KEY}\r\n".encode()
    answer = _raw(server, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + auth +
                  b"Content-Length: 33554432\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:300]

    def chunks():  # no Content-Length: the limit must hold as the body arrives
        yield b'{"model": "base", "prompt": "'
        for _ in range(2 * LIMIT // 4096):
            yield b"x" * 4096
        yield b'"}'

    with server.http() as http:
        response = http.post("/v1/completions", content=chunks(), headers=_auth(serve))
        assert response.status_code == 413, response.text
        assert response.json()["error"]["type"] == "invalid_request_error"
        ok = http.post("/v1/completions", json={"model": "base", "prompt": "hi", "max_tokens": 2}, headers=_auth(serve))
        assert ok.status_code == 200


def test_errors_never_echo_the_input(setup, serve):
    server = setup[-1]
    huge = [1e300 + i for i in range(5000)]  # floats are no token ids
    with server.http() as http:
        for body in ({"model": "base", "prompt": huge}, {"model": "base", "prompt": "x", "stop": [["a"] * 5000]},
                     {"model": "base", "messages": [{"role": "user", "content": list(range(5000))}]}):
            path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
            response = http.post(path, json=body, headers=_auth(serve))
            assert response.status_code == 400 and len(response.content) < 500, response.text[:1000]


def test_tokenizing_runs_off_the_event_loop(setup, serve, monkeypatch):
    _, tokenizer, server = setup
    serving = server.server.config.app.state.serving  # the app's OpenAIServing
    started, release = threading.Event(), threading.Event()
    real = serving.tokenizer

    class Blocking:
        def __call__(self, text, **kwargs):
            started.set()
            release.wait(timeout=60)
            return real(text, **kwargs)

        def __getattr__(self, name):
            return getattr(real, name)

    monkeypatch.setattr(serving, "tokenizer", Blocking())
    result = {}

    def complete():
        with server.http() as http:
            result["response"] = http.post("/v1/completions", json={"model": "base", "prompt": "slow", "max_tokens": 2},
                                           headers=_auth(serve))

    worker = threading.Thread(target=complete)
    worker.start()
    try:
        assert started.wait(timeout=30)
        with httpx.Client(base_url=server.url, timeout=30) as http:  # the loop answers while tokenizing blocks
            assert http.get("/health").json() == {"status": "ok"}
    finally:
        release.set()
        worker.join(timeout=60)
    assert result["response"].status_code == 200


def test_a_request_failing_in_the_engine_gets_500_and_the_rest_go_on(setup, serve, monkeypatch):
    _, _, server = setup
    import lora_serve.sampling as sampling

    real = sampling.sample

    def poisoned(logits, params, generators):
        logits = logits.clone()
        for row, p in enumerate(params):
            if not p.greedy:
                logits[row] = float("nan")
        return real(logits, params, generators)

    monkeypatch.setattr("lora_serve.engine.sample", poisoned)
    with server.http() as http:
        failed = http.post("/v1/completions", json={"model": "base", "prompt": "a", "temperature": 0.5},
                           headers=_auth(serve))
        assert failed.status_code == 500 and failed.json()["error"]["code"] == "request_failed", failed.text
        ok = http.post("/v1/completions", json={"model": "base", "prompt": "a", "temperature": 0, "max_tokens": 3},
                       headers=_auth(serve))
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3
        assert http.get("/health").status_code == 200
    server.wait_until_idle()


def test_openapi_documents_what_the_server_answers(setup, serve):
    server = setup[-1]
    with server.http() as http:
        spec = http.get("/openapi.json").json()
        wrong_method = http.get("/v1/completions", headers=_auth(serve))
    assert wrong_method.status_code == 405 and wrong_method.headers["allow"] == "POST"
    completions = spec["paths"]["/v1/completions"]["post"]
    assert set(completions["responses"]) == {"200", "400", "401", "404", "413", "500", "503"}
    assert set(completions["responses"]["200"]["content"]) == {"application/json", "text/event-stream"}
    assert completions["responses"]["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/CompletionResponse"}
    assert all("422" not in op["responses"] for path in spec["paths"].values() for op in path.values())
    assert set(spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == {"text/plain"}
    request = spec["components"]["schemas"]["CompletionRequest"]["properties"]
    assert request["max_tokens"]["maximum"] == 255  # the tiny model's context is 256 tokens
    token_ids = next(o for o in request["prompt"]["anyOf"] if o.get("items", {}).get("type") == "integer")
    assert token_ids["items"] == {"type": "integer", "minimum": 0, "maximum": 210} and token_ids["maxItems"] == 255
    assert request["repetition_penalty"]["anyOf"] == [{"const": 1}, {"type": "null"}]
