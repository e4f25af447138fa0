"""Request and response bodies of the OpenAI-compatible API (the subset this server implements).

Requests are validated here so that a bad value becomes a 400 naming the field before anything reaches
the engine. Extensions follow vLLM's names: ``top_k``, ``ignore_eos`` and ``stop_token_ids`` on the
generation endpoints; ``lora_name`` / ``lora_path`` on the adapter endpoints.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from ..sampling import SamplingParams

# Options of the OpenAI API this server does not implement, with the value that means "off". A request
# that sets one to anything else is rejected rather than silently answered without it.
_UNSUPPORTED_OPTIONS: dict[str, Any] = {
    "n": 1,
    "best_of": 1,
    "echo": False,
    "suffix": None,
    "logprobs": None,
    "top_logprobs": None,
    "logit_bias": None,
    "presence_penalty": 0,
    "frequency_penalty": 0,
    "tools": None,
}


class StreamOptions(BaseModel):
    """``stream_options``: ``include_usage`` adds a last chunk with the token counts."""

    include_usage: bool = False


class _GenerationRequest(BaseModel, extra="allow"):
    """Fields shared by ``/v1/completions`` and ``/v1/chat/completions``."""

    model: str
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=-1)  # vLLM's extension; 0 and -1 both disable it
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] = Field(default_factory=list)
    ignore_eos: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    @model_validator(mode="after")
    def _reject_unsupported(self):
        for name, value in (self.model_extra or {}).items():
            if name in _UNSUPPORTED_OPTIONS and value not in (None, _UNSUPPORTED_OPTIONS[name]):
                raise ValueError(
                    f"{name}={value!r} is not supported by this server "
                    f"(omit it or send {_UNSUPPORTED_OPTIONS[name]!r})"
                )
        return self

    @property
    def include_usage(self) -> bool:
        """Whether a streamed response ends with a usage chunk."""
        return bool(self.stream_options and self.stream_options.include_usage)

    def sampling_params(self, max_tokens: int) -> SamplingParams:
        """The engine's parameters for this request; ``SamplingParams`` raises ``ValueError`` on bad values."""
        stop = [self.stop] if isinstance(self.stop, str) else self.stop or []
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=max(self.top_k, 0),
            seed=self.seed,
            stop=tuple(stop),
            stop_token_ids=tuple(self.stop_token_ids),
            ignore_eos=self.ignore_eos,
        )


class CompletionRequest(_GenerationRequest):
    """``POST /v1/completions``: one prompt, as text or token ids."""

    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int = Field(16, ge=1)  # OpenAI's default for this endpoint

    @field_validator("prompt")
    @classmethod
    def _single_prompt(cls, prompt):
        # The API allows a batch of prompts; this server answers one prompt per request.
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise ValueError(f"only one prompt per request is supported, got {len(prompt)}")
            prompt = prompt[0]
        if not prompt:
            raise ValueError("prompt is empty")
        return prompt


class TextPart(BaseModel):
    """A text part of a chat message's content (the only part type this server understands)."""

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """One message of a conversation."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def as_template_input(self) -> dict[str, str]:
        """The ``{"role", "content"}`` dict chat templates expect, with text parts joined."""
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        return {"role": self.role, "content": content or ""}


class ChatCompletionRequest(_GenerationRequest):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name for max_tokens

    @property
    def requested_max_tokens(self) -> int | None:
        """The output bound the client asked for, under either name (None: the server's default)."""
        return self.max_completion_tokens or self.max_tokens


class LoadLoRAAdapterRequest(BaseModel):
    """``POST /v1/load_lora_adapter``: register the PEFT adapter in ``lora_path`` as ``lora_name``."""

    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)


class UnloadLoRAAdapterRequest(BaseModel):
    """``POST /v1/unload_lora_adapter``.

    ``timeout`` (an extension) is how long to wait for the adapter's in-flight requests before aborting
    them; None uses the server's ``--unload-timeout``.
    """

    lora_name: str = Field(min_length=1)
    timeout: float | None = Field(None, ge=0)


# ---------------------------------------------------------------------------------------------- responses
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
