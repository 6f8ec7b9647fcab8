"""Server-sent events: ``data: {json}`` per event, ``data: [DONE]`` at the end.

The first output is awaited before the response starts, so that a refused request (full queue,
engine down) still gets its proper status code instead of a 200 stream holding an error.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

from fastapi import Request
from fastapi.responses import StreamingResponse

from kvtier.scheduler.request import ReqOutput
from kvtier.server.errors import APIError
from kvtier.server.serving import Generation, unless_disconnected


class EventFormatter(Protocol):
    def on_output(self, index: int, out: ReqOutput, e2e: float) -> list[dict[str, Any]]:
        """Events for one output of request ``index``."""
        ...

    def on_end(self) -> list[dict[str, Any]]:
        """Events after every request finished (e.g. a usage summary)."""
        ...


def sse(payload: dict[str, Any] | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


def named_sse(payload: dict[str, Any]) -> str:
    """Anthropic's framing: ``event: <type>`` and the JSON; an APIError's body becomes its
    ``error`` event."""
    if "type" not in payload and "error" in payload:
        payload = {"type": "error", "error": payload["error"]}
    data = json.dumps(payload, ensure_ascii=False)
    return f"event: {payload['type']}\ndata: {data}\n\n"


async def sse_response(
    request: Request,
    gen: Generation,
    formatter: EventFormatter,
    *,
    frame: Callable[[dict[str, Any]], str] = sse,
    done: str | None = "[DONE]",
) -> StreamingResponse:
    """Stream ``formatter``'s events, each through ``frame``, then ``done`` (OpenAI's
    ``[DONE]``; None: nothing)."""
    try:
        first = await unless_disconnected(request, gen.__anext__())
    except BaseException:
        gen.close()
        raise

    async def events() -> AsyncIterator[str]:
        # Cancelled when the client disconnects; closing the generation then aborts the
        # requests and frees their pages.
        try:
            item: tuple[int, ReqOutput, float] | None = first
            while item is not None:
                for payload in formatter.on_output(*item):
                    yield frame(payload)
                try:
                    item = await gen.__anext__()
                except StopAsyncIteration:
                    item = None
            for payload in formatter.on_end():
                yield frame(payload)
        except APIError as e:  # failed after the stream started: report it in-band
            yield frame(e.body())
        finally:
            gen.close()
        if done is not None:
            yield sse(done)

    return StreamingResponse(
        events(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
