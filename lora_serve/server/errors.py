"""OpenAI-style error bodies: ``{"error": {"message", "type", "param", "code"}}`` for every failure.

Clients such as the ``openai`` package turn these into typed exceptions, so every error path — our
own, FastAPI's request validation, unknown routes, and bugs — answers in this shape.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

logger = logging.getLogger(__name__)


class APIError(Exception):
    """An error answered to the client with HTTP ``status`` and an OpenAI error body."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def response(self) -> JSONResponse:
        """The JSON response carrying this error."""
        return JSONResponse(status_code=self.status, content=self.body())

    def body(self) -> dict:
        """The ``{"error": {...}}`` object (also sent as a server-sent event when a stream fails)."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _from_validation(error: RequestValidationError) -> APIError:
    """The first problem of a request FastAPI could not parse, naming the field and what was expected."""
    problem = error.errors()[0]
    if problem["type"] == "json_invalid":
        ctx = problem.get("ctx", {})
        return APIError(400, f"request body is not valid JSON: {ctx.get('error', problem['msg'])}", code="invalid_json")
    location = [str(part) for part in problem["loc"] if part != "body"]
    param = ".".join(location) or None
    got = f" (got {problem['input']!r})" if param and "input" in problem else ""
    message = problem["msg"].removeprefix("Value error, ")  # pydantic's prefix for our validators' errors
    return APIError(400, f"{param}: {message}{got}" if param else message, param=param)


def install_error_handlers(app: FastAPI, on_error: Callable[[int], None]) -> None:
    """Answer every exception raised while handling a request with an OpenAI error body.

    ``on_error(status)`` is called for each error response (the server counts them in its metrics).
    """

    def respond(error: APIError) -> JSONResponse:
        on_error(error.status)
        return error.response()

    @app.exception_handler(APIError)
    async def _api_error(request: Request, error: APIError) -> JSONResponse:
        return respond(error)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        return respond(_from_validation(error))

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, error: HTTPException) -> JSONResponse:
        # Unknown routes (404) and wrong methods (405) reach here from Starlette's router.
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        return respond(APIError(error.status_code, f"{request.method} {request.url.path}: {error.detail}", kind))

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, error: Exception) -> JSONResponse:
        logger.exception("unhandled error in %s %s", request.method, request.url.path)
        phrase = HTTPStatus.INTERNAL_SERVER_ERROR.phrase
        return respond(APIError(500, f"{phrase}: {type(error).__name__}: {error}", "internal_error"))
