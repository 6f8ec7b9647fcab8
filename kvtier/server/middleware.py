"""Checks made before a request reaches its handler (pure ASGI, so streaming is untouched):
503 while shutting down, 401 without the API key (``/health`` stays open), 413 for a body over
``--max-request-body-bytes`` (by Content-Length, or counted while it is read)."""

from __future__ import annotations

import hmac
import json
from collections.abc import Callable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kvtier.server.errors import ANTHROPIC_PREFIX, APIError

OPEN_PATHS = frozenset({"/health"})


class ServerState:
    """Shared between the middleware and the shutdown path."""

    def __init__(self) -> None:
        self.draining = False


class GuardMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        state: ServerState,
        api_key: str | None,
        max_body_bytes: int,
        on_error: Callable[[int], None] | None = None,
    ) -> None:
        self.app = app
        self.state = state
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes
        self.on_error = on_error

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.state.draining:
            await self._reject(scope, send, 503, "the server is shutting down")
            return
        if self.api_key and scope["path"] not in OPEN_PATHS and not self._authorized(scope):
            await self._reject(
                scope,
                send,
                401,
                "invalid or missing API key: send 'Authorization: Bearer <key>' (or Anthropic's "
                "'x-api-key: <key>')",
            )
            return
        length = _header(scope, b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            await self._reject(scope, send, 413, self._too_large_message())
            return
        await self._call_counting(scope, receive, send)

    async def _call_counting(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Run the app, answering 413 ourselves if the body turns out longer than allowed (e.g.
        chunked uploads without Content-Length)."""
        seen = 0
        rejected = False
        started = False

        async def counting_receive() -> Message:
            nonlocal seen, rejected
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body_bytes and not started and not rejected:
                    rejected = True
                    await self._reject(scope, send, 413, self._too_large_message())
                    # To the app the client is gone; whatever it answers is dropped below.
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if rejected:
                return
            started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except Exception:
            if not rejected:
                raise

    def _authorized(self, scope: Scope) -> bool:
        # OpenAI's "Authorization: Bearer KEY", or Anthropic's "x-api-key: KEY".
        assert self.api_key is not None
        key = self.api_key.encode()
        auth = _header(scope, b"authorization") or ""
        scheme, _, token = auth.partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key):
            return True
        x_key = _header(scope, b"x-api-key")
        return x_key is not None and hmac.compare_digest(x_key.strip().encode(), key)

    def _too_large_message(self) -> str:
        return (
            f"the request body is larger than the limit of {self.max_body_bytes} bytes "
            "(--max-request-body-bytes)"
        )

    async def _reject(self, scope: Scope, send: Send, status: int, message: str) -> None:
        if self.on_error is not None:
            self.on_error(status)
        err = APIError(status, message)
        anthropic = str(scope.get("path", "")).startswith(ANTHROPIC_PREFIX)
        body = json.dumps(err.anthropic_body() if anthropic else err.body()).encode()
        headers: list[tuple[bytes, bytes]] = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ]
        if status == 401:
            headers.append((b"www-authenticate", b"Bearer"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def _header(scope: Scope, name: bytes) -> Any:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return value.decode("latin-1")
    return None
