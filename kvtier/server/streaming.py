"""Server-sent events: ``data: {json}`` per event, ``data: [DONE]`` at the end.

The first output is awaited before the response starts, so that a refused request (full queue,
engine down) still gets its proper status code instead of a 200 stream holding an error.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
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


async def sse_response(
    request: Request, gen: Generation, formatter: EventFormatter
) -> StreamingResponse:
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
                    yield sse(payload)
                try:
                    item = await gen.__anext__()
                except StopAsyncIteration:
                    item = None
            for payload in formatter.on_end():
                yield sse(payload)
        except APIError as e:  # failed after the stream started: report it in-band
            yield sse(e.body())
        finally:
            gen.close()
        yield sse("[DONE]")

    return StreamingResponse(
        events(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
