"""Fault injection for tests: off unless armed.

Named points in the engine call ``check(point)``; an armed point raises ``FaultInjected`` the
next ``times`` times it is reached. Arm from code (``arm("load")``) or, for a server's
scheduler process, from the environment: ``KVTIER_FAULTS="load=1,backup=2"``.

Points:
  - ``tier_alloc``: allocating the L2 buffer at startup;
  - ``load``: issuing an L2 -> GPU load;
  - ``backup``: issuing a GPU -> L2 backup.
"""

from __future__ import annotations

import os
import threading

POINTS = ("tier_alloc", "load", "backup")


class FaultInjected(RuntimeError):
    """A fault a test asked for."""


_lock = threading.Lock()
_armed: dict[str, int] = {}
injected: dict[str, int] = {p: 0 for p in POINTS}


def arm(point: str, times: int = 1) -> None:
    if point not in POINTS:
        raise ValueError(f"unknown fault point {point!r}; points: {', '.join(POINTS)}")
    with _lock:
        _armed[point] = _armed.get(point, 0) + times


def disarm() -> None:
    with _lock:
        _armed.clear()


def check(point: str) -> None:
    """Raise ``FaultInjected`` if ``point`` is armed (cheap when nothing is)."""
    if not _armed:
        return
    with _lock:
        left = _armed.get(point, 0)
        if left <= 0:
            return
        _armed[point] = left - 1
        injected[point] += 1
    raise FaultInjected(f"injected fault at {point}")


def arm_from_env(value: str | None = None) -> None:
    spec = os.environ.get("KVTIER_FAULTS", "") if value is None else value
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, times = part.partition("=")
        arm(name, int(times or 1))


arm_from_env()
