"""The FastAPI application: OpenAI-compatible generation, model listing, adapter hot-loading, health and
metrics, around one ``Engine``.

``create_app(engine, config)`` returns the app. ``engine`` is a running ``EngineProcess`` (the engine in its
own process, what ``lora-serve`` uses) or an ``Engine``, which the lifespan steps in a thread
(``AsyncEngine``). Either is stopped on shutdown, after uvicorn has let in-flight requests finish (or
cancelled them, which aborts them in the engine).

What a request may cost is bounded before it reaches a handler: the API key is checked before the body
is read, bodies over ``max_body_bytes`` get a 413 (by their Content-Length, or as a streamed body passes
the limit), and tokenizing runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from fastapi import APIRouter, FastAPI, Request, Security
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from fastapi.security import HTTPBearer
from pydantic import BaseModel
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from ..adapter_store import AdapterError
from ..async_engine import AsyncEngine
from ..engine import AdapterInfo, Engine
from ..output_streams import OutputStreams
from .adapters import resolve_under_root
from . import fine_tuning_routes
from .config import ServerConfig
from .errors import APIError, install_error_handlers
from .openapi import ModelLimits, errors, generation_responses, install_openapi
from .protocol import ChatCompletionRequest, CompletionRequest, LoadLoRAAdapterRequest, UnloadLoRAAdapterRequest
from .responses import (
    ChatCompletionChunk,
    ChatCompletionResponse,
    CompletionChunk,
    CompletionResponse,
    ModelCard,
    ModelList,
    UnloadedAdapter,
)
from .serving import OpenAIServing, prompt_char_limit

_bearer = HTTPBearer(auto_error=False)
_ABORT_GRACE_S = 5.0  # how long an unload waits for the streams it aborted to end
_DISCONNECT_POLL_S = 0.25


def _serving(request: Request) -> OpenAIServing:
    return request.app.state.serving


class _RequestGuard:
    """ASGI middleware: before any body is read, a 401 for ``/v1/*`` without ``Authorization: Bearer
    <api_key>`` (when the server has a key) and a 413 for a ``Content-Length`` over ``max_bytes``; a body
    streamed without one gets its 413 as soon as it passes the limit.

    (FastAPI reads and parses a body before it runs a route's dependencies, and its own ``max_body_size``
    answers in plain text, even to a request that should get a 401: hence one guard in front of both.)
    """

    def __init__(self, app: ASGIApp, api_key: str | None, max_bytes: int, on_error: Callable[[int], None],
                 upload_bytes: int | None = None):
        self.app, self._default_max, self._on_error = app, max_bytes, on_error
        self._upload_max = upload_bytes  # POST /v1/files: a training file plus its multipart framing
        self._expected = None if api_key is None else api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        error = None
        upload = self._upload_max is not None and scope["path"] == "/v1/files" and scope["method"] == "POST"
        limit = self._upload_max + 2**16 if upload else self._default_max
        if self._expected is not None and scope["path"].startswith("/v1/"):
            scheme, _, key = headers.get("authorization", "").partition(" ")
            # compare_digest: the time taken must not reveal how much of a guessed key was right.
            if scheme.lower() != "bearer" or not secrets.compare_digest(key.strip().encode(), self._expected):
                error = APIError(401, "missing or incorrect API key; send 'Authorization: Bearer <key>'",
                                 code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        length = headers.get("content-length", "")
        if error is None and length.isdigit() and int(length) > limit:
            error = APIError(413, f"{scope['method']} {scope['path']}: {_too_large(limit).detail}")
        if error is not None:
            self._on_error(error.status)
            await error.response()(scope, receive, send)
            return
        received = 0

        async def receive_at_most() -> dict:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:
                # Raised inside FastAPI's body parsing, which passes HTTPExceptions on to the error handlers.
                raise _too_large(limit)
            return message

        await self.app(scope, receive_at_most, send)



def _too_large(limit: int) -> HTTPException:
    return HTTPException(413, f"the request body is larger than this server's limit of {limit} bytes")


async def _answer(
    request: Request, work: Awaitable[BaseModel | AsyncIterator[str]]
) -> BaseModel | Response:
    """Await ``work`` (a whole answer, or the start of a stream), cancelling it if the client goes away.

    Cancelling aborts the request in the engine. Starlette only notices a disconnect once a stream is
    being sent, so until then (queueing, prefill, a whole non-streamed generation) this polls for it.
    """
    task = asyncio.ensure_future(work)
    try:
        while not (await asyncio.wait({task}, timeout=_DISCONNECT_POLL_S))[0]:
            if await request.is_disconnected():
                return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
        answer = task.result()
    finally:
        task.cancel()  # no-op once done; otherwise (disconnect, or this handler cancelled) aborts the request
    if isinstance(answer, BaseModel):
        return answer
    return StreamingResponse(answer, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


api = APIRouter(prefix="/v1")


@api.post("/completions", response_model=None, responses=generation_responses(CompletionResponse, CompletionChunk))
async def create_completion(body: CompletionRequest, request: Request):
    """OpenAI ``POST /v1/completions``; ``model`` picks an adapter or the base model."""
    return await _answer(request, _serving(request).complete(body))


@api.post("/chat/completions", response_model=None,
          responses=generation_responses(ChatCompletionResponse, ChatCompletionChunk))
async def create_chat_completion(body: ChatCompletionRequest, request: Request):
    """OpenAI ``POST /v1/chat/completions``, prompted through the tokenizer's chat template."""
    return await _answer(request, _serving(request).chat(body))


@api.get("/models", responses=errors(401))
async def list_models(request: Request) -> ModelList:
    """The base model followed by every registered adapter."""
    serving = _serving(request)
    # list_adapters waits for the engine's lock (a running step): keep that off the event loop.
    adapters = await asyncio.to_thread(serving.engine.list_adapters)
    base = ModelCard(id=serving.config.model_name, created=request.app.state.created, root=serving.config.model_path)
    return ModelList(data=[base] + [_adapter_card(serving, a, request.app.state.created) for a in adapters])


@api.post("/load_lora_adapter", responses=errors(400, 401, 403, 404, 409, 413))
async def load_lora_adapter(body: LoadLoRAAdapterRequest, request: Request) -> ModelCard:
    """Register the PEFT adapter at ``lora_path`` (under the adapter root) as ``lora_name``."""
    serving = _serving(request)
    name = body.lora_name
    if name == serving.config.model_name or serving.engine.has_adapter(name):
        raise APIError(409, f"a model named {name!r} is already served", param="lora_name", code="model_exists")
    path = resolve_under_root(serving.config.adapter_root, body.lora_path)
    try:
        info = await serving.engine.add_adapter(name, path)
    except AdapterError as err:
        raise APIError(400, str(err), param="lora_path", code="invalid_adapter") from err
    return _adapter_card(serving, info, int(time.time()))


@api.post("/unload_lora_adapter", responses=errors(400, 401, 404, 409, 413))
async def unload_lora_adapter(body: UnloadLoRAAdapterRequest, request: Request) -> UnloadedAdapter:
    """Unregister an adapter: refuse new requests for it, wait for its running ones, abort the rest."""
    serving = _serving(request)
    name = body.lora_name
    if not serving.engine.has_adapter(name):
        raise APIError(404, f"no adapter named {name!r} is loaded", param="lora_name", code="model_not_found")
    timeout = serving.config.unload_timeout if body.timeout is None else body.timeout
    with serving.usage.draining(name):
        running = await serving.usage.wait_idle(name, timeout)
        for request_id in running:
            serving.engine.abort(request_id)  # their clients get a 503 "request_aborted" error
        # The aborts land at the engine's next step, which ends their streams.
        await serving.usage.wait_idle(name, _ABORT_GRACE_S)
        # Normally nothing uses the adapter by now; abort_requests=True covers an engine step slower than
        # the grace period (it ends the same requests directly).
        await serving.engine.remove_adapter(name, abort_requests=True)
    return UnloadedAdapter(id=name, aborted_requests=len(running))


def _adapter_card(serving: OpenAIServing, info: AdapterInfo, created: int) -> ModelCard:
    return ModelCard(id=info.name, created=created, root=info.path, parent=serving.config.model_name)


def create_app(
    engine: Engine | OutputStreams, config: ServerConfig,
    on_engine_failure: Callable[[BaseException], None] | None = None,
) -> FastAPI:
    """The server for ``engine``; the app owns it from startup to shutdown, when it closes it.

    ``engine`` is an ``Engine`` (stepped by an ``AsyncEngine`` thread started at startup, sharing this
    process's GIL) or a running ``EngineProcess`` (the engine in its own process: what ``lora-serve`` uses).
    ``on_engine_failure(error)`` is called (from the engine or reader thread) if the engine dies; the CLI uses
    it to shut the server down and exit non-zero. Until then every request, and ``/health``, answer 503.
    """
    if on_engine_failure is not None and isinstance(engine, OutputStreams):
        engine.on_failure = on_engine_failure

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        async_engine = engine if isinstance(engine, OutputStreams) else AsyncEngine(engine, on_engine_failure)
        app.state.serving = OpenAIServing(async_engine, config)
        app.state.created = int(time.time())
        try:
            async with fine_tuning_routes.serving(app, engine, async_engine, config):
                yield
        finally:
            async_engine.close()

    app = FastAPI(title="lora_serve", summary="OpenAI-compatible multi-LoRA server", lifespan=lifespan)

    def count_error(status: int) -> None:
        serving = getattr(app.state, "serving", None)
        if serving is not None:
            serving.metrics.count_error(status)

    install_error_handlers(app, count_error)
    upload_bytes = config.fine_tuning.max_file_bytes if config.fine_tuning else None
    app.add_middleware(_RequestGuard, api_key=config.api_key, max_bytes=config.max_body_bytes, on_error=count_error,
                       upload_bytes=upload_bytes)
    # With a key, the router documents the bearer scheme (the guard checks it).
    app.include_router(api, dependencies=[Security(_bearer)] if config.api_key else [])
    if config.fine_tuning is not None:
        app.include_router(fine_tuning_routes.router, dependencies=[Security(_bearer)] if config.api_key else [])
    install_openapi(app, ModelLimits(engine.max_context, engine.vocab_size,
                                     prompt_char_limit(engine.tokenizer, engine.max_context)))

    @app.get("/health", responses={200: {"content": {"application/json": {"example": {"status": "ok"}}}},
                                   **errors(503)})
    async def health() -> JSONResponse:
        """200, or 503 once the engine's step loop has died (the server then fails every request)."""
        failure = app.state.serving.engine.error
        if failure is not None:
            return APIError(503, f"the engine failed: {type(failure).__name__}", type="server_error",
                            code="engine_failed").response()
        return JSONResponse({"status": "ok"})

    @app.get("/metrics", response_class=PlainTextResponse,
             responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                              "description": "Prometheus text exposition format 0.0.4"}})
    async def metrics() -> Response:
        """Prometheus text format (unauthenticated, like /health, for scrapers)."""
        body = await asyncio.to_thread(app.state.serving.metrics.render)
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    return app
