"""Messages between the API process and the scheduler process (pickled over ZeroMQ).

API -> scheduler: GenerateReq, AbortReq, ControlReq. Scheduler -> API: OutputBatch (everything one
step produced), ReqFailed (add_request refused a request), ControlReply.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from kvtier.scheduler.request import ReqOutput

# ReqFailed.kind values; the HTTP layer turns them into status codes.
INVALID = "invalid"  # 400: the request is wrong (RequestError, SamplingParamsError)
QUEUE_FULL = "queue_full"  # 429: --max-queued-requests reached
UNAVAILABLE = "unavailable"  # 503: shutting down, or the scheduler is gone
INTERNAL = "internal"  # 500: the engine loop failed

# ControlReq.kind values.
FLUSH_CACHE = "flush_cache"
GET_STATS = "get_stats"
CHECK_INTEGRITY = "check_integrity"
SHUTDOWN = "shutdown"


@dataclass(frozen=True)
class Endpoints:
    """ipc:// addresses, bound by the scheduler process and connected to by the API process."""

    requests: str
    outputs: str

    @classmethod
    def in_dir(cls, directory: str) -> Endpoints:
        return cls(
            requests="ipc://" + os.path.join(directory, "requests.sock"),
            outputs="ipc://" + os.path.join(directory, "outputs.sock"),
        )


@dataclass
class GenerateReq:
    """One generation request, already tokenized and validated by the API process."""

    rid: str
    input_ids: list[int]
    sampling_params: dict[str, Any]
    # The scheduler sends the new tokens of streamed requests after every step.
    stream: bool
    # Logprobs of the output tokens and of the top alternatives (see Req).
    return_logprob: bool = False
    top_logprobs_num: int = 0
    logprob_start_len: int = -1


@dataclass
class AbortReq:
    rid: str


@dataclass
class ControlReq:
    cid: int
    kind: str
    payload: dict[str, Any] = field(default_factory=dict)


@dataclass
class OutputBatch:
    outputs: list[ReqOutput]


@dataclass
class ReqFailed:
    rid: str
    kind: str
    message: str


@dataclass
class ControlReply:
    cid: int
    result: Any = None
    error: str | None = None
