"""``python -m kvtier.launch_server --model PATH [every engine flag] [--host --port --api-key]``

Starts the scheduler process (which loads the model), then the HTTP server in this process.
``--model`` is required, as in SGLang: serving a random-weight test model because a flag was
forgotten would look like a working server that answers gibberish. Without it the error says how
to serve the tiny built-in model (``--model builtin:tiny-qwen3``), which runs on a CPU.

SIGTERM or Ctrl-C: new requests get 503, requests in flight are aborted, the scheduler process
exits, and this process exits with code 0.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import socket
import sys
from collections.abc import Callable
from types import FrameType

import uvicorn

from kvtier.server_args import ServerArgs, ServerArgsError

logger = logging.getLogger("kvtier.launch_server")


class _Terminated(Exception):
    """SIGTERM arrived before the HTTP server took over signal handling."""


def no_model_message() -> str:
    import torch

    msg = (
        "--model is required: an HF checkpoint directory, a model in the local HF cache, or a "
        "bundled name"
    )
    if torch.cuda.is_available():
        return msg + " (--model builtin:tiny-qwen3 serves a tiny random-weight test model)"
    return (
        msg + ". No GPU is visible here: to try the server on the CPU, serve the tiny built-in "
        "model with: python -m kvtier.launch_server --model builtin:tiny-qwen3"
    )


def parse_args(argv: list[str] | None = None) -> ServerArgs:
    parser = argparse.ArgumentParser(
        prog="python -m kvtier.launch_server",
        description="Serve a model over HTTP (OpenAI-compatible and SGLang-native APIs).",
    )
    ServerArgs.add_cli_args(parser)
    parser.set_defaults(model_path=None)  # to tell "not given" from the dataclass default
    ns = parser.parse_args(argv)
    if ns.model_path is None:
        parser.error(no_model_message())
    try:
        return ServerArgs.from_cli_args(ns)
    except ServerArgsError as e:
        parser.error(str(e))
    raise AssertionError("unreachable")


def _check_port(host: str, port: int) -> None:
    """Fail before loading the model if the port is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise SystemExit(f"error: cannot listen on {host}:{port} (--host/--port): {e}") from e


class _Server(uvicorn.Server):
    """uvicorn's server, calling ``on_exit`` (on the event loop) at the first exit signal, before
    it starts waiting for open connections."""

    def __init__(self, config: uvicorn.Config, on_exit: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_exit = on_exit
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._loop is not None and not self.should_exit:
            self._loop.call_soon_threadsafe(self._on_exit)
        super().handle_exit(sig, frame)


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise _Terminated


def _ignore(signum: int, frame: FrameType | None) -> None:
    """After the server's graceful shutdown uvicorn re-raises the signal it caught; by then
    there is nothing left to do and the exit code is to be 0."""


def serve(args: ServerArgs) -> int:
    """Run the server until SIGTERM / Ctrl-C; return the exit code."""
    from kvtier.engine import build_tokenizer, setup_logging
    from kvtier.models import resolve_model
    from kvtier.server.engine_client import EngineClient
    from kvtier.server.http_server import begin_shutdown, create_app
    from kvtier.server.scheduler_process import SchedulerProcess, SchedulerStartError
    from kvtier.server.serving import ModelInfo

    setup_logging(args.log_level)
    signal.signal(signal.SIGTERM, _raise_terminated)
    _check_port(args.host, args.port)
    try:
        resolved = resolve_model(args.model_path, args.model_overrides())
    except Exception as e:
        logger.error("%s", e)
        return 1
    proc = SchedulerProcess.spawn(args)
    try:
        # The tokenizer loads here while the scheduler process loads the model.
        tokenizer = build_tokenizer(args, resolved)
        info = proc.wait_ready()
        model = ModelInfo(
            name=args.served_model_name or args.model_path,
            model_path=args.model_path,
            context_length=info["context_length"],
            vocab_size=info["vocab_size"],
        )
        app = create_app(args, EngineClient(proc), tokenizer, model)
        config = uvicorn.Config(
            app,
            host=args.host,
            port=args.port,
            log_level=args.log_level,
            timeout_graceful_shutdown=5,
        )
        server = _Server(config, on_exit=lambda: begin_shutdown(app))
        signal.signal(signal.SIGTERM, _ignore)
        signal.signal(signal.SIGINT, _ignore)
        logger.info("serving %s on http://%s:%d", model.name, args.host, args.port)
        server.run()
        return 0 if server.started else 1
    except SchedulerStartError as e:
        logger.error("the engine failed to start: %s", e)
        return 1
    except (_Terminated, KeyboardInterrupt):
        logger.info("stopped while starting")
        return 0
    finally:
        if proc.is_alive():
            proc.process.terminate()  # its SIGTERM handler stops the loop cleanly
        proc.stop(timeout=5.0)


def main(argv: list[str] | None = None) -> int:
    return serve(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
