"""The engine loop in its own process, so that HTTP work never delays a scheduling step.

``SchedulerProcess.spawn(args)`` starts it; the child builds the Scheduler, binds two ipc://
sockets (requests in, outputs out), reports readiness (or the startup error) through a pipe and
then loops: take every pending message (blocking briefly only when idle), run one step, send what
the step produced as one batch.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import shutil
import signal
import tempfile
import time
import traceback
from multiprocessing.connection import Connection
from typing import Any

import zmq

from kvtier.server import ipc
from kvtier.server_args import ServerArgs

logger = logging.getLogger(__name__)

# How long an idle loop blocks waiting for a message before it runs housekeeping (finishing
# cache transfers, noticing a dead parent).
IDLE_POLL_MS = 50


class SchedulerStartError(RuntimeError):
    """The scheduler process could not start; the message is the child's error."""


class ParentGone(RuntimeError):
    """The API process disappeared; the scheduler process has nobody to serve."""


# ---------------------------------------------------------------------------- child side
class SchedulerLoop:
    """Runs a Scheduler against the two sockets until told to stop (or orphaned)."""

    def __init__(self, scheduler: Any, pull: zmq.Socket, push: zmq.Socket, parent_pid: int):
        self.scheduler = scheduler
        self.pull = pull
        self.push = push
        self.parent_pid = parent_pid
        self.stopping = False
        self.live_rids: set[str] = set()

    def run(self) -> None:
        try:
            while not self.stopping:
                self._receive(block=not self.scheduler.has_work())
                self._send_outputs(self.scheduler.step())
                if os.getppid() != self.parent_pid:
                    raise ParentGone("the API process exited")
        except ParentGone:
            raise
        except Exception:
            # The scheduler's state can no longer be trusted: tell every waiting client, then
            # exit so that the API process reports the engine as down.
            logger.error("the engine loop failed:\n%s", traceback.format_exc())
            self._fail_all(ipc.INTERNAL, "the engine failed while running this request")
            raise
        self._drain_and_close()

    def _receive(self, block: bool) -> None:
        if block and not self.pull.poll(IDLE_POLL_MS):
            return
        while not self.stopping:
            try:
                msg = self.pull.recv_pyobj(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._handle(msg)

    def _handle(self, msg: object) -> None:
        if isinstance(msg, ipc.GenerateReq):
            self._add(msg)
        elif isinstance(msg, ipc.AbortReq):
            self.scheduler.abort_request(msg.rid)
        elif isinstance(msg, ipc.ControlReq):
            self._send(self._control(msg))
        else:
            logger.error("ignoring an unknown message: %r", msg)

    def _add(self, msg: ipc.GenerateReq) -> None:
        from kvtier.sampling_params import SamplingParams, SamplingParamsError
        from kvtier.scheduler.request import Req
        from kvtier.scheduler.scheduler import QueueFullError, RequestError

        try:
            req = Req(
                rid=msg.rid,
                input_ids=list(msg.input_ids),
                sampling=SamplingParams.from_dict(msg.sampling_params),
                stream=msg.stream,
                return_logprob=msg.return_logprob,
                top_logprobs_num=msg.top_logprobs_num,
                logprob_start_len=msg.logprob_start_len,
            )
            self.scheduler.add_request(req)
        except (RequestError, SamplingParamsError) as e:
            self._send(ipc.ReqFailed(msg.rid, ipc.INVALID, str(e)))
            return
        except QueueFullError as e:
            self._send(ipc.ReqFailed(msg.rid, ipc.QUEUE_FULL, str(e)))
            return
        except Exception as e:
            logger.exception("add_request failed for %s", msg.rid)
            self._send(ipc.ReqFailed(msg.rid, ipc.INTERNAL, f"{type(e).__name__}: {e}"))
            return
        self.live_rids.add(msg.rid)

    def _control(self, msg: ipc.ControlReq) -> ipc.ControlReply:
        s = self.scheduler
        try:
            if msg.kind == ipc.FLUSH_CACHE:
                return ipc.ControlReply(msg.cid, s.flush_cache(msg.payload.get("tier")))
            if msg.kind == ipc.GET_STATS:
                return ipc.ControlReply(msg.cid, s.stats())
            if msg.kind == ipc.CHECK_INTEGRITY:
                try:
                    s.check_integrity()
                except Exception as e:
                    return ipc.ControlReply(msg.cid, f"{type(e).__name__}: {e}")
                return ipc.ControlReply(msg.cid, None)
            if msg.kind == ipc.SHUTDOWN:
                self.stopping = True
                return ipc.ControlReply(msg.cid, True)
        except ValueError as e:  # a refused argument, e.g. an unknown flush tier
            return ipc.ControlReply(msg.cid, error=str(e))
        return ipc.ControlReply(msg.cid, error=f"unknown control message {msg.kind!r}")

    def _send_outputs(self, outputs: list[Any]) -> None:
        if not outputs:
            return
        for out in outputs:
            if out.finished:
                self.live_rids.discard(out.rid)
        self._send(ipc.OutputBatch(outputs))

    def _send(self, msg: object) -> None:
        # The API process connects to this bound socket; until it does (or once it is gone) a
        # send would block, so wait for the peer while checking that the parent still exists.
        while True:
            try:
                self.push.send_pyobj(msg, zmq.NOBLOCK)
                return
            except zmq.Again:
                if os.getppid() != self.parent_pid:
                    raise ParentGone("the API process exited") from None
                self.push.poll(100, zmq.POLLOUT)

    def _fail_all(self, kind: str, message: str) -> None:
        for rid in sorted(self.live_rids):
            try:
                self._send(ipc.ReqFailed(rid, kind, message))
            except ParentGone:
                return
        self.live_rids.clear()

    def _drain_and_close(self) -> None:
        s = self.scheduler
        for req in list(s.running) + list(s.waiting):
            s.abort_request(req.rid)
        self._send_outputs(s.step())
        s.close()


def run_scheduler_process(args: ServerArgs, endpoints: ipc.Endpoints, ready: Connection) -> None:
    """Entry point of the child process."""
    from kvtier.engine import build_scheduler, setup_logging

    # Ctrl-C reaches the whole process group; the API process decides how to shut down.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    setup_logging(args.log_level)
    parent_pid = os.getppid()
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    push = ctx.socket(zmq.PUSH)
    for sock in (pull, push):
        sock.setsockopt(zmq.LINGER, 1000)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
    pull.bind(endpoints.requests)
    push.bind(endpoints.outputs)
    try:
        scheduler = build_scheduler(args)
        if not args.skip_server_warmup:
            scheduler.warm_up()
    except BaseException as e:
        ready.send(("error", f"{type(e).__name__}: {e}"))
        raise SystemExit(1) from None
    loop = SchedulerLoop(scheduler, pull, push, parent_pid)

    def on_sigterm(signum: int, frame: object) -> None:
        loop.stopping = True

    signal.signal(signal.SIGTERM, on_sigterm)
    ready.send(
        (
            "ready",
            {
                "pid": os.getpid(),
                "context_length": scheduler.context_length,
                "vocab_size": scheduler.runner.vocab_size,
            },
        )
    )
    ready.close()
    code = 0
    try:
        loop.run()
    except ParentGone:
        logger.warning("the API process is gone; the scheduler process exits")
    except Exception:
        code = 1
    finally:
        pull.close(0)
        push.close()
        ctx.term()
    raise SystemExit(code)


# ---------------------------------------------------------------------------- parent side
class SchedulerProcess:
    """Handle on the child process, held by the API process."""

    def __init__(self, args: ServerArgs) -> None:
        self.args = args
        self.tmpdir = tempfile.mkdtemp(prefix="kvtier-")
        self.endpoints = ipc.Endpoints.in_dir(self.tmpdir)
        # spawn, not fork: the parent may already hold threads (tokenizers, torch) and sockets.
        ctx = mp.get_context("spawn")
        self._ready, child_end = ctx.Pipe(duplex=False)
        self.process = ctx.Process(
            target=run_scheduler_process,
            args=(args, self.endpoints, child_end),
            name="kvtier-scheduler",
            daemon=True,
        )
        self.info: dict[str, Any] = {}

    @classmethod
    def spawn(cls, args: ServerArgs) -> SchedulerProcess:
        """Start the child; call ``wait_ready`` before sending it anything."""
        proc = cls(args)
        proc.process.start()
        return proc

    def wait_ready(self, timeout: float = 1800.0) -> dict[str, Any]:
        """Block until the child built its Scheduler; return what it reported about itself
        (pid, context_length, vocab_size). Raises SchedulerStartError with the child's error."""
        deadline = time.monotonic() + timeout
        while not self._ready.poll(0.2):
            if not self.process.is_alive():
                raise SchedulerStartError(
                    f"the scheduler process exited with code {self.process.exitcode} "
                    "while starting (see its log above)"
                )
            if time.monotonic() > deadline:
                raise SchedulerStartError(f"the scheduler process was not ready after {timeout}s")
        status, payload = self._ready.recv()
        if status != "ready":
            raise SchedulerStartError(payload)
        self.info = payload
        return payload

    @property
    def pid(self) -> int | None:
        return self.process.pid

    def is_alive(self) -> bool:
        return self.process.is_alive()

    def stop(self, timeout: float = 5.0) -> None:
        """Wait for the child to exit (it was asked to already), terminate or kill it if it does
        not, and remove the socket directory."""
        p = self.process
        if p.pid is not None:
            p.join(timeout)
            if p.is_alive():
                logger.warning("the scheduler process did not exit; terminating it")
                p.terminate()
                p.join(2.0)
            if p.is_alive():
                p.kill()
                p.join(2.0)
        shutil.rmtree(self.tmpdir, ignore_errors=True)
