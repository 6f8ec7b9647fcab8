"""SGLang-style native endpoints: ``/generate``, ``/health``, ``/health_generate``,
``/get_server_info``, ``/get_model_info``, ``/flush_cache``, ``/metrics``, ``/version`` and
``/debug/check_integrity``.

``/generate`` streams like SGLang's HTTP server: every event holds the text and output ids *so
far* (cumulative), with ``index`` added for batches.
"""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST

import kvtier
from kvtier.sampling_params import SamplingParams
from kvtier.scheduler.request import ReqOutput
from kvtier.server import ipc
from kvtier.server.engine_client import ControlError, RequestFailed
from kvtier.server.errors import APIError
from kvtier.server.protocol import AbortRequest, FlushCacheRequest, GenerateRequest
from kvtier.server.serving import Frontend, Result, api_error, frontend, unless_disconnected
from kvtier.server.streaming import sse_response

router = APIRouter()


async def _control(fe: Frontend, kind: str, **payload: Any) -> Any:
    try:
        return await fe.client.control(kind, **payload)
    except RequestFailed as e:
        raise api_error(e) from None
    except ControlError as e:
        raise APIError(400, str(e)) from None


_LOGPROB_KEYS = ("output_token_logprobs", "input_token_logprobs")
_TOP_LOGPROB_KEYS = ("output_top_logprobs", "input_top_logprobs")


def _with_token_text(fe: Frontend, result: dict[str, Any]) -> dict[str, Any]:
    """``return_text_in_logprobs``: each logprob entry's third field, the token's text."""
    meta = result["meta_info"]
    for key in _LOGPROB_KEYS:
        if key in meta:
            meta[key] = [[lp, t, fe.token_text(t)] for lp, t, _ in meta[key]]
    for key in _TOP_LOGPROB_KEYS:
        if key in meta:
            meta[key] = [[[lp, t, fe.token_text(t)] for lp, t, _ in top] for top in meta[key]]
    return result


class _NativeChunks:
    """Cumulative events per request, as SGLang's ``/generate`` streams them."""

    def __init__(self, n: int, batch: bool, fe: Frontend, token_text: bool) -> None:
        self.results = [Result() for _ in range(n)]
        self.batch = batch
        self.fe = fe
        self.token_text = token_text

    def on_output(self, index: int, out: ReqOutput, e2e: float) -> list[dict[str, Any]]:
        res = self.results[index]
        res.add(out, e2e)
        event = res.to_dict()
        if self.token_text:
            event = _with_token_text(self.fe, event)
        if self.batch:
            event["index"] = index
        return [event]

    def on_end(self) -> list[dict[str, Any]]:
        return []


def _as_list(value: Any, n: int, name: str) -> list[Any]:
    if not isinstance(value, list):
        return [value] * n
    if len(value) != n:
        raise APIError(400, f"{len(value)} {name} given for {n} prompts")
    return value


@router.post("/generate", response_model=None)
async def generate(
    body: GenerateRequest, request: Request
) -> dict[str, Any] | list[dict[str, Any]] | StreamingResponse:
    fe = frontend(request)
    if (body.text is None) == (body.input_ids is None):
        raise APIError(400, "give exactly one of text and input_ids")
    fe.check_logprobs(body.return_logprob, body.top_logprobs_num)
    if body.text is not None:
        single = isinstance(body.text, str)
        texts = [body.text] if isinstance(body.text, str) else body.text
        ids_list = [fe.encode(t) for t in texts]
    else:
        ids = body.input_ids or []
        single = not ids or isinstance(ids[0], int)
        ids_list = [list(ids)] if single else [list(x) for x in ids]  # type: ignore[arg-type]
    if not ids_list:
        raise APIError(400, "the batch is empty")
    n = len(ids_list)
    params = _as_list(body.sampling_params, n, "sampling_params")
    rids = None if body.rid is None else [str(r) for r in _as_list(body.rid, n, "rids")]
    items = []
    for ids, p in zip(ids_list, params):
        sp = fe.sampling(p)
        sp.max_new_tokens = fe.check_ids(ids, sp.max_new_tokens, "max_new_tokens")
        items.append((ids, sp))
    gen = fe.submit(items, rids, body.return_logprob, body.top_logprobs_num, body.logprob_start_len)
    token_text = body.return_text_in_logprobs
    if body.stream:
        return await sse_response(request, gen, _NativeChunks(n, not single, fe, token_text))
    try:
        results = await unless_disconnected(request, gen.collect())
    finally:
        gen.close()
    dicts = [r.to_dict() for r in results]
    if token_text:
        dicts = [_with_token_text(fe, d) for d in dicts]
    return dicts[0] if single else dicts


@router.get("/health")
async def health(request: Request) -> dict[str, str]:
    """200 while the scheduler process is alive; 503 when it is gone or the server is stopping."""
    client = frontend(request).client
    if not client.alive:
        raise APIError(503, client.down_reason or "the engine is not running")
    return {"status": "ok"}


# How long /health_generate waits for its one token before answering 503 (SGLang's default).
HEALTH_GENERATE_TIMEOUT_S = 20.0


@router.get("/health_generate")
async def health_generate(request: Request) -> dict[str, str]:
    """200 once the engine has generated one token for a one-token prompt: the scheduler is
    alive and stepping (``/health`` only says its process is there); 503 if the token does not
    come within ``HEALTH_GENERATE_TIMEOUT_S`` (e.g. a wedged step) or the engine is down. The
    probe queues like any request."""
    fe = frontend(request)
    if not fe.client.alive:
        raise APIError(503, fe.client.down_reason or "the engine is not running")
    sp = SamplingParams(max_new_tokens=1, temperature=0.0)
    gen = fe.submit([([0], sp)], ["health-" + uuid.uuid4().hex])
    try:
        await asyncio.wait_for(
            unless_disconnected(request, gen.collect()), HEALTH_GENERATE_TIMEOUT_S
        )
    except TimeoutError:
        raise APIError(
            503, f"no token generated within {HEALTH_GENERATE_TIMEOUT_S:g} s", "unhealthy"
        ) from None
    finally:
        gen.close()
    return {"status": "ok"}


@router.get("/version")
async def version() -> dict[str, str]:
    return {"version": kvtier.__version__}


@router.get("/get_model_info")
async def get_model_info(request: Request) -> dict[str, Any]:
    fe = frontend(request)
    args = request.app.state.server_args
    return {
        "model_path": fe.model.model_path,
        "served_model_name": fe.model.name,
        "tokenizer_path": args.tokenizer_path or fe.model.model_path,
        "is_generation": True,
        "context_length": fe.model.context_length,
    }


@router.get("/get_server_info")
async def get_server_info(request: Request) -> dict[str, Any]:
    """Every server argument (the API key masked) and the scheduler's stats."""
    fe = frontend(request)
    args = dataclasses.asdict(request.app.state.server_args)
    if args.get("api_key"):
        args["api_key"] = "***"
    stats = await _control(fe, ipc.GET_STATS)
    return {
        **args,
        **stats,
        "served_model_name": fe.model.name,
        "context_length": fe.model.context_length,
        "vocab_size": fe.model.vocab_size,
        "scheduler_pid": fe.client.proc.pid,
        "num_in_flight": fe.client.num_in_flight,
        "version": kvtier.__version__,
    }


@router.api_route("/flush_cache", methods=["GET", "POST"])
async def flush_cache(request: Request, body: FlushCacheRequest | None = None) -> dict[str, Any]:
    """Drop cached prefixes. Default (tier "all"): everything, refused with 400 while requests
    are running or waiting (as SGLang does). Tier "device": only GPU copies of prefixes that
    have an L2 copy, so later requests load them back from L2 (needs the hierarchical cache)."""
    fe = frontend(request)
    tier = body.tier if body else None
    done = await _control(fe, ipc.FLUSH_CACHE, tier=tier)
    if not done:
        raise APIError(
            400,
            "the cache was not flushed: requests are running or waiting; retry when idle",
            "busy",
        )
    if tier == "device":
        msg = "GPU copies of prefixes backed up to L2 were dropped"
    else:
        msg = "Cache flushed."
    return {"success": True, "message": msg}


@router.post("/abort_request")
async def abort_request(request: Request, body: AbortRequest) -> dict[str, Any]:
    """Stop a request in flight by its id; its own response then ends with finish reason
    "abort" (streamed or not) and its pages are freed. 404 for an unknown id."""
    if not frontend(request).client.request_abort(body.rid):
        raise APIError(404, f"no request with id {body.rid!r} is in flight", "not_found")
    return {"success": True}


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    fe = frontend(request)
    try:
        stats = await fe.client.control(ipc.GET_STATS, timeout=5.0)
    except (RequestFailed, ControlError):
        stats = None  # the request-level metrics are still worth serving
    return Response(fe.metrics.render(stats), media_type=CONTENT_TYPE_LATEST)


@router.get("/debug/check_integrity")
async def check_integrity(request: Request) -> dict[str, Any]:
    """Run the scheduler's page-ownership check between two steps: 200 ``{"ok": true}``, or 500
    with the violation (a leaked or doubly owned page is a bug)."""
    problem = await _control(frontend(request), ipc.CHECK_INTEGRITY)
    if problem is not None:
        raise APIError(500, f"integrity check failed: {problem}", "integrity_error")
    return {"ok": True}
