"""The API process's side of the engine: an asyncio client of the scheduler process over ZeroMQ.

Each submitted group of requests gets a ``RequestStream`` with its own asyncio queue; one
background task receives the scheduler's output batches and routes every output to its stream,
another notices when the scheduler process dies and fails everything still waiting (so that no
client hangs).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from typing import Any

import zmq
import zmq.asyncio

from kvtier.scheduler.request import ReqOutput
from kvtier.server import ipc
from kvtier.server.scheduler_process import SchedulerProcess

logger = logging.getLogger(__name__)

WATCH_INTERVAL_S = 0.25


class RequestFailed(Exception):
    """The engine refused or dropped a request; ``kind`` is an ``ipc`` failure kind."""

    def __init__(self, kind: str, message: str, rid: str | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.rid = rid


class ControlError(ValueError):
    """The scheduler refused a control request (e.g. an unknown flush tier)."""


class RequestStream:
    """Outputs of requests submitted together, as ``(index, ReqOutput)`` in arrival order, until
    each one finished. ``close()`` (safe to call at any time, also from a cancelled task) aborts
    the requests that have not finished."""

    def __init__(self, client: EngineClient, rids: list[str]) -> None:
        self._client = client
        self.rids = rids
        self.index = {rid: i for i, rid in enumerate(rids)}
        self.pending = set(rids)
        self.queue: asyncio.Queue[tuple[int, ReqOutput] | RequestFailed] = asyncio.Queue()

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> tuple[int, ReqOutput]:
        if not self.pending:
            raise StopAsyncIteration
        item = await self.queue.get()
        if isinstance(item, RequestFailed):
            self.pending.discard(item.rid or "")
            self.close()
            raise item
        _, out = item
        if out.finished:
            self.pending.discard(out.rid)
        return item

    def close(self) -> None:
        for rid in sorted(self.pending):
            self._client.abort(rid)
        self.pending.clear()


class EngineClient:
    def __init__(self, proc: SchedulerProcess) -> None:
        self.proc = proc
        self._streams: dict[str, RequestStream] = {}
        self._controls: dict[int, asyncio.Future[ipc.ControlReply]] = {}
        self._cids = itertools.count()
        self._tasks: list[asyncio.Task[None]] = []
        self._down_reason: str | None = None
        self._actx: zmq.asyncio.Context | None = None
        self._ctx: zmq.Context | None = None

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Connect to the (ready) scheduler process and start routing its outputs."""
        # Sending is synchronous so that aborts can be sent from a cancelled task's cleanup; the
        # unbounded high-water mark means a send never blocks.
        self._ctx = zmq.Context()
        self._push = self._ctx.socket(zmq.PUSH)
        self._push.setsockopt(zmq.SNDHWM, 0)
        self._push.setsockopt(zmq.LINGER, 0)
        self._push.connect(self.proc.endpoints.requests)
        self._actx = zmq.asyncio.Context()
        self._pull = self._actx.socket(zmq.PULL)
        self._pull.setsockopt(zmq.RCVHWM, 0)
        self._pull.setsockopt(zmq.LINGER, 0)
        self._pull.connect(self.proc.endpoints.outputs)
        self._tasks = [
            asyncio.create_task(self._receive_loop()),
            asyncio.create_task(self._watch_loop()),
        ]

    @property
    def alive(self) -> bool:
        """Whether requests can be served: the scheduler process runs and we are not closing."""
        return self._down_reason is None and self.proc.is_alive()

    @property
    def down_reason(self) -> str:
        if self._down_reason is not None:
            return self._down_reason
        if not self.proc.is_alive():
            return f"the scheduler process exited (code {self.proc.process.exitcode})"
        return ""

    async def close(self, timeout: float = 5.0) -> None:
        """Abort everything in flight, ask the scheduler process to exit, wait for it."""
        self._down_reason = self._down_reason or "the server is shutting down"
        self.abort_all("the server is shutting down")
        if self.proc.is_alive():
            try:
                await self._control(ipc.SHUTDOWN, timeout, {})
            except (RequestFailed, ControlError) as e:
                logger.warning("scheduler shutdown: %s", e)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.to_thread(self.proc.stop, timeout)
        self._pull.close(0)
        self._push.close(0)
        assert self._actx is not None and self._ctx is not None
        self._actx.term()
        self._ctx.term()

    # ------------------------------------------------------------------ requests
    def submit(self, reqs: list[ipc.GenerateReq]) -> RequestStream:
        """Send requests to the scheduler; their outputs (or failure) arrive on the stream."""
        if not self.alive:
            raise RequestFailed(ipc.UNAVAILABLE, self.down_reason)
        for r in reqs:
            if r.rid in self._streams:
                raise RequestFailed(ipc.INVALID, f"request id {r.rid!r} is already in use")
        if len({r.rid for r in reqs}) != len(reqs):
            raise RequestFailed(ipc.INVALID, "request ids in one batch must be distinct")
        stream = RequestStream(self, [r.rid for r in reqs])
        for r in reqs:
            self._streams[r.rid] = stream
            self._send(r)
        return stream

    def abort(self, rid: str) -> None:
        """Stop a request and free its pages; a no-op once it finished."""
        if self._streams.pop(rid, None) is not None:
            self._send_abort(rid)

    def request_abort(self, rid: str) -> bool:
        """Ask the scheduler to stop request ``rid`` (POST /abort_request): its stream stays
        open and ends with the scheduler's output, finish reason "abort". False when no
        request with that id is in flight here."""
        if rid not in self._streams:
            return False
        self._send_abort(rid)
        return True

    def abort_all(self, message: str) -> None:
        """Fail every request in flight with ``message`` (HTTP 503) and abort them."""
        for rid in list(self._streams):
            self._fail(rid, RequestFailed(ipc.UNAVAILABLE, message, rid))
            self._send_abort(rid)

    @property
    def num_in_flight(self) -> int:
        return len(self._streams)

    # ------------------------------------------------------------------ control
    async def control(self, kind: str, timeout: float = 30.0, **payload: Any) -> Any:
        """Run a control request in the scheduler process (between two steps) and return its
        result. ControlError when it refused, RequestFailed when it is unreachable."""
        if not self.alive:
            raise RequestFailed(ipc.UNAVAILABLE, self.down_reason)
        return await self._control(kind, timeout, payload)

    async def _control(self, kind: str, timeout: float, payload: dict[str, Any]) -> Any:
        cid = next(self._cids)
        fut: asyncio.Future[ipc.ControlReply] = asyncio.get_running_loop().create_future()
        self._controls[cid] = fut
        self._send(ipc.ControlReq(cid, kind, payload))
        try:
            reply = await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            raise RequestFailed(
                ipc.UNAVAILABLE, f"the scheduler did not answer {kind} within {timeout:.0f}s"
            ) from None
        finally:
            self._controls.pop(cid, None)
        if reply.error is not None:
            raise ControlError(reply.error)
        return reply.result

    # ------------------------------------------------------------------ internals
    def _send(self, msg: object) -> None:
        try:
            self._push.send_pyobj(msg, zmq.NOBLOCK)
        except zmq.ZMQError as e:
            raise RequestFailed(ipc.UNAVAILABLE, f"cannot reach the scheduler: {e}") from e

    def _send_abort(self, rid: str) -> None:
        # Called from cleanup paths: a scheduler that is gone has nothing left to abort.
        if self.proc.is_alive():
            with contextlib.suppress(RequestFailed):
                self._send(ipc.AbortReq(rid))

    def _fail(self, rid: str, err: RequestFailed) -> None:
        stream = self._streams.pop(rid, None)
        if stream is not None:
            err.rid = rid
            stream.queue.put_nowait(err)

    async def _receive_loop(self) -> None:
        while True:
            msg = await self._pull.recv_pyobj()
            if isinstance(msg, ipc.OutputBatch):
                for out in msg.outputs:
                    stream = self._streams.get(out.rid)
                    if stream is None:
                        continue  # aborted by us; its last output is of no interest
                    if out.finished:
                        del self._streams[out.rid]
                    stream.queue.put_nowait((stream.index[out.rid], out))
            elif isinstance(msg, ipc.ReqFailed):
                self._fail(msg.rid, RequestFailed(msg.kind, msg.message, msg.rid))
            elif isinstance(msg, ipc.ControlReply):
                fut = self._controls.get(msg.cid)
                if fut is not None and not fut.done():
                    fut.set_result(msg)
            else:
                logger.error("ignoring an unknown message from the scheduler: %r", msg)

    async def _watch_loop(self) -> None:
        while self.proc.is_alive():
            await asyncio.sleep(WATCH_INTERVAL_S)
        reason = f"the scheduler process exited (code {self.proc.process.exitcode})"
        if self._down_reason is None:
            logger.error("%s; the server cannot serve requests", reason)
            self._down_reason = reason
        for rid in list(self._streams):
            self._fail(rid, RequestFailed(ipc.UNAVAILABLE, reason, rid))
        for fut in self._controls.values():
            if not fut.done():
                fut.set_exception(RequestFailed(ipc.UNAVAILABLE, reason))
