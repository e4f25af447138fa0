"""From a validated OpenAI request to engine outputs and back: model resolution, prompt encoding, the
request's stream through the engine, and the two answer shapes (one JSON body, or server-sent events).

Completions and chat completions differ only in how the prompt is built and how an answer is wrapped
(``CompletionFormat`` / ``ChatFormat``); everything else is shared.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass

from pydantic import BaseModel

from ..output_streams import EngineDeadError, OutputStreams
from ..request import FinishReason, RequestOutput, RequestTooLargeError
from ..sampling import SamplingParams
from .adapters import AdapterUsage
from .config import ServerConfig
from .errors import APIError
from .metrics import ServerMetrics
from .protocol import ChatCompletionRequest, CompletionRequest
from .responses import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionChunk,
    CompletionResponse,
    Delta,
    Usage,
)


def _aborted() -> APIError:
    return APIError(
        503, "the request was aborted: its adapter was unloaded or the server is shutting down",
        type="server_error", code="request_aborted",
    )


def _too_long(message: str) -> APIError:
    return APIError(400, message, param="prompt", code="context_length_exceeded")


@dataclass
class CompletionFormat:
    """Wraps text in ``/v1/completions`` bodies."""

    id: str
    model: str

    def opening(self) -> list[BaseModel]:
        """Chunks sent before any text (none for completions)."""
        return []

    def chunk(self, text: str, finish_reason: str | None) -> BaseModel:
        """A streamed increment."""
        return CompletionChunk(
            id=self.id, model=self.model, choices=[CompletionChoice(text=text, finish_reason=finish_reason)]
        )

    def usage_chunk(self, usage: Usage) -> BaseModel:
        """The last chunk of a stream asked to include usage."""
        return CompletionChunk(id=self.id, model=self.model, choices=[], usage=usage)

    def response(self, text: str, finish_reason: str, usage: Usage) -> BaseModel:
        """The whole answer of a non-streamed request."""
        choice = CompletionChoice(text=text, finish_reason=finish_reason)
        return CompletionResponse(id=self.id, model=self.model, choices=[choice], usage=usage)


@dataclass
class ChatFormat:
    """Wraps text in ``/v1/chat/completions`` bodies."""

    id: str
    model: str

    def opening(self) -> list[BaseModel]:
        """OpenAI's first chunk names the role."""
        return [self._chunk(Delta(role="assistant", content=""), None)]

    def chunk(self, text: str, finish_reason: str | None) -> BaseModel:
        """A streamed increment."""
        return self._chunk(Delta(content=text or None), finish_reason)

    def usage_chunk(self, usage: Usage) -> BaseModel:
        """The last chunk of a stream asked to include usage."""
        return ChatCompletionChunk(id=self.id, model=self.model, choices=[], usage=usage)

    def response(self, text: str, finish_reason: str, usage: Usage) -> BaseModel:
        """The whole answer of a non-streamed request."""
        choice = ChatChoice(message=AssistantMessage(content=text), finish_reason=finish_reason)
        return ChatCompletionResponse(id=self.id, model=self.model, choices=[choice], usage=usage)

    def _chunk(self, delta: Delta, finish_reason: str | None) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=self.id, model=self.model, choices=[ChatChunkChoice(delta=delta, finish_reason=finish_reason)]
        )


def prompt_char_limit(tokenizer, max_context: int | None) -> int | None:
    """The most characters a text prompt may have: a longer one has more tokens than the context holds
    whatever it says (no token is longer than the vocabulary's longest entry), so it is refused before
    tokenizing. None without a tokenizer or a context length."""
    if tokenizer is None or max_context is None:
        return None
    return max_context * max((len(token) for token in tokenizer.get_vocab()), default=1)


class OpenAIServing:
    """Answers generation requests with an ``AsyncEngine`` or ``EngineProcess``; owns the server's metrics
    and adapter usage."""

    def __init__(self, engine: OutputStreams, config: ServerConfig):
        self.engine = engine
        self.config = config
        self.tokenizer = engine.tokenizer
        self.vocab_size = engine.vocab_size
        self.max_context = engine.max_context
        self.metrics = ServerMetrics(engine.stats)
        self.usage = AdapterUsage()
        self.max_prompt_chars = prompt_char_limit(self.tokenizer, self.max_context)

    # -------------------------------------------------------------------------------- requests in
    def resolve_model(self, model: str) -> str | None:
        """The adapter ``model`` names (None for the base model); a 404 for anything else."""
        if model == self.config.model_name:
            return None
        if self.engine.has_adapter(model):
            return model  # one being unloaded is refused by ``usage.hold``
        raise APIError(
            404, f"the model {model!r} does not exist; use {self.config.model_name!r} or an adapter "
            "listed by GET /v1/models", param="model", code="model_not_found",
        )

    async def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        """Token ids of a completion prompt given as text or ids (ids are checked against the vocabulary)."""
        if isinstance(prompt, str):
            self._check_chars(len(prompt))
            return await self._tokenize(prompt, add_special_tokens=True)
        if self.max_context is not None and len(prompt) >= self.max_context:
            raise _too_long(f"the prompt has {len(prompt)} tokens; the model's context length is {self.max_context}")
        bad = [t for t in prompt if not 0 <= t < self.vocab_size]
        if bad:
            raise APIError(400, f"prompt token ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})",
                           param="prompt")
        return prompt

    async def encode_chat(self, request: ChatCompletionRequest) -> list[int]:
        """Token ids of the conversation rendered by the tokenizer's chat template, ready for the reply."""
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise APIError(400, "this model's tokenizer has no chat template; use /v1/completions", param="messages")
        messages = [message.as_template_input() for message in request.messages]
        self._check_chars(sum(len(m["content"]) for m in messages))
        try:
            text = await asyncio.to_thread(
                self.tokenizer.apply_chat_template, messages, add_generation_prompt=True, tokenize=False
            )
        except Exception as err:  # jinja templates reject conversations with raise_exception(...)
            raise APIError(400, f"the chat template rejected the messages: {err}", param="messages") from err
        # The template writes the special tokens (BOS, role markers) itself.
        return await self._tokenize(text, add_special_tokens=False)

    def chat_max_tokens(self, request: ChatCompletionRequest, prompt_tokens: int) -> int:
        """The requested bound, else the server default cut to what the context has left."""
        if request.requested_max_tokens is not None:
            return request.requested_max_tokens
        default, context = self.config.default_max_tokens, self.max_context
        # At least 1, so that a prompt filling the context gets the engine's "exceeds the context" error.
        return max(1, min(default, context - prompt_tokens)) if context else default

    def _check_chars(self, chars: int) -> None:
        if self.max_prompt_chars is not None and chars > self.max_prompt_chars:
            raise _too_long(
                f"the prompt has {chars} characters, more than the {self.max_context} tokens of the model's "
                f"context could hold (at most {self.max_prompt_chars} characters)"
            )

    async def _tokenize(self, text: str, add_special_tokens: bool) -> list[int]:
        """Tokenize in a worker thread: a long text must not stall the event loop (and every other client)."""
        if self.tokenizer is None:
            raise APIError(400, "this model has no tokenizer; send the prompt as token ids", param="prompt")
        encoded = await asyncio.to_thread(self.tokenizer, text, add_special_tokens=add_special_tokens)
        return encoded["input_ids"]

    # -------------------------------------------------------------------------------- answers out
    async def complete(self, request: CompletionRequest):
        """Answer ``/v1/completions`` (a response model, or an event stream when ``stream`` is set)."""
        adapter = self.resolve_model(request.model)
        prompt_ids = await self.encode_prompt(request.prompt)
        params = _sampling(request, request.max_tokens)
        fmt = CompletionFormat(f"cmpl-{uuid.uuid4().hex}", request.model)
        return await self._answer(request, adapter, prompt_ids, params, fmt)

    async def chat(self, request: ChatCompletionRequest):
        """Answer ``/v1/chat/completions``."""
        adapter = self.resolve_model(request.model)
        prompt_ids = await self.encode_chat(request)
        params = _sampling(request, self.chat_max_tokens(request, len(prompt_ids)))
        fmt = ChatFormat(f"chatcmpl-{uuid.uuid4().hex}", request.model)
        return await self._answer(request, adapter, prompt_ids, params, fmt)

    async def _answer(
        self, request, adapter: str | None, prompt_ids: list[int], params: SamplingParams,
        fmt: CompletionFormat | ChatFormat,
    ) -> BaseModel | AsyncIterator[str]:
        outputs = await self._start(request.model, adapter, prompt_ids, params, fmt.id)
        if request.stream:
            return self._events(outputs, fmt, len(prompt_ids), request.include_usage)
        text, tokens, finish_reason = [], 0, None
        async with aclosing(outputs):
            async for output in outputs:
                text.append(output.text)
                tokens += len(output.token_ids)
                finish_reason = output.finish_reason
        return fmt.response("".join(text), finish_reason.value, Usage.of(len(prompt_ids), tokens))

    async def _start(self, model, adapter, prompt_ids, params, request_id: str) -> AsyncIterator[RequestOutput]:
        """Submit the request and wait for its first output, so that a bad request fails before any reply."""
        outputs = self._outputs(model, adapter, prompt_ids, params, request_id)
        try:
            first = await anext(outputs)
        except KeyError as err:  # the adapter was removed between resolve_model and submit
            raise APIError(404, err.args[0], param="model", code="model_not_found") from err
        except RequestTooLargeError as err:  # prompt + max_tokens too long for the context or the pool
            raise _too_long(str(err)) from err
        except ValueError as err:
            raise APIError(400, str(err), param="prompt") from err
        return _prepend(first, outputs)

    async def _outputs(self, model, adapter, prompt_ids, params, request_id) -> AsyncIterator[RequestOutput]:
        """The request's outputs through the engine; an aborted or failed request raises its ``APIError``."""
        with self.usage.hold(adapter, request_id):
            stream = self.engine.stream(prompt_ids, params, adapter, request_id)
            tracked = self.metrics.track(model, len(prompt_ids), stream)
            try:
                async with aclosing(tracked):
                    async for output in tracked:
                        if output.finish_reason is FinishReason.ABORT:
                            raise _aborted()
                        if output.finish_reason is FinishReason.ERROR:
                            raise APIError(500, f"the engine failed to serve this request ({output.error})",
                                           type="server_error", code="request_failed")
                        yield output
            except EngineDeadError as err:
                raise APIError(503, f"the engine has failed ({err.__cause__!r}); the server is shutting down",
                               type="server_error", code="engine_failed") from err

    async def _events(self, outputs, fmt, prompt_tokens: int, include_usage: bool) -> AsyncIterator[str]:
        """Server-sent events in OpenAI's chunk format, ending with ``data: [DONE]``.

        A request that fails once streaming has begun ends with an error event (the status is sent).
        """
        tokens = 0
        for chunk in fmt.opening():
            yield _event(chunk.model_dump_json())
        try:
            async with aclosing(outputs):
                async for output in outputs:
                    tokens += len(output.token_ids)
                    finish_reason = output.finish_reason.value if output.finished else None
                    if output.text or finish_reason:
                        yield _event(fmt.chunk(output.text, finish_reason).model_dump_json())
            if include_usage:
                yield _event(fmt.usage_chunk(Usage.of(prompt_tokens, tokens)).model_dump_json())
        except APIError as err:
            self.metrics.count_error(err.status)
            yield _event(json.dumps(err.body()))
        yield _event("[DONE]")


def _sampling(request, max_tokens: int) -> SamplingParams:
    try:
        return request.sampling_params(max_tokens)
    except ValueError as err:
        raise APIError(400, str(err)) from err


async def _prepend(first: RequestOutput, rest: AsyncIterator[RequestOutput]) -> AsyncIterator[RequestOutput]:
    yield first
    async with aclosing(rest):  # closing this stream must reach the engine's, which aborts the request
        async for output in rest:
            yield output


def _event(data: str) -> str:
    return f"data: {data}\n\n"
