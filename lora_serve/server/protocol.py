"""Request bodies of the OpenAI-compatible API (the subset this server implements); responses are `responses`.

Requests are validated here so that a bad value becomes a 400 naming the field before anything reaches
the engine. Extensions follow vLLM's names: ``top_k``, ``ignore_eos`` and ``stop_token_ids`` on the
generation endpoints; ``lora_name`` / ``lora_path`` on the adapter endpoints.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, create_model, field_validator, model_validator

from ..adapter_store import MAX_NAME_LENGTH
from ..sampling import SamplingParams

# Strict parsing: a JSON value is accepted only as the type the schema gives it (no "true" for true, no
# false for 0), so what the schema refuses the server refuses and vice versa.
_STRICT = ConfigDict(strict=True)


def _whole(value):
    """JSON Schema's integers include numbers with a zero fraction (``2.0``); pydantic's strict ints do not."""
    return int(value) if type(value) is float and value.is_integer() else value  # noqa: E721 (not bool)


def _integer(**bounds) -> Any:
    """An integer field type with ``bounds`` (``ge``/``le``) that also takes whole floats, like JSON Schema."""
    return Annotated[int, Field(**bounds), BeforeValidator(_whole)]


TokenId = _integer(ge=0)
PositiveInt = _integer(ge=1)
TopK = _integer(ge=-1)  # vLLM's extension; 0 and -1 both disable it
Seed = _integer()  # any integer (JSON has no bound; seeds equal modulo 2**64 are the same seed)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# Options of the OpenAI / vLLM APIs this server does not implement: name -> (the JSON Schema of the values
# that mean "off", the same test in Python). Any other value is refused with a 400, never silently ignored.
REFUSED_OPTIONS: dict[str, tuple[dict, Callable[[Any], bool]]] = {
    "n": ({"const": 1}, lambda v: _is_number(v) and v == 1),
    "best_of": ({"const": 1}, lambda v: _is_number(v) and v == 1),
    "echo": ({"const": False}, lambda v: v is False),
    "suffix": ({"const": ""}, lambda v: v == ""),
    "logprobs": ({"const": False}, lambda v: v is False),
    "top_logprobs": ({"const": 0}, lambda v: _is_number(v) and v == 0),
    "logit_bias": ({"type": "object", "maxProperties": 0}, lambda v: v == {}),
    "presence_penalty": ({"const": 0}, lambda v: _is_number(v) and v == 0),
    "frequency_penalty": ({"const": 0}, lambda v: _is_number(v) and v == 0),
    "repetition_penalty": ({"const": 1}, lambda v: _is_number(v) and v == 1),
    "tools": ({"type": "array", "maxItems": 0}, lambda v: v == []),
    "tool_choice": ({"const": "none"}, lambda v: v == "none"),
    "functions": ({"type": "array", "maxItems": 0}, lambda v: v == []),
    "function_call": ({"const": "none"}, lambda v: v == "none"),
    "response_format": (
        {"type": "object", "properties": {"type": {"const": "text"}}, "required": ["type"], "additionalProperties": False},
        lambda v: v == {"type": "text"},
    ),
}


def _off_value(off: dict) -> str:
    """The "off" value of a refused option as JSON, for error messages and the schema's description."""
    if "const" in off:
        return json.dumps(off["const"])
    return '{"type": "text"}' if "properties" in off else {"array": "[]", "object": "{}"}[off["type"]]


def _refused_field(off: dict) -> tuple[Any, Any]:
    return Any, Field(
        None, description=f"Not supported by this server: omit it, or send null or {_off_value(off)}.",
        json_schema_extra={"anyOf": [off, {"type": "null"}]},
    )


_RefusedOptions = create_model(
    "_RefusedOptions", __config__=ConfigDict(strict=True, extra="allow"),
    **{name: _refused_field(off) for name, (off, _) in REFUSED_OPTIONS.items()},
)

ModelName = Annotated[str, Field(min_length=1, max_length=MAX_NAME_LENGTH)]
StopString = Annotated[str, Field(min_length=1)]


class StreamOptions(BaseModel):
    """``stream_options``: ``include_usage`` adds a last chunk with the token counts."""

    model_config = _STRICT
    include_usage: bool = False


class _GenerationRequest(_RefusedOptions):
    """Fields shared by ``/v1/completions`` and ``/v1/chat/completions``.

    Unknown fields are ignored (as OpenAI does); the known options this server does not implement are
    refused unless they say "off" (``REFUSED_OPTIONS``).
    """

    model: ModelName
    temperature: float = Field(1.0, ge=0, le=2, description="0 (or below 1e-5) is greedy")
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: TopK = 0
    seed: Seed | None = None
    stop: StopString | list[StopString] | None = Field(None, max_length=16)
    stop_token_ids: list[TokenId] = Field(default_factory=list, max_length=256)
    ignore_eos: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    @model_validator(mode="after")
    def _reject_unsupported(self):
        for name, (off, is_off) in REFUSED_OPTIONS.items():
            value = getattr(self, name)
            if value is not None and not is_off(value):
                raise ValueError(f"{name} is not supported by this server (omit it or send {_off_value(off)})")
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


def _one_prompt(prompt):
    """The single prompt of ``prompt`` (a string, token ids, or a one-element batch of either), checked
    cheaply before pydantic's own validation so a huge wrong value fails at its first bad element."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        # The API allows a batch of prompts; this server answers one prompt per request.
        if len(prompt) != 1:
            raise ValueError(f"only one prompt per request is supported, got {len(prompt)}")
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise ValueError("prompt is empty")
        return prompt
    if not isinstance(prompt, list):
        raise ValueError("prompt must be a string or a list of token ids")
    if not prompt:
        raise ValueError("prompt is empty")
    prompt = [_whole(token) for token in prompt]
    for token in prompt:
        if type(token) is not int or token < 0:  # noqa: E721 (bool is not a token id)
            raise ValueError("prompt token ids must be non-negative integers")
    return prompt


class CompletionRequest(_GenerationRequest):
    """``POST /v1/completions``: one prompt, as text or token ids."""

    prompt: (
        Annotated[str, Field(min_length=1)]
        | Annotated[list[TokenId], Field(min_length=1)]
        | Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1, max_length=1)]
        | Annotated[list[Annotated[list[TokenId], Field(min_length=1)]], Field(min_length=1, max_length=1)]
    )
    max_tokens: PositiveInt = 16  # OpenAI's default for this endpoint

    @field_validator("prompt", mode="before")
    @classmethod
    def _single_prompt(cls, prompt):
        return _one_prompt(prompt)


class TextPart(BaseModel):
    """A text part of a chat message's content (the only part type this server understands)."""

    model_config = _STRICT
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """One message of a conversation."""

    model_config = _STRICT
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
    max_tokens: PositiveInt | None = None
    max_completion_tokens: PositiveInt | None = None  # OpenAI's newer name for max_tokens

    @property
    def requested_max_tokens(self) -> int | None:
        """The output bound the client asked for, under either name (None: the server's default)."""
        return self.max_completion_tokens or self.max_tokens


class LoadLoRAAdapterRequest(BaseModel):
    """``POST /v1/load_lora_adapter``: register the PEFT adapter in ``lora_path`` as ``lora_name``."""

    model_config = _STRICT
    lora_name: ModelName
    lora_path: str = Field(min_length=1, max_length=4096, pattern=r"^[^\x00]+$",
                           description="a directory under the server's adapter root (absolute or relative to it)")


class UnloadLoRAAdapterRequest(BaseModel):
    """``POST /v1/unload_lora_adapter``.

    ``timeout`` (an extension) is how long to wait for the adapter's in-flight requests before aborting
    them; None uses the server's ``--unload-timeout``.
    """

    model_config = _STRICT
    lora_name: ModelName
    timeout: float | None = Field(None, ge=0, le=3600)
