"""Drives a Scheduler from a thread of its own for asyncio callers (``Engine.async_generate``).

Requests from any event loop go into an inbox; the driver thread adds them, steps the
scheduler while any of them is unfinished, and hands each output to the queue of the loop
that asked for it (``call_soon_threadsafe``).

Invariants: the scheduler is only touched while ``lock`` is held. The driver steps it only
while requests it added are unfinished (``_owned``), and it refuses new requests while the
scheduler holds requests it did not add; the synchronous Engine methods refuse while the driver
is busy. So the scheduler's requests are all the driver's or all a synchronous caller's, and
no caller's outputs are taken by a step of the other.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from typing import Any

from kvtier.scheduler.request import Req, ReqOutput
from kvtier.scheduler.scheduler import Scheduler


class AsyncDriver:
    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self.lock = threading.Lock()
        self._inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        # Guards what ``busy`` reads from other threads; only the driver thread changes
        # _owned and _waiters.
        self._state_lock = threading.Lock()
        self._pending = 0  # messages put in the inbox and not yet taken
        self._owned: set[str] = set()  # the driver's requests not finished yet
        # rid -> (the caller's loop, its queue); aborted requests have none.
        self._waiters: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue[Any]]] = {}
        self._thread: threading.Thread | None = None

    @property
    def busy(self) -> bool:
        """Whether the driver has requests in the scheduler or messages not yet taken."""
        with self._state_lock:
            return bool(self._owned) or self._pending > 0

    def submit(self, reqs: list[Req], out: asyncio.Queue[Any]) -> None:
        """Queue ``reqs``; their outputs (or the exception that refused them) go to ``out``,
        on the calling event loop."""
        self._put("add", (reqs, asyncio.get_running_loop(), out))

    def abort(self, rids: list[str]) -> None:
        """Stop these requests (their caller went away); their last outputs are dropped."""
        if rids:
            self._put("abort", rids)

    def close(self) -> None:
        """Abort what is in flight, let it finish, and stop the thread."""
        thread = self._thread
        if thread is not None:
            self._put("stop", None)
            thread.join()
            with self._state_lock:
                self._thread = None

    # ------------------------------------------------------------------ the thread
    def _put(self, kind: str, payload: Any) -> None:
        with self._state_lock:
            self._pending += 1
            # Callers on several threads (event loops) may be first at once: one thread only.
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="kvtier-driver", daemon=True)
                self._thread.start()
        self._inbox.put((kind, payload))

    def _take(self, block: bool) -> tuple[str, Any] | None:
        try:
            msg = self._inbox.get(block=block)
        except queue.Empty:
            return None
        with self._state_lock:
            self._pending -= 1
        return msg

    def _run(self) -> None:
        stopping = False
        while not (stopping and not self._owned):
            # Parked on the inbox, holding no lock, while nothing of the driver's runs.
            msg = self._take(block=not self._owned and not stopping)
            with self.lock:
                while msg is not None:
                    kind, payload = msg
                    if kind == "add":
                        refuse = "the engine was shut down" if stopping else None
                        self._add(*payload, refuse=refuse)
                    elif kind == "abort":
                        self._abort(payload)
                    else:
                        stopping = True
                        for loop, q in self._waiters.values():
                            error = RuntimeError("the engine was shut down")
                            loop.call_soon_threadsafe(q.put_nowait, error)
                        self._abort(list(self._owned))
                    msg = self._take(block=False)
                if self._owned:
                    self._dispatch(self.scheduler.step())

    def _add(
        self,
        reqs: list[Req],
        loop: asyncio.AbstractEventLoop,
        out: asyncio.Queue[Any],
        refuse: str | None,
    ) -> None:
        sched = self.scheduler
        if refuse is None and not self._owned and (sched.running or sched.waiting):
            refuse = "synchronous generate requests are in flight: finish them first"
        if refuse is not None:
            loop.call_soon_threadsafe(out.put_nowait, RuntimeError(refuse))
            return
        added: list[Req] = []
        try:
            for req in reqs:
                self.scheduler.add_request(req)
                added.append(req)
        except Exception as e:  # refused (bad input, full queue): none of them runs
            for req in added:
                self.scheduler.abort_request(req.rid)
            with self._state_lock:
                self._owned.update(r.rid for r in added)  # until their abort outputs pass
            loop.call_soon_threadsafe(out.put_nowait, e)
            return
        with self._state_lock:
            self._owned.update(r.rid for r in reqs)
        for req in reqs:
            self._waiters[req.rid] = (loop, out)
        # A request that finished at once (max_new_tokens 0) left its output to the next step.

    def _abort(self, rids: list[str]) -> None:
        for rid in rids:
            self._waiters.pop(rid, None)
            if rid in self._owned:
                self.scheduler.abort_request(rid)

    def _dispatch(self, outputs: list[ReqOutput]) -> None:
        for out in outputs:
            waiter = self._waiters.get(out.rid)
            if out.finished:
                self._waiters.pop(out.rid, None)
                with self._state_lock:
                    self._owned.discard(out.rid)
            if waiter is not None:
                loop, q = waiter
                loop.call_soon_threadsafe(q.put_nowait, out)
