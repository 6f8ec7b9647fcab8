"""Errors as every endpoint returns them: ``{"error": {"message", "type", "code"}}`` (OpenAI's
shape), with a message that says what is wrong."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from kvtier.server import ipc

logger = logging.getLogger(__name__)

# status -> (OpenAI error type, default code)
_KINDS: dict[int, tuple[str, str]] = {
    400: ("invalid_request_error", "invalid_request"),
    401: ("authentication_error", "invalid_api_key"),
    404: ("not_found_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    413: ("invalid_request_error", "request_too_large"),
    429: ("rate_limit_error", "queue_full"),
    500: ("server_error", "internal_error"),
    503: ("server_error", "service_unavailable"),
}

# status -> Anthropic error type (the Messages API's error shape)
_ANTHROPIC_KINDS: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
}
# Paths whose errors take Anthropic's shape.
ANTHROPIC_PREFIX = "/v1/messages"

# ReqFailed.kind from the scheduler process -> HTTP status
STATUS_OF_FAILURE = {ipc.INVALID: 400, ipc.QUEUE_FULL: 429, ipc.UNAVAILABLE: 503, ipc.INTERNAL: 500}


class ClientDisconnected(Exception):
    """The HTTP client went away before its answer was ready; its requests were aborted."""


class APIError(Exception):
    """An error response; raise it anywhere in a handler."""

    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type, default_code = _KINDS.get(status, ("invalid_request_error", "error"))
        self.code = code or default_code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "code": self.code}}

    def anthropic_body(self) -> dict[str, Any]:
        """Anthropic's shape, for its Messages API."""
        kind = _ANTHROPIC_KINDS.get(self.status, "api_error" if self.status >= 500 else "")
        return {
            "type": "error",
            "error": {"type": kind or "invalid_request_error", "message": self.message},
        }

    def response(self, anthropic: bool = False) -> JSONResponse:
        body = self.anthropic_body() if anthropic else self.body()
        return JSONResponse(body, status_code=self.status)


def format_validation_error(exc: RequestValidationError, content_type: str = "") -> str:
    """One readable line per problem: ``field.path: what is wrong``."""
    parts = []
    for err in exc.errors():
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        kind = err.get("type", "")
        msg = err.get("msg", "invalid value")
        if kind == "json_invalid":
            ctx = err.get("ctx") or {}
            detail = ctx.get("error", msg)
            parts.append(f"the request body is not valid JSON ({detail})")
        elif not loc and kind in ("missing", "model_attributes_type", "dict_type"):
            hint = ""
            if "json" not in content_type:
                hint = f" (send Content-Type: application/json; got {content_type or 'none'})"
            parts.append("the request body must be a JSON object" + hint)
        elif kind == "extra_forbidden":
            parts.append(f"unknown field '{'.'.join(loc)}'")
        else:
            where = ".".join(loc)
            msg = msg.removeprefix("Value error, ")
            parts.append(f"{where}: {msg}" if where else msg)
    return "; ".join(parts) or "invalid request"


def install_error_handlers(app: FastAPI, on_error: Any = None) -> None:
    """Turn APIError, FastAPI's validation errors (422 -> 400), HTTP errors (404, 405) and
    anything unexpected (500) into the common JSON shape. ``on_error(status)`` is called for
    each (metrics)."""

    def respond(err: APIError, request: Request) -> JSONResponse:
        if on_error is not None:
            on_error(err.status)
        return err.response(anthropic=request.url.path.startswith(ANTHROPIC_PREFIX))

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return respond(exc, request)

    @app.exception_handler(ClientDisconnected)
    async def _gone(request: Request, exc: ClientDisconnected) -> Response:
        # Nobody reads this answer; 499 (nginx's "client closed request") marks it in logs.
        return Response(status_code=499)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        content_type = request.headers.get("content-type", "")
        return respond(APIError(400, format_validation_error(exc, content_type)), request)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            msg = f"no such endpoint: {request.method} {request.url.path}"
        elif exc.status_code == 405:
            msg = f"method {request.method} is not allowed on {request.url.path}"
        else:
            msg = str(exc.detail)
        return respond(APIError(exc.status_code, msg), request)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s", request.url.path)
        return respond(APIError(500, f"internal error: {type(exc).__name__}: {exc}"), request)
