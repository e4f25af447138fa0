"""Response bodies of the OpenAI-compatible API (the subset this server implements); requests are `protocol`."""

from __future__ import annotations

import time
from typing import Literal

from pydantic import BaseModel, Field


class ErrorDetail(BaseModel):
    """What went wrong: ``param`` names the offending request field, ``code`` a machine-readable reason."""

    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """The body of every error answer (OpenAI's shape)."""

    error: ErrorDetail


class Usage(BaseModel):
    """Token counts of one request."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> Usage:
        """Usage with the total filled in."""
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )


class _Response(BaseModel):
    id: str
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str


class CompletionChoice(BaseModel):
    """A choice of a completion, or its increment in a streamed chunk."""

    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: str | None = None


class CompletionResponse(_Response):
    """The body of a non-streamed completion."""

    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Usage


class CompletionChunk(_Response):
    """One server-sent event of a streamed completion."""

    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Usage | None = None


class AssistantMessage(BaseModel):
    """The message a chat completion returns."""

    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    """A choice of a non-streamed chat completion."""

    index: int = 0
    message: AssistantMessage
    logprobs: None = None
    finish_reason: str


class ChatCompletionResponse(_Response):
    """The body of a non-streamed chat completion."""

    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: Usage


class Delta(BaseModel):
    """The increment of the assistant message in one chunk."""

    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    """A choice's increment in a streamed chat chunk."""

    index: int = 0
    delta: Delta
    logprobs: None = None
    finish_reason: str | None = None


class ChatCompletionChunk(_Response):
    """One server-sent event of a streamed chat completion."""

    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    """An entry of ``/v1/models``: the base model (``parent`` None) or an adapter of it."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "lora_serve"
    root: str  # where it was loaded from
    parent: str | None = None


class ModelList(BaseModel):
    """The body of ``/v1/models``."""

    object: Literal["list"] = "list"
    data: list[ModelCard]


class UnloadedAdapter(BaseModel):
    """The body of a successful ``/v1/unload_lora_adapter``."""

    id: str
    object: Literal["model"] = "model"
    deleted: bool = True
    aborted_requests: int  # requests still running when the wait timed out
