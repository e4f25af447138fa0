"""The served OpenAPI document, made to say what the server does, so that schema-driven clients and
fuzzers (schemathesis) find it true: each operation lists the error statuses it really answers, all with
OpenAI's error body (FastAPI's default 422 is never answered, so it is dropped); a completion answers JSON
or, with ``stream``, server-sent events; ``/metrics`` is Prometheus text; and the limits that depend on
the loaded model (context length, vocabulary, longest text) are written into the request schemas.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from .responses import ErrorResponse

_ERRORS = {
    400: "Bad request: the body is not valid JSON, breaks the schema, or asks for something this server cannot do. "
         "`code` is `context_length_exceeded` when prompt + max_tokens exceed the model's context or the KV pool "
         "(a limit no JSON Schema can state across two fields).",
    401: "Missing or wrong API key (`Authorization: Bearer <key>`), checked before the body is read.",
    403: "Run-time adapter loading is disabled, or lora_path lies outside the adapter root.",
    404: "The model (adapter) or the adapter directory does not exist.",
    409: "The adapter name is taken, or the adapter is already being unloaded.",
    413: "The request body is larger than the server's limit (--max-body-mb).",
    500: "The engine failed to serve this request (a server bug; the traceback is logged).",
    503: "The request was aborted (its adapter was unloaded, or the server is shutting down), or the engine has "
         "failed and the server is shutting down.",
}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` entries documenting ``statuses`` with the OpenAI error body."""
    return {status: {"model": ErrorResponse, "description": _ERRORS[status]} for status in statuses}


def generation_responses(response_model: type, chunk_model: type) -> dict[int | str, dict[str, Any]]:
    """``responses=`` of a generation endpoint: one JSON body, or an event stream when ``stream`` is true."""
    event = {  # Open API 3.1: the schema of an event stream describes one event
        "type": "object",
        "required": ["data"],
        "properties": {
            "data": {"type": "string", "description": f"a {chunk_model.__name__} as JSON, `[DONE]`, or an error"},
        },
    }
    stream = {"schema": event}
    ok = {
        "model": response_model,
        "description": f"Without `stream`: a {response_model.__name__}. With `stream`: server-sent events, each "
                       f"`data: <{chunk_model.__name__} as JSON>`, ending with `data: [DONE]`; a request that "
                       "fails after the stream began ends with a `data: {\"error\": ...}` event instead.",
        "content": {"text/event-stream": stream},
    }
    return {200: ok, **errors(400, 401, 404, 413, 500, 503)}


@dataclass(frozen=True)
class ModelLimits:
    """Request limits that come from the loaded model; None where the model sets none."""

    context: int | None  # tokens of prompt + completion
    vocab_size: int
    max_prompt_chars: int | None  # longer texts are refused before tokenizing


def install_openapi(app: FastAPI, limits: ModelLimits) -> None:
    """Serve ``app``'s OpenAPI document without FastAPI's 422 answers and with ``limits`` written in."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
            for path in schema["paths"].values():
                for operation in path.values():
                    operation["responses"].pop("422", None)
            components = schema.get("components", {}).get("schemas", {})
            for unused in ("HTTPValidationError", "ValidationError"):
                components.pop(unused, None)
            _write_limits(components, limits)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi


def _members(schema: dict[str, Any], json_type: str) -> list[dict[str, Any]]:
    """The parts of ``schema`` (itself, or its ``anyOf`` alternatives) that describe a ``json_type``."""
    options = schema.get("anyOf", [schema])
    return [option for option in options if option.get("type") == json_type]


def _write_limits(components: dict[str, Any], limits: ModelLimits) -> None:
    token = {"maximum": limits.vocab_size - 1}
    most_tokens = {} if limits.context is None else {"maximum": limits.context - 1}  # a prompt has >= 1 token
    token_list = {} if limits.context is None else {"maxItems": limits.context - 1}
    text = {} if limits.max_prompt_chars is None else {"maxLength": limits.max_prompt_chars}
    completion = components["CompletionRequest"]["properties"]
    for option in _members(completion["prompt"], "string"):
        option.update(text)
    for option in _members(completion["prompt"], "array"):
        items = option["items"]
        if items.get("type") == "string":  # a batch of one text
            items.update(text)
        elif items.get("type") == "integer":  # token ids
            option.update(token_list)
            items.update(token)
        else:  # a batch of one list of token ids
            items.update(token_list)
            items["items"].update(token)
    for option in _members(completion["max_tokens"], "integer"):
        option.update(most_tokens)
    chat = components["ChatCompletionRequest"]["properties"]
    for field in ("max_tokens", "max_completion_tokens"):
        for option in _members(chat[field], "integer"):
            option.update(most_tokens)
