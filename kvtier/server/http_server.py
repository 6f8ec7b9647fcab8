"""The FastAPI application: routes, request guards, error shapes, and the engine client's
lifetime (connected at startup, scheduler process shut down at exit)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from kvtier.server import anthropic_api, native_api, openai_api, responses_api
from kvtier.server.engine_client import EngineClient
from kvtier.server.errors import install_error_handlers
from kvtier.server.metrics import Metrics
from kvtier.server.middleware import GuardMiddleware, ServerState
from kvtier.server.serving import Frontend, ModelInfo
from kvtier.server_args import ServerArgs

logger = logging.getLogger(__name__)


def create_app(args: ServerArgs, client: EngineClient, tokenizer: Any, model: ModelInfo) -> FastAPI:
    """Build the app around a client of a scheduler process that is already ready."""
    state = ServerState()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await client.start()
        try:
            yield
        finally:
            state.draining = True
            await client.close()
            logger.info("the engine was shut down")

    app = FastAPI(title="kvtier", version="0.1.0", lifespan=lifespan)
    app.state.frontend = Frontend(
        client,
        tokenizer,
        metrics,
        model,
        tool_call_parser=args.tool_call_parser,
        reasoning_parser=args.reasoning_parser,
    )
    app.state.server_args = args
    app.state.server_state = state
    app.include_router(openai_api.router)
    app.include_router(native_api.router)
    app.include_router(anthropic_api.router)
    app.include_router(responses_api.router)
    install_error_handlers(app, on_error=metrics.observe_error)
    app.add_middleware(
        GuardMiddleware,
        state=state,
        api_key=args.api_key,
        max_body_bytes=args.max_request_body_bytes,
        on_error=metrics.observe_error,
    )
    return app


def begin_shutdown(app: FastAPI) -> None:
    """Refuse new requests (503) and end the ones in flight now, so that the server's own
    wait for open connections is short."""
    state: ServerState = app.state.server_state
    if state.draining:
        return
    state.draining = True
    logger.info("shutting down: refusing new requests, aborting %d in flight", _in_flight(app))
    app.state.frontend.client.abort_all("the server is shutting down")


def _in_flight(app: FastAPI) -> int:
    return app.state.frontend.client.num_in_flight
