"""The FastAPI application: OpenAI-compatible generation, model listing, adapter hot-loading, health and
metrics, around one ``Engine``.

``create_app(engine, config)`` returns the app; its lifespan starts the engine's step thread
(``AsyncEngine``) and stops it on shutdown, after uvicorn has let in-flight requests finish (or
cancelled them, which aborts them in the engine).
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel

from ..adapter_store import AdapterError
from ..async_engine import AsyncEngine
from ..engine import AdapterInfo, Engine
from .adapters import resolve_under_root
from .config import ServerConfig
from .errors import APIError, install_error_handlers
from .protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    LoadLoRAAdapterRequest,
    ModelCard,
    ModelList,
    UnloadedAdapter,
    UnloadLoRAAdapterRequest,
)
from .serving import OpenAIServing

_bearer = HTTPBearer(auto_error=False)
_ABORT_GRACE_S = 5.0  # how long an unload waits for the streams it aborted to end
_DISCONNECT_POLL_S = 0.25


def _serving(request: Request) -> OpenAIServing:
    return request.app.state.serving


def _check_api_key(
    request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)
) -> None:
    """401 unless the request carries ``Authorization: Bearer <api_key>`` (when the server has a key)."""
    expected = _serving(request).config.api_key
    if expected is None:
        return
    # compare_digest: the time taken must not reveal how much of a guessed key was right.
    if credentials is None or not secrets.compare_digest(credentials.credentials.encode(), expected.encode()):
        raise APIError(401, "missing or incorrect API key; send 'Authorization: Bearer <key>'",
                       code="invalid_api_key")


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


api = APIRouter(prefix="/v1", dependencies=[Depends(_check_api_key)])


@api.post("/completions")
async def create_completion(body: CompletionRequest, request: Request):
    """OpenAI ``POST /v1/completions``; ``model`` picks an adapter or the base model."""
    return await _answer(request, _serving(request).complete(body))


@api.post("/chat/completions")
async def create_chat_completion(body: ChatCompletionRequest, request: Request):
    """OpenAI ``POST /v1/chat/completions``, prompted through the tokenizer's chat template."""
    return await _answer(request, _serving(request).chat(body))


@api.get("/models")
async def list_models(request: Request) -> ModelList:
    """The base model followed by every registered adapter."""
    serving = _serving(request)
    # list_adapters waits for the engine's lock (a running step): keep that off the event loop.
    adapters = await asyncio.to_thread(serving.engine.engine.list_adapters)
    base = ModelCard(id=serving.config.model_name, created=request.app.state.created, root=serving.config.model_path)
    return ModelList(data=[base] + [_adapter_card(serving, a, request.app.state.created) for a in adapters])


@api.post("/load_lora_adapter")
async def load_lora_adapter(body: LoadLoRAAdapterRequest, request: Request) -> ModelCard:
    """Register the PEFT adapter at ``lora_path`` (under the adapter root) as ``lora_name``."""
    serving = _serving(request)
    path = resolve_under_root(serving.config.adapter_root, body.lora_path)
    if body.lora_name == serving.config.model_name:
        raise APIError(400, f"lora_name {body.lora_name!r} is the base model's name", param="lora_name")
    try:
        info = await serving.engine.add_adapter(body.lora_name, path)
    except AdapterError as err:
        raise APIError(400, str(err), param="lora_path") from err
    return _adapter_card(serving, info, int(time.time()))


@api.post("/unload_lora_adapter")
async def unload_lora_adapter(body: UnloadLoRAAdapterRequest, request: Request) -> UnloadedAdapter:
    """Unregister an adapter: refuse new requests for it, wait for its running ones, abort the rest."""
    serving = _serving(request)
    name = body.lora_name
    if name not in serving.engine.engine.store:
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


def create_app(engine: Engine, config: ServerConfig) -> FastAPI:
    """The server for ``engine``; the app owns it from startup (its step thread) to shutdown."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        async_engine = AsyncEngine(engine)
        app.state.serving = OpenAIServing(async_engine, config)
        app.state.created = int(time.time())
        try:
            yield
        finally:
            async_engine.close()

    app = FastAPI(title="lora_serve", summary="OpenAI-compatible multi-LoRA server", lifespan=lifespan)
    install_error_handlers(app, lambda status: app.state.serving.metrics.count_error(status))
    app.include_router(api)

    @app.get("/health")
    async def health() -> JSONResponse:
        """200, or 503 once a request has found the engine's step loop dead (it then fails every request)."""
        failure = app.state.serving.engine_failure
        if failure is not None:
            return APIError(503, f"the engine failed: {failure.__cause__!r}", type="server_error").response()
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        """Prometheus text format (unauthenticated, like /health, for scrapers)."""
        body = await asyncio.to_thread(app.state.serving.metrics.render)
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    return app

