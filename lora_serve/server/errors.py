"""OpenAI-style error bodies: ``{"error": {"message", "type", "param", "code"}}`` for every failure.

Clients such as the ``openai`` package turn these into typed exceptions, so every error path — our
own, FastAPI's request validation, unknown routes, and bugs — answers in this shape.
"""

from __future__ import annotations

import logging
import re
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
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        """The JSON response carrying this error (with its headers, e.g. a 405's ``Allow``)."""
        return JSONResponse(status_code=self.status, content=self.body(), headers=self.headers)

    def body(self) -> dict:
        """The ``{"error": {...}}`` object (also sent as a server-sent event when a stream fails)."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


_FIELD = re.compile(r"^[a-z_][a-z0-9_]*$")
_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _param(location: tuple) -> str | None:
    """The request field a pydantic error location names, without pydantic's tags for union members
    (``str``, ``list[TextPart]``, ``constrained-str``...) and without the leading ``body``."""
    parts = location[1:] if location and location[0] == "body" else location
    kept = [str(part) for part in parts if isinstance(part, int) or (_FIELD.match(part) and part not in _TYPE_TAGS)]
    return ".".join(kept) or None


def _from_validation(error: RequestValidationError) -> APIError:
    """The first problem of a request FastAPI could not parse, naming the field and what was expected.

    Of a field's errors, the one deepest inside the value is reported (for a union, the alternative that
    came closest to matching). The offending value is never echoed back: it may be megabytes long.
    """
    problems = error.errors()
    problem = problems[0]
    if problem["type"] == "json_invalid":
        ctx = problem.get("ctx", {})
        return APIError(400, f"request body is not valid JSON: {ctx.get('error', problem['msg'])}", code="invalid_json")
    field = problem["loc"][:2]
    problem = max((p for p in problems if p["loc"][:2] == field), key=lambda p: len(p["loc"]))
    param = _param(problem["loc"])
    message = problem["msg"].removeprefix("Value error, ")  # pydantic's prefix for our validators' errors
    return APIError(400, f"{param}: {message}" if param else message, param=param)


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
        # Body-size refusals (413) come here too, from the body limit as FastAPI reads the body.
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        return respond(APIError(error.status_code, f"{request.method} {request.url.path}: {error.detail}", kind,
                                headers=error.headers))

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, error: Exception) -> JSONResponse:
        logger.exception("unhandled error in %s %s", request.method, request.url.path)
        phrase = HTTPStatus.INTERNAL_SERVER_ERROR.phrase  # the details are in the log, not echoed to clients
        return respond(APIError(500, f"{phrase}: {type(error).__name__} (see the server log)", "internal_error"))
