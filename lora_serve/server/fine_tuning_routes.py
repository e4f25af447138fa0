"""OpenAI's files and fine-tuning jobs endpoints: ``/v1/files`` and ``/v1/fine_tuning/jobs``.

Mounted by ``create_app`` when ``ServerConfig.fine_tuning`` is set. Uploads are multipart (``file``,
``purpose``), parsed with the standard library's MIME parser off the event loop. LoRA options are an
extension: ``"lora": {"r": 8, "alpha": 16, "target_modules": "all-linear" | [names]}`` in the job's body
(with the ``openai`` client: ``extra_body={"lora": {...}}``).
"""

from __future__ import annotations

import asyncio
import contextlib
import email.parser
import email.policy
from collections.abc import AsyncIterator
from typing import Literal

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from ..engine import Engine
from ..fine_tuning import FineTuner, FineTuningService
from ..fine_tuning.data import DataError
from ..fine_tuning.service import JobConflict
from .config import ServerConfig
from .errors import APIError

router = APIRouter(prefix="/v1")
_AUTO = {"n_epochs": 3, "batch_size": 1, "learning_rate_multiplier": 1.0}  # what "auto" means here


class Hyperparameters(BaseModel):
    """OpenAI's supervised hyperparameters, with their ranges."""

    model_config = ConfigDict(extra="forbid")
    n_epochs: Literal["auto"] | int = Field("auto", description="1 to 50 (auto: 3)")
    batch_size: Literal["auto"] | int = Field("auto", description="1 to 256 examples per step (auto: 1)")
    learning_rate_multiplier: Literal["auto"] | float = Field("auto", description="(0, 10] (auto: 1)")


class LoRAOptions(BaseModel):
    """Extension: the LoRA adapter's shape."""

    model_config = ConfigDict(extra="forbid")
    r: int = Field(8, ge=1, le=256)
    alpha: float = Field(16.0, gt=0, le=4096)
    target_modules: Literal["all-linear"] | list[str] = Field("all-linear", min_length=1)


class CreateJobRequest(BaseModel):
    """``POST /v1/fine_tuning/jobs``."""

    model_config = ConfigDict(extra="forbid")
    model: str
    training_file: str
    validation_file: str | None = None
    suffix: str | None = Field(None, max_length=64, pattern=r"^[A-Za-z0-9_.-]*$")
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    hyperparameters: Hyperparameters = Hyperparameters()
    lora: LoRAOptions = LoRAOptions()
    metadata: dict[str, str] | None = None


_RANGES = {"n_epochs": (1, 50), "batch_size": (1, 256), "learning_rate_multiplier": (0, 10)}


def _hyperparameters(given: Hyperparameters) -> dict:
    values = {}
    for name, (low, high) in _RANGES.items():
        value = getattr(given, name)
        value = _AUTO[name] if value == "auto" else value
        if not (low < value <= high if isinstance(value, float) else low <= value <= high):
            raise APIError(400, f"hyperparameters.{name} is {value!r}, expected a value in "
                           f"{'(' if name == 'learning_rate_multiplier' else '['}{low}, {high}] or 'auto'",
                           param=f"hyperparameters.{name}", code="invalid_hyperparameter")
        values[name] = value
    return values


def _service(request: Request) -> FineTuningService:
    return request.app.state.fine_tuning


def _page(data: list[dict], limit: int, after: str | None) -> dict:
    if after is not None:
        ids = [item["id"] for item in data]
        data = data[ids.index(after) + 1 :] if after in ids else []
    return {"object": "list", "data": data[:limit], "has_more": len(data) > limit}


def _not_found(kind: str, item_id: str, param: str | None = None) -> APIError:
    return APIError(404, f"no {kind} with id {item_id!r}", "not_found_error", param=param, code="not_found")


@contextlib.asynccontextmanager
async def serving(app, engine, async_engine, config: ServerConfig) -> AsyncIterator[None]:
    """With ``config.fine_tuning`` set, for the app's lifetime: the service on ``app.state.fine_tuning``, its
    watcher task, and (for an in-process ``Engine``) the trainer attached to the engine. An ``EngineProcess``'s
    engine gets its ``FineTuner`` where it is built (``lora-serve``'s ``start_engine``)."""
    if config.fine_tuning is None:
        yield
        return
    if isinstance(engine, Engine) and engine.background is None:
        engine.attach_background(FineTuner(engine, config.fine_tuning))
    app.state.fine_tuning = FineTuningService(async_engine, config.fine_tuning, config.model_name)
    watcher = asyncio.create_task(app.state.fine_tuning.watch())
    try:
        yield
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher


# ---------------------------------------------------------------------------------------------- files
def _parse_upload(content_type: str, body: bytes) -> dict[str, tuple[str | None, bytes]]:
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode("latin-1") + body)
    if not message.is_multipart():
        raise APIError(400, "expected a multipart/form-data body with fields 'file' and 'purpose'")
    fields = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        fields[name] = (part.get_filename(), part.get_payload(decode=True) or b"")
    return fields


def _file_object(stored) -> dict:
    return {"id": stored.id, "object": "file", "bytes": stored.bytes, "created_at": stored.created_at,
            "filename": stored.filename, "purpose": stored.purpose, "status": "processed", "status_details": None}


@router.post("/files")
async def upload_file(request: Request) -> dict:
    """Upload a JSONL training file (multipart: ``file``, ``purpose="fine-tune"``); validated line by line."""
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        raise APIError(400, f"expected Content-Type multipart/form-data, got {content_type!r}")
    fields = await asyncio.to_thread(_parse_upload, content_type, await request.body())
    for field in ("file", "purpose"):
        if field not in fields:
            raise APIError(400, f"the form has no {field!r} field", param=field)
    filename, data = fields["file"]
    purpose = fields["purpose"][1].decode("utf-8", "replace")
    try:
        stored = await asyncio.to_thread(_service(request).files.add, filename or "", data, purpose)
    except DataError as err:
        raise APIError(400, f"invalid training file: {err}", param="file", code="invalid_file") from None
    except ValueError as err:
        param = "purpose" if "purpose" in str(err) else "file"
        status = 413 if "limit" in str(err) else 400
        raise APIError(status, str(err), param=param, code="invalid_file") from None
    return _file_object(stored)


@router.get("/files")
async def list_files(request: Request) -> dict:
    """Every uploaded file, newest first."""
    return {"object": "list", "data": [_file_object(f) for f in _service(request).files.list()], "has_more": False}


@router.get("/files/{file_id}")
async def retrieve_file(file_id: str, request: Request) -> dict:
    """One file's metadata."""
    try:
        return _file_object(_service(request).files.get(file_id))
    except KeyError:
        raise _not_found("file", file_id) from None


@router.delete("/files/{file_id}")
async def delete_file(file_id: str, request: Request) -> dict:
    """Delete a file (jobs made from it keep their copy)."""
    try:
        _service(request).files.delete(file_id)
    except KeyError:
        raise _not_found("file", file_id) from None
    return {"id": file_id, "object": "file", "deleted": True}


# ---------------------------------------------------------------------------------------------- jobs
@router.post("/fine_tuning/jobs")
async def create_job(body: CreateJobRequest, request: Request) -> dict:
    """Create a fine-tuning job of a LoRA on the served base model; it trains beside inference."""
    service = _service(request)
    try:
        return service.create_job(body.model, body.training_file, body.validation_file, body.suffix, body.seed,
                                  _hyperparameters(body.hyperparameters), body.lora.model_dump())
    except KeyError as err:
        param = err.args[0]
        raise _not_found("file", getattr(body, param), param) from None
    except ValueError as err:
        raise APIError(404, str(err), "not_found_error", param="model", code="model_not_found") from None


def _job_or_404(job_id: str, what):
    try:
        return what(job_id)
    except KeyError:
        raise _not_found("fine-tuning job", job_id) from None


@router.get("/fine_tuning/jobs")
async def list_jobs(request: Request, limit: int = Query(20, ge=1, le=100), after: str | None = None) -> dict:
    """Jobs, newest first (``after``: the last id of the previous page)."""
    return _page(_service(request).list_jobs(), limit, after)


@router.get("/fine_tuning/jobs/{job_id}")
async def retrieve_job(job_id: str, request: Request) -> dict:
    """One job."""
    return _job_or_404(job_id, _service(request).job)


@router.post("/fine_tuning/jobs/{job_id}/cancel")
async def cancel_job(job_id: str, request: Request) -> dict:
    """Cancel a job that is validating files, queued or running (409 once it has finished)."""
    service = _service(request)
    _job_or_404(job_id, service.job)
    try:
        return await service.cancel(job_id)
    except JobConflict as err:
        raise APIError(409, str(err), code="job_not_cancellable") from None


@router.get("/fine_tuning/jobs/{job_id}/events")
async def list_events(job_id: str, request: Request, limit: int = Query(20, ge=1, le=1000),
                      after: str | None = None) -> dict:
    """The job's events, newest first."""
    events = _job_or_404(job_id, _service(request).jobs.events)
    return _page([{"object": "fine_tuning.job.event", **e} for e in events], limit, after)


@router.get("/fine_tuning/jobs/{job_id}/checkpoints")
async def list_checkpoints(job_id: str, request: Request, limit: int = Query(10, ge=1, le=100),
                           after: str | None = None) -> dict:
    """The job's checkpoints (adapter + optimizer + data position every N steps), newest first."""
    return _page(_job_or_404(job_id, _service(request).checkpoints), limit, after)
