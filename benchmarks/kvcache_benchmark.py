"""KV-cache tier benchmark: time to first token and throughput, L2 tier against L2 tier.

TTFT mode (``--ttft``, the default). For each prompt length and backend: N unique random prompts
are sent once (a miss: full prefill, the recompute baseline), optionally once more while still on
the GPU (a GPU hit), then evicted from the GPU with their L2 copies kept
(``flush_cache(tier="device")``) and sent again (a tier hit). Every request asks for one new
token, so its latency is the TTFT. Each timed hit is checked against ``cached_tokens_by_tier``:
a hit that was not served by the intended tier aborts the run with an error, never a number.
``--turn-tokens N`` also times a new turn of a conversation, after the hits: each prompt
followed by N fresh tokens, its prefix found on the GPU (turn GPU), then, after another device
flush, in L2 (turn tier).

Throughput mode (``--throughput``). One set of prompts, at hit rates 0..100 %: the tier is flushed,
the hit share is sent once and evicted from the GPU (so its hits are tier hits), then every
prompt is submitted as one batch and timed; tokens/s and the measured hit rate per tier.

Backends: ``dram`` (pinned host memory), ``xmem`` (X-Mem; ``KVTIER_XMEM_STANDIN=1`` uses the
stand-in banks on device memory), ``peer`` (other GPUs' HBM); ``both`` = dram and xmem,
``all`` = every one. One that cannot run on this machine is reported as skipped, with the reason.

    python benchmarks/kvcache_benchmark.py                     # CPU: quick run with a tiny model
    python benchmarks/kvcache_benchmark.py --ttft --backend both
    python benchmarks/kvcache_benchmark.py --lengths 32K,80K --turn-tokens 512   # new turns
    python benchmarks/kvcache_benchmark.py --throughput --backend all
    python benchmarks/kvcache_benchmark.py --base-url http://127.0.0.1:30000   # a running server

With CUDA the defaults are the seed's setup (Qwen3-30B-A3B-Instruct-2507 with dummy weights,
page 64, layer_first, write_through, 60 GB of L2, prompts of 1K and 10K..90K tokens), with
--mem-fraction-static 0.85 instead of the seed's 0.5: the weights load as bf16, twice the FP8
size); without it, ``builtin:tiny-qwen3`` and 256..2048-token prompts.

On one H200 the default TTFT run fits 6 prompts of 90K tokens in 60 GB and times each of them at
ten lengths, a few minutes per backend; ``--num-prompts 2`` or fewer ``--lengths`` shorten it.
The X-Mem stand-in keeps its banks in GPU memory: next to a 30B model on one GPU, lower
``--hicache-size`` if memory runs short, or put the banks on another GPU
(``KVTIER_XMEM_STANDIN_DEVICES``).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import math
import os
import random
import statistics
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from common import (
    GiB,
    copy_bandwidth,
    fmt_float,
    fmt_str,
    format_table,
    load_pyplot,
    parse_token_counts,
    peer_copy_bandwidth,
    progress,
    run_metadata,
    run_stamp,
    write_csv,
    write_json,
)

logger = logging.getLogger("kvcache_benchmark")

BACKEND_SETS: dict[str, tuple[str, ...]] = {
    "dram": ("dram",),
    "xmem": ("xmem",),
    "peer": ("peer",),
    "both": ("dram", "xmem"),
    "all": ("dram", "xmem", "peer"),
}
XMEM_STANDIN_ENV = "KVTIER_XMEM_STANDIN"
HIT_RATES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)

# Defaults that depend on the machine; a flag given on the command line always wins.
GPU_DEFAULTS: dict[str, Any] = {
    "model": "Qwen/Qwen3-30B-A3B-Instruct-2507",
    "load_format": "dummy",
    "page_size": 64,
    "hicache_size": 60.0,
    # The seed's 0.5 assumes FP8 weights (~30 GB); kvtier loads them as bf16 (~61 GB), which at
    # 0.5 of an H200 would leave ~9 GB of KV pool, too little for 90K-token prompts.
    "mem_fraction_static": 0.85,
    "lengths": [1024] + [10240 * i for i in range(1, 10)],
    "num_prompts": None,  # as many of the longest prompts as the L2 holds
    "tp_num_prompts": 32,
    "tp_prompt_len": 16384,
}
CPU_DEFAULTS: dict[str, Any] = {
    "model": "builtin:tiny-qwen3",
    "load_format": "auto",
    "page_size": 16,
    "hicache_size": 0.2,
    "mem_fraction_static": None,
    # On the CPU the tiny model's prefill grows quickly with length, so 2048 tokens already
    # separates recompute from a tier hit by more than 10x.
    "lengths": [256, 1024, 2048],
    "num_prompts": 3,
    "tp_num_prompts": 16,
    "tp_prompt_len": 512,
}


class VerificationError(RuntimeError):
    """A timed request was not served the way the benchmark intended (e.g. a "tier hit" that
    came from the GPU): the run's numbers would be wrong, so the run fails."""


class BackendSkipped(Exception):
    """The backend cannot run here; the message says why."""


# ---------------------------------------------------------------------------- configuration
@dataclass
class Config:
    ttft: bool
    throughput: bool
    backends: tuple[str, ...]
    model: str
    load_format: str
    page_size: int
    hicache_size: float
    mem_fraction_static: float | None
    max_total_tokens: int | None
    hicache_io_backend: str
    hicache_mem_layout: str
    hicache_write_policy: str
    device: str
    lengths: list[int]
    repeats: int
    num_prompts: int | None
    gpu_hit: bool
    turn_tokens: int
    tp_num_prompts: int
    tp_prompt_len: int
    max_new_tokens: int
    hit_rates: tuple[float, ...]
    base_url: str | None
    http_timeout: float
    output_dir: Path
    seed: int
    skip_device_flush: bool
    bandwidth_bytes: int
    engine_args: dict[str, Any] = field(default_factory=dict)
    plots: bool = True
    # Tests only: an httpx transport standing in for the server of --base-url.
    http_transport: Any = None


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    mode = p.add_argument_group("mode")
    mode.add_argument("--ttft", action="store_true", help="TTFT per prompt length (default)")
    mode.add_argument("--throughput", action="store_true", help="tokens/s per hit rate")
    mode.add_argument(
        "--backend",
        choices=sorted(BACKEND_SETS),
        default="dram",
        help="L2 tier(s) to run: both = dram and xmem, all = dram, xmem and peer",
    )
    mode.add_argument(
        "--base-url",
        default=None,
        help="benchmark a running server (SGLang-compatible /generate and /flush_cache) "
        "instead of an in-process engine",
    )

    eng = p.add_argument_group(
        "engine (defaults: the seed's setup with CUDA, a tiny model without)"
    )
    eng.add_argument("--model", "--model-path", dest="model", default=None)
    eng.add_argument("--load-format", choices=["auto", "safetensors", "dummy"], default=None)
    eng.add_argument("--page-size", type=int, default=None)
    eng.add_argument("--hicache-size", type=float, default=None, help="L2 size, GB")
    eng.add_argument("--mem-fraction-static", type=float, default=None)
    eng.add_argument("--max-total-tokens", type=int, default=None, help="GPU KV pool, tokens")
    eng.add_argument(
        "--hicache-io-backend",
        choices=["auto", "kernel", "direct"],
        default="auto",
        help="auto (the engine's default): direct for dram, kernel for peer and xmem",
    )
    eng.add_argument(
        "--hicache-mem-layout",
        choices=["layer_first", "page_first", "page_first_direct"],
        default="layer_first",
    )
    eng.add_argument(
        "--hicache-write-policy",
        choices=["write_through", "write_through_selective", "write_back"],
        default="write_through",
    )
    eng.add_argument("--device", choices=["cuda", "cpu"], default=None)
    eng.add_argument(
        "--engine-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other kvtier.Engine keyword (value parsed as JSON when it parses), repeatable",
    )

    ttft = p.add_argument_group("TTFT mode")
    ttft.add_argument(
        "--lengths", default=None, help="prompt lengths in tokens, e.g. 1K,10K,20K (K = 1024)"
    )
    ttft.add_argument(
        "--repeats", type=int, default=1, help="cycles of fresh prompts per length (default 1)"
    )
    ttft.add_argument(
        "--num-prompts",
        type=int,
        default=None,
        help="prompts per length (default: as many of the longest as the L2 holds; 3 on CPU)",
    )
    ttft.add_argument(
        "--no-gpu-hit", dest="gpu_hit", action="store_false", help="skip the GPU-hit timing"
    )
    ttft.add_argument(
        "--turn-tokens",
        type=int,
        default=0,
        help="also time a new turn: each prompt followed by this many new tokens, its prefix "
        "found on the GPU (turn GPU) and in L2 (turn tier) (default 0: not timed)",
    )

    tp = p.add_argument_group("throughput mode")
    tp.add_argument("--tp-num-prompts", type=int, default=None, help="prompts per batch")
    tp.add_argument("--tp-prompt-len", type=int, default=None, help="tokens per prompt")
    tp.add_argument(
        "--max-new-tokens", type=int, default=1, help="new tokens per throughput request"
    )
    tp.add_argument(
        "--hit-rates",
        default=",".join(str(int(r * 100)) for r in HIT_RATES),
        help="hit rates in percent, comma-separated",
    )

    out = p.add_argument_group("output")
    out.add_argument("--output-dir", type=Path, default=Path("bench_out/kvcache"))
    out.add_argument("--no-plots", dest="plots", action="store_false")
    out.add_argument("--seed", type=int, default=0)
    out.add_argument("--http-timeout", type=float, default=3600.0, help="seconds per request")
    out.add_argument(
        "--bandwidth-gib",
        type=float,
        default=1.0,
        help="buffer size of the bulk copy-bandwidth probe, GiB",
    )
    out.add_argument(
        "--skip-device-flush",
        action="store_true",
        help="testing the verifier: do not evict from the GPU between the passes, so 'tier "
        "hits' come from the GPU and the run must fail",
    )
    return p.parse_args(argv)


def _parse_engine_args(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--engine-arg wants KEY=VALUE; got {item!r}")
        try:
            out[key.replace("-", "_")] = json.loads(raw)
        except json.JSONDecodeError:
            out[key.replace("-", "_")] = raw
    return out


def resolve_config(ns: argparse.Namespace) -> Config:
    """Apply the machine's defaults to every flag left unset."""
    device = ns.device or ("cuda" if torch.cuda.is_available() else "cpu")
    defaults = GPU_DEFAULTS if device == "cuda" else CPU_DEFAULTS

    def pick(name: str) -> Any:
        v = getattr(ns, name)
        return defaults[name] if v is None else v

    lengths = parse_token_counts(ns.lengths) if ns.lengths else list(defaults["lengths"])
    rates = tuple(float(x) / 100.0 for x in ns.hit_rates.split(",") if x.strip())
    if not rates or any(not 0.0 <= r <= 1.0 for r in rates):
        raise SystemExit(f"--hit-rates must be percentages in 0..100; got {ns.hit_rates!r}")
    if ns.repeats < 1:
        raise SystemExit("--repeats must be >= 1")
    return Config(
        ttft=ns.ttft or not ns.throughput,
        throughput=ns.throughput,
        backends=BACKEND_SETS[ns.backend],
        model=pick("model"),
        load_format=pick("load_format"),
        page_size=pick("page_size"),
        hicache_size=pick("hicache_size"),
        mem_fraction_static=pick("mem_fraction_static"),
        max_total_tokens=ns.max_total_tokens,
        hicache_io_backend=ns.hicache_io_backend,
        hicache_mem_layout=ns.hicache_mem_layout,
        hicache_write_policy=ns.hicache_write_policy,
        device=device,
        lengths=lengths,
        repeats=ns.repeats,
        num_prompts=pick("num_prompts"),
        gpu_hit=ns.gpu_hit,
        turn_tokens=ns.turn_tokens,
        tp_num_prompts=pick("tp_num_prompts"),
        tp_prompt_len=pick("tp_prompt_len"),
        max_new_tokens=ns.max_new_tokens,
        hit_rates=rates,
        base_url=ns.base_url,
        http_timeout=ns.http_timeout,
        output_dir=ns.output_dir,
        seed=ns.seed,
        skip_device_flush=ns.skip_device_flush,
        bandwidth_bytes=int(ns.bandwidth_gib * GiB),
        engine_args=_parse_engine_args(ns.engine_arg),
        plots=ns.plots,
    )


def engine_kwargs(cfg: Config, backend: str) -> dict[str, Any]:
    """``kvtier.Engine`` keyword arguments for one backend, the seed's names throughout."""
    kw: dict[str, Any] = {
        "model_path": cfg.model,
        "load_format": cfg.load_format,
        "device": cfg.device,
        "page_size": cfg.page_size,
        "enable_hierarchical_cache": True,
        "hicache_size": cfg.hicache_size,
        "hicache_write_policy": cfg.hicache_write_policy,
        "hicache_io_backend": cfg.hicache_io_backend,
        "hicache_mem_layout": cfg.hicache_mem_layout,
        # Ids in, ids out: no tokenizer to load and no detokenization in the timed path.
        "skip_tokenizer_init": True,
        "log_level": "warning",
    }
    if cfg.mem_fraction_static is not None:
        kw["mem_fraction_static"] = cfg.mem_fraction_static
    if cfg.max_total_tokens is not None:
        kw["max_total_tokens"] = cfg.max_total_tokens
    if backend == "xmem":
        kw["hicache_use_xmem"] = True
    else:
        kw["hicache_tier"] = backend
    kw.update(cfg.engine_args)
    return kw


def xmem_standin_requested() -> bool:
    """The same test the xmem tier makes before it loads the stand-in instead of the SDK."""
    return os.environ.get(XMEM_STANDIN_ENV, "") not in ("", "0")


def backend_label(backend: str) -> str:
    if backend == "xmem" and xmem_standin_requested():
        return "xmem (stand-in banks on device memory, not X-Mem)"
    return backend


# ---------------------------------------------------------------------------- targets
@dataclass
class TargetInfo:
    """What the benchmark needs to know about the engine or server it drives."""

    page_size: int
    kv_bytes_per_token: int | None
    l2_total_tokens: int | None
    device_total_tokens: int | None
    context_length: int | None
    vocab_size: int | None
    # Key of the intended tier in cached_tokens_by_tier; None: any key but "device".
    tier_key: str | None
    extra: dict[str, Any] = field(default_factory=dict)


class Target(Protocol):
    """An engine or a server the benchmark sends requests to."""

    name: str
    label: str
    info: TargetInfo
    # Whether flush("device") evicts only GPU copies (so that re-sent prompts are tier hits).
    tier_flush: bool

    def generate(self, prompts: list[list[int]], sampling: dict[str, Any]) -> list[dict[str, Any]]:
        """Serve every prompt (submitted together); outputs in prompt order."""
        ...

    def flush(self, tier: str | None) -> None:
        """Drop the whole cache (None) or only GPU copies that have an L2 copy ("device")."""
        ...

    def stats(self) -> dict[str, Any]: ...

    def close(self) -> None: ...


class EngineTarget:
    """An in-process ``kvtier.Engine``; ``generate`` is synchronous, so wall time around it is
    the requests' latency."""

    def __init__(self, cfg: Config, backend: str) -> None:
        import kvtier
        from kvtier.tiers import TierError

        if backend == "peer":
            visible = torch.cuda.device_count() if cfg.device == "cuda" else 0
            if visible < 2:
                raise BackendSkipped(
                    f"the peer tier needs at least 2 GPUs; {visible} visible on {cfg.device}"
                )
        if backend == "xmem":
            why = xmem_unavailable()
            if why:
                raise BackendSkipped(why)
        self.name = backend
        self.label = backend_label(backend)
        self.tier_flush = True
        self.kwargs = engine_kwargs(cfg, backend)
        reason = None
        try:
            self.engine = kvtier.Engine(**self.kwargs)
        except TierError as e:
            reason = str(e)
        if reason is not None:
            # Outside the except block: its traceback no longer pins the half-built engine's
            # weights, so they can be freed before the next backend loads its own.
            _free_device_memory()
            raise BackendSkipped(reason)
        stats = self.engine.get_stats()
        sched = self.engine.scheduler
        self.info = TargetInfo(
            page_size=int(stats["page_size"]),
            kv_bytes_per_token=int(stats["kv_bytes_per_token"]),
            l2_total_tokens=int(stats["l2_total_tokens"]),
            device_total_tokens=int(stats["device_total_tokens"]),
            context_length=int(sched.context_length),
            vocab_size=int(sched.runner.vocab_size),
            tier_key=self.engine.server_args.hicache_tier,
            extra={
                "engine_kwargs": self.kwargs,
                "l2_tier": stats.get("l2_tier"),
                "l2_io_backend": stats.get("l2_io_backend"),
            },
        )

    def generate(self, prompts: list[list[int]], sampling: dict[str, Any]) -> list[dict[str, Any]]:
        out = self.engine.generate(input_ids=prompts, sampling_params=sampling)
        assert isinstance(out, list)
        return out

    def flush(self, tier: str | None) -> None:
        if not self.engine.flush_cache(tier):
            raise RuntimeError(f"flush_cache(tier={tier!r}) was refused: requests in flight")

    def stats(self) -> dict[str, Any]:
        return self.engine.get_stats()

    def close(self) -> None:
        self.engine.shutdown()
        del self.engine
        _free_device_memory()


def xmem_unavailable() -> str | None:
    """Why the xmem tier cannot start here (None: it can, or the engine will say), asked of the
    tier's own SDK loader before a model of tens of GB is loaded only to find out."""
    try:
        from kvtier.tiers.xmem import load_sdk
    except ImportError:
        return None
    from kvtier.tiers import TierError

    try:
        load_sdk()
    except TierError as e:
        return str(e)
    return None


def _free_device_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class HttpTarget:
    """A running server, through SGLang's native API: ``POST /generate`` with input_ids and
    ``POST /flush_cache`` (``{"tier": "device"}`` for a GPU-only flush)."""

    def __init__(self, cfg: Config) -> None:
        import httpx

        self.cfg = cfg
        self.client = httpx.Client(
            base_url=cfg.base_url or "", timeout=cfg.http_timeout, transport=cfg.http_transport
        )
        self.name = "server"
        server = self._server_info()
        if server.get("enable_hierarchical_cache") is False:
            self.client.close()
            raise BackendSkipped(
                f"the server at {cfg.base_url} runs without --enable-hierarchical-cache: "
                "it has no L2 tier to benchmark"
            )
        # Confirmed (or withdrawn) by the warm-up's response.
        self.tier_flush = True
        tier = server.get("hicache_tier") or server.get("l2_tier")
        self.label = f"server {cfg.base_url}" + (f" ({tier})" if tier else "")

        def num(key: str) -> int | None:
            v = server.get(key)
            return int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None

        self.info = TargetInfo(
            page_size=num("page_size") or cfg.page_size,
            kv_bytes_per_token=num("kv_bytes_per_token"),
            l2_total_tokens=num("l2_total_tokens"),
            device_total_tokens=num("device_total_tokens") or num("max_total_num_tokens"),
            context_length=num("context_length") or num("max_context_length"),
            vocab_size=num("vocab_size"),
            tier_key=tier if isinstance(tier, str) else None,
            extra={"server_info_keys": sorted(server)},
        )

    def _server_info(self) -> dict[str, Any]:
        for path in ("/get_server_info", "/server_info"):
            try:
                r = self.client.get(path)
            except Exception as e:  # an unreachable server fails on the first request instead
                logger.warning("GET %s failed: %s", path, e)
                continue
            if r.status_code == 200:
                try:
                    body = r.json()
                except ValueError:
                    continue
                if isinstance(body, dict):
                    return body
        return {}

    def _post_generate(self, prompt: list[int], sampling: dict[str, Any]) -> dict[str, Any]:
        r = self.client.post("/generate", json={"input_ids": prompt, "sampling_params": sampling})
        if r.status_code != 200:
            raise RuntimeError(f"POST /generate: HTTP {r.status_code}: {r.text[:500]}")
        body = r.json()
        if isinstance(body, list):
            body = body[0]
        return body

    def generate(self, prompts: list[list[int]], sampling: dict[str, Any]) -> list[dict[str, Any]]:
        if len(prompts) == 1:
            return [self._post_generate(prompts[0], sampling)]
        # One request per prompt, all in flight at once: every server accepts that shape.
        with ThreadPoolExecutor(max_workers=min(len(prompts), 256)) as pool:
            return list(pool.map(lambda p: self._post_generate(p, sampling), prompts))

    def flush(self, tier: str | None) -> None:
        body = {"tier": tier} if tier else None
        for _ in range(50):
            r = self.client.post("/flush_cache", json=body)
            if r.status_code == 200:
                return
            if tier or r.status_code != 400:
                break
            time.sleep(0.2)  # a server refuses a full flush (400) until requests drain
        raise RuntimeError(f"POST /flush_cache {body}: HTTP {r.status_code}: {r.text[:300]}")

    def stats(self) -> dict[str, Any]:
        return self._server_info()

    def close(self) -> None:
        self.client.close()


# ---------------------------------------------------------------------------- prompts
class PromptFactory:
    """Random token ids; the first two tokens count prompts, so no two prompts made within a
    ``span`` (vocabulary range) share even their first token: no prefix is ever shared."""

    def __init__(self, vocab_size: int | None, seed: int) -> None:
        self.lo = 10  # stay clear of the small special ids (pad, eos) of tiny vocabularies
        self.hi = max(self.lo + 2, min(vocab_size or 32000, 32000))
        self.span = self.hi - self.lo
        self.rng = random.Random(seed)
        self.count = 0

    def make(self, n: int, length: int) -> list[list[int]]:
        if n > self.span:
            raise ValueError(f"{n} prompts with distinct first tokens need a vocabulary > {n}")
        prompts = []
        for _ in range(n):
            c = self.count
            self.count += 1
            head = [self.lo + c % self.span, self.lo + (c // self.span) % self.span]
            body = [self.rng.randrange(self.lo, self.hi) for _ in range(max(0, length - 2))]
            prompts.append((head + body)[:length])
        return prompts


def expected_hit_tokens(length: int, page_size: int) -> int:
    """Tokens a full hit serves from cache after one pass over the same prompt: all but the
    last (always computed, so that its logits exist) when the prompt fills whole pages (the
    last page lends its other tokens' KV), else the whole pages before the partial last one
    (which the first pass never completed)."""
    if length % page_size == 0:
        return length - 1
    return (length - 1) // page_size * page_size


# ---------------------------------------------------------------------------- verification
def split_cached(meta: dict[str, Any]) -> tuple[int, int, dict[str, int]]:
    """(cached tokens, of which from the GPU, per L2 tier) from a response's meta_info."""
    by_tier = meta.get("cached_tokens_by_tier") or {}
    device = int(by_tier.get("device", 0))
    l2 = {k: int(v) for k, v in by_tier.items() if k != "device" and v}
    return int(meta.get("cached_tokens", 0) or 0), device, l2


def check_served(
    target: Target, meta: dict[str, Any], kind: str, expected: int, where: str
) -> bool | None:
    """Check that a timed request was served as ``kind`` intends: "recompute" (nothing cached),
    "gpu_hit" (``expected`` tokens from the GPU), "tier_hit" (``expected`` tokens from the
    intended L2 tier, none from the GPU). Returns True (verified) or None (the target does not
    report tiers); raises VerificationError otherwise."""
    cached, device, l2 = split_cached(meta)
    has_tiers = "cached_tokens_by_tier" in meta
    if kind == "recompute":
        if cached:
            raise VerificationError(
                f"{where}: the first send of a unique prompt found {cached} tokens cached "
                f"({meta.get('cached_tokens_by_tier')}); the cache was not flushed or prompts "
                "share a prefix, so this is not a recompute"
            )
        return True if has_tiers else None
    if not has_tiers:
        if cached == 0:
            raise VerificationError(
                f"{where}: the second send of a prompt found nothing cached: the target keeps "
                "no prefix cache (or dropped it), so no hit can be timed"
            )
        return None
    want_key = target.info.tier_key
    if kind == "gpu_hit":
        ok = device == expected and not l2
        want = {"device": expected}
    else:
        served = l2.get(want_key, 0) if want_key else sum(l2.values())
        ok = device == 0 and served == expected and (want_key is None or set(l2) == {want_key})
        want = {want_key or "<L2 tier>": expected}
    if not ok:
        hint = (
            " (the GPU still held the prompt: was the device flush skipped?)"
            if kind == "tier_hit" and device
            else ""
        )
        raise VerificationError(
            f"{where}: the {kind.replace('_', ' ')} was served {meta.get('cached_tokens_by_tier')}"
            f" but {want} was intended{hint}; the timing would not measure "
            f"{'the ' + str(want_key) + ' tier' if kind == 'tier_hit' else 'a GPU hit'}"
        )
    return True


# ---------------------------------------------------------------------------- TTFT
TTFT_SAMPLING = {"max_new_tokens": 1, "temperature": 0}
# Timed kinds of a new turn (--turn-tokens) and the hit each one's prefix is checked as.
TURN_KINDS = {"turn_gpu": "gpu_hit", "turn_tier": "tier_hit"}


def timed_request(target: Target, prompt: list[int]) -> tuple[float, dict[str, Any]]:
    """Wall-clock seconds of one single-token request (its TTFT) and its output."""
    start = time.perf_counter()
    out = target.generate([prompt], TTFT_SAMPLING)[0]
    return time.perf_counter() - start, out


def plan_ttft(cfg: Config, info: TargetInfo) -> tuple[list[int], list[dict[str, Any]], int]:
    """(lengths to run, lengths skipped with reasons, prompts per length)."""
    page = info.page_size
    turn = cfg.turn_tokens
    runnable: list[int] = []
    skipped: list[dict[str, Any]] = []
    for n in cfg.lengths:
        why = None
        if expected_hit_tokens(n, page) == 0:
            why = f"{n} tokens is less than one page ({page}): nothing to cache"
        elif info.context_length and n + turn + 1 > info.context_length:
            why = f"{n} tokens exceeds the context length ({info.context_length})"
            if turn:
                why = f"{n} + {turn} turn tokens exceed the context length ({info.context_length})"
        elif info.device_total_tokens and n + turn + 2 * page > info.device_total_tokens:
            why = (
                f"{n} tokens do not fit the GPU KV pool ({info.device_total_tokens} tokens); "
                "raise --mem-fraction-static or --max-total-tokens"
            )
        if why:
            skipped.append({"length": n, "reason": why})
        else:
            runnable.append(n)
    if not runnable:
        return [], skipped, 0
    # One page of slack per prompt: the page the new token completes may be backed up too; and
    # the two new turns' tokens (--turn-tokens) stay cached beside it.
    pages_per_prompt = math.ceil((max(runnable) + 2 * turn) / page) + 1
    if info.l2_total_tokens is None:
        fit = cfg.num_prompts or 1
    else:
        fit = info.l2_total_tokens // page // pages_per_prompt
    n_prompts = fit if cfg.num_prompts is None else min(cfg.num_prompts, fit)
    if n_prompts < 1:
        for n in runnable:
            skipped.append(
                {
                    "length": n,
                    "reason": f"the L2 tier ({info.l2_total_tokens} tokens) holds no prompt of "
                    f"{max(runnable)} tokens; raise --hicache-size",
                }
            )
        return [], skipped, 0
    return runnable, skipped, n_prompts


def evict_to_tier(cfg: Config, target: Target) -> None:
    """Drop the GPU copies of everything that has an L2 copy, so the next sends are tier hits.
    Not sent to a server that cannot be seen to support it (it might flush everything)."""
    if cfg.skip_device_flush or not target.tier_flush:
        return
    target.flush("device")


def warm_up(cfg: Config, target: Target, factory: PromptFactory, length: int) -> dict[str, float]:
    """One small request through each path the timed ones take (miss, a tier hit, and with
    ``--turn-tokens`` a new turn with its prefix on the GPU and in L2), so
    kernel compilation and first-touch costs stay out of the numbers. A server whose responses
    carry no ``cached_tokens_by_tier`` is marked as one whose tier hits cannot be guaranteed."""
    target.flush(None)
    prompt = factory.make(1, length)[0]
    miss_s, out = timed_request(target, prompt)
    if "cached_tokens_by_tier" not in out["meta_info"] and target.tier_flush:
        target.tier_flush = False
        print(
            f"[{target.label}] responses carry no meta_info.cached_tokens_by_tier: tier hits "
            "cannot be guaranteed (no GPU-only flush is sent; the second send of a prompt is "
            "whatever hit the server serves) and results are labelled unverified",
            file=sys.stderr,
        )
    result = {"warmup_miss_s": miss_s}
    evict_to_tier(cfg, target)
    result["warmup_hit_s"], _ = timed_request(target, prompt)
    if cfg.turn_tokens:
        # A new turn's extend (its prefix on the GPU, then in L2 and loaded layer by layer
        # under the extend) takes kernels and shapes the plain hits do not.
        turns = factory.make(2, cfg.turn_tokens)
        result["warmup_turn_gpu_s"], _ = timed_request(target, prompt + turns[0])
        evict_to_tier(cfg, target)
        result["warmup_turn_tier_s"], _ = timed_request(target, prompt + turns[1])
    target.flush(None)
    return result


def _load_counters(target: Target) -> tuple[float, float]:
    """(bytes loaded from L2, seconds the loads took) as the engine counts them."""
    s = target.stats()
    loaded = float(s.get("loaded_bytes") or 0.0)
    bw = float(s.get("load_bandwidth_gbps") or 0.0)
    return loaded, (loaded / (bw * 1e9) if bw > 0 else 0.0)


def _ttft_sample(
    target: Target,
    out: dict[str, Any],
    expected: int,
    fields: dict[str, Any],
    check: str | None = None,
) -> tuple[dict[str, Any], VerificationError | None]:
    """One timed request as a result row (``fields``: length, repeat, prompt, kind, ttft_s),
    checked as ``check`` (``check_served``'s kinds; default the row's kind); the error, if the
    check failed, comes back beside it."""
    meta = out["meta_info"]
    where = (
        f"[{target.label}] {fields['length']} tokens, repeat {fields['repeat']}, "
        f"prompt {fields['prompt']}"
    )
    error: VerificationError | None = None
    try:
        verified = check_served(target, meta, check or fields["kind"], expected, where)
    except VerificationError as e:
        verified, error = False, e
    cached, device, l2 = split_cached(meta)
    row = {
        "backend": target.name,
        "label": target.label,
        **fields,
        "cached_tokens": cached,
        "cached_device": device,
        "cached_l2": sum(l2.values()),
        "cached_tokens_by_tier": meta.get("cached_tokens_by_tier"),
        "expected_hit_tokens": expected,
        "verified": verified,
    }
    return row, error


def run_ttft(
    cfg: Config, target: Target, factory: PromptFactory, results: Results
) -> list[dict[str, Any]]:
    """Every TTFT sample of one backend (also appended to ``results`` as it goes, so a failure
    keeps what was measured, the failing request included)."""
    info = target.info
    lengths, skipped, n_prompts = plan_ttft(cfg, info)
    for s in skipped:
        results.skipped.append({"backend": target.name, "mode": "ttft", **s})
        print(f"[{target.label}] skipped {s['length']} tokens: {s['reason']}", file=sys.stderr)
    samples: list[dict[str, Any]] = []
    page, turn = info.page_size, cfg.turn_tokens

    def measure(prompt: list[int], kind: str, length: int, rep: int, i: int) -> None:
        check = TURN_KINDS.get(kind, kind)
        if kind in TURN_KINDS:
            # A new turn: the prompt followed by `turn` fresh tokens (each turn's first token is
            # new, so no earlier turn's own tokens match).
            prompt = prompt + factory.make(1, turn)[0]
        seconds, out = timed_request(target, prompt)
        expected = expected_hit_tokens(length, page)
        if kind in TURN_KINDS:
            # Found cached, from where the check says: at least the prompt's whole pages, at
            # most all of it (an earlier turn may have completed its last page).
            _, device, l2 = split_cached(out["meta_info"])
            served = device if check == "gpu_hit" else sum(l2.values())
            expected = (
                served if length // page * page <= served <= length else length // page * page
            )
        fields = {"length": length, "repeat": rep, "prompt": i, "kind": kind, "ttft_s": seconds}
        row, error = _ttft_sample(target, out, expected, fields, check)
        samples.append(row)
        results.ttft_samples.append(row)
        if error is not None:
            raise error

    kinds = ("recompute", "gpu_hit") if cfg.gpu_hit else ("recompute",)
    for length in lengths:
        loads_before = _load_counters(target)
        for rep in range(cfg.repeats):
            target.flush(None)
            prompts = factory.make(n_prompts, length)
            desc = f"{target.name} {length} tok"
            for i, prompt in enumerate(progress(prompts, desc + " miss")):
                for kind in kinds:
                    measure(prompt, kind, length, rep, i)
            evict_to_tier(cfg, target)
            for i, prompt in enumerate(progress(prompts, desc + " tier hit")):
                measure(prompt, "tier_hit", length, rep, i)
            if turn:
                # After the plain hits (which they would change: a turn completes the prompt's
                # last page). The tier hits brought the prefixes back to the GPU.
                for i, prompt in enumerate(progress(prompts, desc + " turn GPU")):
                    measure(prompt, "turn_gpu", length, rep, i)
                evict_to_tier(cfg, target)
                for i, prompt in enumerate(progress(prompts, desc + " turn tier")):
                    measure(prompt, "turn_tier", length, rep, i)
        loads_after = _load_counters(target)
        moved = loads_after[0] - loads_before[0]
        secs = loads_after[1] - loads_before[1]
        results.engine_load_gbps[(target.name, length)] = moved / secs / 1e9 if secs > 0 else None
    return samples


def summarize_ttft(results: Results) -> list[dict[str, Any]]:
    """One row per (backend, length): mean and median TTFT of each kind, speed-up, and the tier
    hit against the ideal load time at the measured host-to-device bandwidth."""
    h2d = results.bandwidth.get("h2d_gbps")
    rows: list[dict[str, Any]] = []
    keys = sorted({(s["backend"], s["length"]) for s in results.ttft_samples}, key=_order(results))
    for backend, length in keys:
        group = [
            s for s in results.ttft_samples if s["backend"] == backend and s["length"] == length
        ]
        info = results.infos.get(backend)

        def times(kind: str, g: list[dict[str, Any]] = group) -> list[float]:
            # A request that failed verification measured something else: no number.
            return [s["ttft_s"] for s in g if s["kind"] == kind and s["verified"] is not False]

        rec, gpu, tier = times("recompute"), times("gpu_hit"), times("tier_hit")
        kv_bytes = length * info.kv_bytes_per_token if info and info.kv_bytes_per_token else None
        ideal = kv_bytes / (h2d * 1e9) if kv_bytes and h2d else None
        verified = {s["verified"] for s in group}
        row = {
            "backend": backend,
            "label": group[0]["label"],
            "length": length,
            "n": len(tier),
            "recompute_ms": _mean_ms(rec),
            "gpu_hit_ms": _mean_ms(gpu),
            "tier_hit_ms": _mean_ms(tier),
            "recompute_p50_ms": _median_ms(rec),
            "gpu_hit_p50_ms": _median_ms(gpu),
            "tier_hit_p50_ms": _median_ms(tier),
            "turn_gpu_ms": _mean_ms(times("turn_gpu")),
            "turn_tier_ms": _mean_ms(times("turn_tier")),
            "speedup": (statistics.mean(rec) / statistics.mean(tier)) if rec and tier else None,
            "kv_mb": kv_bytes / 1e6 if kv_bytes else None,
            "ideal_load_ms": ideal * 1e3 if ideal else None,
            "hit_over_ideal": statistics.mean(tier) / ideal if ideal and tier else None,
            "engine_load_gbps": results.engine_load_gbps.get((backend, length)),
            "verified": _verified_label(verified),
        }
        rows.append(row)
    return rows


def _verified_label(flags: set[bool | None]) -> str:
    if False in flags:
        return "FAILED"
    return "yes" if flags == {True} else "unverified"


def _order(results: Results) -> Any:
    backends = list(dict.fromkeys(s["backend"] for s in results.ttft_samples))
    return lambda k: (backends.index(k[0]), k[1])


def _mean_ms(xs: list[float]) -> float | None:
    return statistics.mean(xs) * 1e3 if xs else None


def _median_ms(xs: list[float]) -> float | None:
    return statistics.median(xs) * 1e3 if xs else None


BAR_LENGTH = 80 * 1024  # the seed's and the DESIGN's "80K tokens"
BAR_HIT_OVER_IDEAL = 1.10  # dram tier-hit TTFT <= 1.10 x KV bytes / measured H2D bandwidth
BAR_DRAM_OVER_FAST = 6.7  # dram / xmem (or peer) tier-hit TTFT, the seed's headline


def check_bars(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The DESIGN's TTFT bars, where this run measured what they need (80K tokens)."""
    by = {(r["backend"], r["length"]): r for r in rows}
    out: list[dict[str, Any]] = []
    dram = by.get(("dram", BAR_LENGTH))
    if dram and dram["hit_over_ideal"] is not None:
        out.append(
            {
                "bar": f"dram tier hit at 80K <= {BAR_HIT_OVER_IDEAL} x ideal load",
                "value": dram["hit_over_ideal"],
                "met": dram["hit_over_ideal"] <= BAR_HIT_OVER_IDEAL,
            }
        )
    for fast in ("xmem", "peer"):
        other = by.get((fast, BAR_LENGTH))
        if dram and other and dram["tier_hit_ms"] and other["tier_hit_ms"]:
            ratio = dram["tier_hit_ms"] / other["tier_hit_ms"]
            out.append(
                {
                    "bar": f"tier-hit TTFT dram / {other['label']} at 80K >= {BAR_DRAM_OVER_FAST}",
                    "value": ratio,
                    "met": ratio >= BAR_DRAM_OVER_FAST,
                }
            )
    return out


def compare_backends(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per length, each backend's tier-hit TTFT against the first backend's (the seed's
    headline is dram / xmem at 80K)."""
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    if len(backends) < 2:
        return []
    base = backends[0]
    by = {(r["backend"], r["length"]): r for r in rows}
    out = []
    for length in sorted({r["length"] for r in rows}):
        b = by.get((base, length))
        for other in backends[1:]:
            o = by.get((other, length))
            if not b or not o or not b["tier_hit_ms"] or not o["tier_hit_ms"]:
                continue
            out.append(
                {
                    "length": length,
                    "pair": f"{base} / {other}",
                    "base_ms": b["tier_hit_ms"],
                    "other_ms": o["tier_hit_ms"],
                    "ratio": b["tier_hit_ms"] / o["tier_hit_ms"],
                }
            )
    return out


# ---------------------------------------------------------------------------- throughput
def plan_throughput(cfg: Config, info: TargetInfo) -> tuple[int, int, str | None]:
    """(prompts, tokens per prompt, reason to skip or None)."""
    length, page = cfg.tp_prompt_len, info.page_size
    if expected_hit_tokens(length, page) == 0:
        return 0, length, f"--tp-prompt-len {length} is less than one page ({page}) plus one"
    if info.context_length and length + cfg.max_new_tokens > info.context_length:
        return 0, length, f"--tp-prompt-len {length} exceeds the context ({info.context_length})"
    if info.device_total_tokens and length + cfg.max_new_tokens + 2 * page > (
        info.device_total_tokens
    ):
        return 0, length, f"{length} tokens do not fit the GPU KV pool"
    n = cfg.tp_num_prompts
    if info.l2_total_tokens is not None:
        per_prompt = math.ceil((length + cfg.max_new_tokens) / page) + 1
        n = min(n, info.l2_total_tokens // page // per_prompt)
    if n < 1:
        return 0, length, f"the L2 tier ({info.l2_total_tokens} tokens) holds no prompt"
    return n, length, None


def run_throughput(
    cfg: Config, target: Target, factory: PromptFactory, results: Results
) -> list[dict[str, Any]]:
    """One timed batch of every prompt per hit rate; rows also appended to ``results``."""
    n, length, why = plan_throughput(cfg, target.info)
    if why:
        results.skipped.append({"backend": target.name, "mode": "throughput", "reason": why})
        print(f"[{target.label}] throughput skipped: {why}", file=sys.stderr)
        return []
    prompts = factory.make(n, length)
    rng = random.Random(cfg.seed + 1)
    page = target.info.page_size
    sampling = {"max_new_tokens": cfg.max_new_tokens, "temperature": 0, "ignore_eos": True}
    rows: list[dict[str, Any]] = []
    for rate in progress(cfg.hit_rates, f"{target.name} throughput"):
        target.flush(None)
        k = round(rate * n)
        # Hits are spread through the batch, as in a real mix of returning and new prompts.
        hit_ids = sorted(rng.sample(range(n), k))
        if hit_ids:
            target.generate([prompts[i] for i in hit_ids], TTFT_SAMPLING)
            evict_to_tier(cfg, target)
        start = time.perf_counter()
        outs = target.generate(prompts, sampling)
        wall = time.perf_counter() - start
        device = sum(split_cached(o["meta_info"])[1] for o in outs)
        l2: dict[str, int] = {}
        for o in outs:
            for key, v in split_cached(o["meta_info"])[2].items():
                l2[key] = l2.get(key, 0) + v
        prompt_tokens = n * length
        output_tokens = sum(len(o.get("output_ids") or []) for o in outs)
        expected_l2 = k * expected_hit_tokens(length, page)
        has_tiers = all("cached_tokens_by_tier" in o["meta_info"] for o in outs)
        failure: VerificationError | None = None
        verified: bool | None = None
        if has_tiers:
            served = sum(l2.values())
            verified = not device and served == expected_l2
            if not verified:
                failure = VerificationError(
                    f"[{target.label}] throughput at {rate:.0%} hits: {served} tokens came from "
                    f"L2 and {device} from the GPU, but {expected_l2} from L2 and none from the "
                    "GPU were intended (warmed prompts not evicted from the GPU, or not all "
                    "backed up to L2)"
                )
        row = {
            "backend": target.name,
            "label": target.label,
            "target_hit_rate": rate,
            "num_prompts": n,
            "hit_prompts": k,
            "prompt_len": length,
            "prompt_tokens": prompt_tokens,
            "output_tokens": output_tokens,
            "wall_s": wall,
            "prompt_tok_per_s": prompt_tokens / wall,
            "output_tok_per_s": output_tokens / wall,
            "total_tok_per_s": (prompt_tokens + output_tokens) / wall,
            "hit_rate_device": device / prompt_tokens,
            "hit_rate_l2": sum(l2.values()) / prompt_tokens,
            "hit_rate_by_tier": {key: v / prompt_tokens for key, v in l2.items()},
            "verified": _verified_label({verified}),
        }
        rows.append(row)
        results.throughput_rows.append(row)
        if failure is not None:
            raise failure
    target.flush(None)
    return rows


# ---------------------------------------------------------------------------- results
@dataclass
class Results:
    config: dict[str, Any]
    meta: dict[str, Any]
    bandwidth: dict[str, Any]
    ttft_samples: list[dict[str, Any]] = field(default_factory=list)
    throughput_rows: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    infos: dict[str, TargetInfo] = field(default_factory=dict)
    warmup: dict[str, dict[str, float]] = field(default_factory=dict)
    engine_load_gbps: dict[tuple[str, int], float | None] = field(default_factory=dict)
    error: str | None = None
    files: dict[str, Path] = field(default_factory=dict)
    ttft_rows: list[dict[str, Any]] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        if self.error:
            return 1
        return 0 if (self.ttft_samples or self.throughput_rows) else 2


TTFT_COLUMNS = [
    ("backend", "backend", fmt_str),
    ("length", "tokens", fmt_str),
    ("n", "N", fmt_str),
    ("recompute_ms", "recompute ms", fmt_float(1)),
    ("gpu_hit_ms", "GPU hit ms", fmt_float(1)),
    ("tier_hit_ms", "tier hit ms", fmt_float(1)),
    ("turn_gpu_ms", "turn GPU ms", fmt_float(1)),
    ("turn_tier_ms", "turn tier ms", fmt_float(1)),
    ("speedup", "speed-up", fmt_float(1)),
    ("kv_mb", "KV MB", fmt_float(1)),
    ("ideal_load_ms", "ideal load ms", fmt_float(1)),
    ("hit_over_ideal", "hit/ideal", fmt_float(2)),
    ("engine_load_gbps", "load GB/s", fmt_float(1)),
    ("verified", "verified", fmt_str),
]
COMPARE_COLUMNS = [
    ("length", "tokens", fmt_str),
    ("pair", "tier hit TTFT", fmt_str),
    ("base_ms", "ms", fmt_float(1)),
    ("other_ms", "ms", fmt_float(1)),
    ("ratio", "ratio", fmt_float(2)),
]
THROUGHPUT_COLUMNS = [
    ("backend", "backend", fmt_str),
    ("target_hit_rate", "target hits", lambda v: f"{v:.0%}"),
    ("hit_rate_l2", "L2 hits", lambda v: f"{v:.1%}"),
    ("hit_rate_device", "GPU hits", lambda v: f"{v:.1%}"),
    ("hit_prompts", "hit prompts", fmt_str),
    ("num_prompts", "prompts", fmt_str),
    ("prompt_len", "tokens", fmt_str),
    ("wall_s", "wall s", fmt_float(2)),
    ("prompt_tok_per_s", "prompt tok/s", fmt_float(0)),
    ("output_tok_per_s", "output tok/s", fmt_float(1)),
    ("verified", "verified", fmt_str),
]


def print_report(results: Results) -> None:
    bw = results.bandwidth
    hw = results.meta["hardware"]
    print(f"kvcache_benchmark: model {results.config['model']} on {results.config['device']}")
    print(f"hardware: GPU {hw['gpu_name'] or 'none'} x{hw['gpu_count']}, CPU {hw['cpu']}")
    if bw.get("measured"):
        print(
            f"bulk copy ({bw['bytes'] / GiB:.0f} GiB, median of {bw['repeats']}): "
            f"H2D {bw['h2d_gbps']:.1f} GB/s, D2H {bw['d2h_gbps']:.1f} GB/s, "
            f"D2D {bw['d2d_gbps']:.0f} GB/s"
            + (f", peer GPU1->GPU0 {bw['peer_gbps']:.0f} GB/s" if "peer_gbps" in bw else "")
        )
    else:
        print(f"bulk copy: {bw.get('note')}")
    labels = {r["backend"]: r["label"] for r in results.ttft_rows + results.throughput_rows}
    for name, label in labels.items():
        if label != name:
            print(f"note: {name} = {label}")
    for s in results.skipped:
        what = f"{s['length']} tokens" if "length" in s else s.get("mode", "all")
        print(f"skipped: {s['backend']} ({what}): {s['reason']}")
    if results.ttft_rows:
        print("\nTTFT (mean of N; recompute = miss, full prefill; tier hit = served from L2)")
        turns = results.config.get("turn_tokens")
        if turns:
            print(f"(turn = the prompt, then {turns} new tokens; the prompt on the GPU / in L2)")
        # The new-turn columns only where they were timed.
        rows = results.ttft_rows
        columns = [
            c
            for c in TTFT_COLUMNS
            if not c[0].startswith("turn_") or any(r.get(c[0]) is not None for r in rows)
        ]
        print(format_table(results.ttft_rows, columns))
        cmp_rows = compare_backends(results.ttft_rows)
        if cmp_rows:
            print("\nTier-hit TTFT, backend against backend")
            print(format_table(cmp_rows, COMPARE_COLUMNS))
        if not bw.get("measured"):
            print("(ideal load time needs the CUDA bandwidth probe: n/a here)")
        for bar in check_bars(results.ttft_rows):
            verdict = "met" if bar["met"] else "NOT met"
            print(f"DESIGN bar: {bar['bar']}: {bar['value']:.2f} -> {verdict}")
    if results.throughput_rows:
        print("\nThroughput (one batch of every prompt per hit rate)")
        print(format_table(results.throughput_rows, THROUGHPUT_COLUMNS))
    if results.meta.get("plot_note"):
        print(f"\nplots: {results.meta['plot_note']}")
    rows = results.ttft_rows + results.throughput_rows
    if any(r["verified"] == "unverified" for r in rows):
        print(
            "\nunverified: the target does not report cached_tokens_by_tier, so these hits may "
            "have come from the GPU rather than from the L2 tier"
        )
    if results.error:
        print(f"\nERROR: {results.error}")


def write_outputs(cfg: Config, results: Results) -> None:
    stamp = run_stamp()
    out = cfg.output_dir
    files = results.files
    modes = "+".join(m for m, on in (("ttft", cfg.ttft), ("throughput", cfg.throughput)) if on)
    # Each CSV line also names the run's setup, so files from several runs can be concatenated.
    hw = results.meta["hardware"]
    setup = {
        "run": stamp,
        "model": cfg.model,
        "hardware": hw["gpu_name"] or hw["cpu"],
        "page_size": cfg.page_size,
        "hicache_size_gb": cfg.hicache_size,
        "io_backend": cfg.hicache_io_backend,
        "mem_layout": cfg.hicache_mem_layout,
        "write_policy": cfg.hicache_write_policy,
    }
    if results.ttft_samples:
        files["ttft_csv"] = write_csv(
            out / f"kvcache_ttft_{stamp}.csv", [{**r, **setup} for r in results.ttft_samples]
        )
    if results.throughput_rows:
        files["throughput_csv"] = write_csv(
            out / f"kvcache_throughput_{stamp}.csv",
            [{**r, **setup} for r in results.throughput_rows],
        )
    if cfg.plots:
        plot_notes = make_plots(cfg, results, stamp)
        if plot_notes:
            results.meta["plot_note"] = plot_notes
    doc = {
        "config": results.config,
        **results.meta,
        "bandwidth": results.bandwidth,
        "targets": {k: dataclasses.asdict(v) for k, v in results.infos.items()},
        "warmup": results.warmup,
        "skipped": results.skipped,
        "error": results.error,
        "ttft_summary": results.ttft_rows,
        "ttft_backend_ratios": compare_backends(results.ttft_rows),
        "design_bars": check_bars(results.ttft_rows),
        "ttft_samples": results.ttft_samples,
        "throughput": results.throughput_rows,
        "files": {k: str(v) for k, v in files.items()},
    }
    files["json"] = write_json(out / f"kvcache_{modes}_{stamp}.json", doc)


def make_plots(cfg: Config, results: Results, stamp: str) -> str | None:
    plt, why = load_pyplot()
    if plt is None:
        return why
    rows, out = results.ttft_rows, cfg.output_dir
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    if rows:
        fig, ax = plt.subplots(figsize=(8, 5))
        for i, b in enumerate(backends):
            rs = [r for r in rows if r["backend"] == b]
            x = [r["length"] / 1024 for r in rs]
            c = colors[i % len(colors)]
            name = rs[0].get("label", b)  # names a stand-in as such
            ax.plot(x, [r["tier_hit_ms"] for r in rs], "o-", color=c, label=f"{name}: tier hit")
            ax.plot(x, [r["recompute_ms"] for r in rs], "s--", color=c, label=f"{name}: recompute")
            if any(r["gpu_hit_ms"] for r in rs):
                ax.plot(x, [r["gpu_hit_ms"] for r in rs], "^:", color=c, label=f"{name}: GPU hit")
        ax.set_yscale("log")
        ax.set_xlabel("prompt length (K tokens)")
        ax.set_ylabel("TTFT (ms, log scale)")
        ax.set_title(f"TTFT vs prompt length — {cfg.model}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        results.files["ttft_png"] = _save(fig, out / f"kvcache_ttft_{stamp}.png")
        plt.close(fig)

        fig, ax = plt.subplots(figsize=(8, 5))
        for i, b in enumerate(backends):
            rs = [r for r in rows if r["backend"] == b and r["speedup"]]
            ax.plot(
                [r["length"] / 1024 for r in rs],
                [r["speedup"] for r in rs],
                "o-",
                color=colors[i % len(colors)],
                label=rs[0].get("label", b) if rs else b,
            )
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xlabel("prompt length (K tokens)")
        ax.set_ylabel("speed-up: recompute TTFT / tier-hit TTFT")
        ax.set_title("Tier hit against recompute")
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.tight_layout()
        results.files["speedup_png"] = _save(fig, out / f"kvcache_speedup_{stamp}.png")
        plt.close(fig)
    tp = results.throughput_rows
    if tp:
        fig, ax = plt.subplots(figsize=(8, 5))
        for i, b in enumerate(dict.fromkeys(r["backend"] for r in tp)):
            rs = [r for r in tp if r["backend"] == b]
            ax.plot(
                [100 * r["target_hit_rate"] for r in rs],
                [r["prompt_tok_per_s"] for r in rs],
                "o-",
                color=colors[i % len(colors)],
                label=rs[0]["label"],
            )
        ax.set_xlabel("hit rate (%)")
        ax.set_ylabel("prompt tokens / s")
        ax.set_title(f"Throughput vs hit rate — {tp[0]['num_prompts']} x {tp[0]['prompt_len']}")
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.tight_layout()
        results.files["throughput_png"] = _save(fig, out / f"kvcache_throughput_{stamp}.png")
        plt.close(fig)
    return None


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


# ---------------------------------------------------------------------------- driver
def open_target(cfg: Config, backend: str) -> Target:
    if cfg.base_url:
        return HttpTarget(cfg)
    return EngineTarget(cfg, backend)


def run(cfg: Config) -> Results:
    """Run every requested mode on every backend; results (also partial ones, on error) are
    written to ``cfg.output_dir`` and printed."""
    config = {
        k: (str(v) if isinstance(v, Path) else v)
        for k, v in vars(cfg).items()
        if k != "http_transport"
    }
    config["xmem_standin"] = xmem_standin_requested()
    results = Results(config=config, meta=run_metadata(), bandwidth={})
    if cfg.base_url:
        results.meta["bandwidth_note"] = "measured on the benchmark's machine, not the server's"
    results.bandwidth = copy_bandwidth(cfg.device, nbytes=cfg.bandwidth_bytes)
    want_peer = "peer" in cfg.backends and not cfg.base_url
    if want_peer and results.bandwidth.get("measured") and torch.cuda.device_count() >= 2:
        # What a peer-tier load could reach: GPU 1 -> GPU 0 (the compute GPU), one copy.
        results.bandwidth["peer_gbps"] = peer_copy_bandwidth(1, 0, cfg.bandwidth_bytes)
    # A server is one target whatever --backend says: its own flags chose its tier.
    backends = ("server",) if cfg.base_url else cfg.backends
    factory_seed = cfg.seed
    try:
        for backend in backends:
            try:
                target = open_target(cfg, backend)
            except BackendSkipped as e:
                results.skipped.append({"backend": backend, "reason": str(e)})
                print(f"[{backend}] skipped: {e}", file=sys.stderr)
                continue
            try:
                results.infos[target.name] = target.info
                io = target.info.extra.get("l2_io_backend")
                if io:
                    print(f"[{target.label}] L2 IO backend: {io}")
                if target.info.tier_key is None and cfg.base_url:
                    print(
                        f"[{target.label}] the server reports no L2 tier name: any L2 tier "
                        "counts as a tier hit",
                        file=sys.stderr,
                    )
                factory = PromptFactory(target.info.vocab_size, factory_seed)
                warm_len = min(min(cfg.lengths), cfg.tp_prompt_len)
                warm_len = max(warm_len, 2 * target.info.page_size + 1)
                results.warmup[target.name] = warm_up(cfg, target, factory, warm_len)
                if cfg.ttft:
                    run_ttft(cfg, target, factory, results)
                if cfg.throughput:
                    run_throughput(cfg, target, factory, results)
            finally:
                target.close()
    except VerificationError as e:
        results.error = str(e)
    results.ttft_rows = summarize_ttft(results)
    write_outputs(cfg, results)
    print_report(results)
    for name, path in results.files.items():
        print(f"wrote {name}: {path}")
    return results


def main(argv: Sequence[str] | None = None) -> int:
    cfg = resolve_config(parse_args(argv))
    results = run(cfg)
    if results.error:
        print(f"kvcache_benchmark: verification failed: {results.error}", file=sys.stderr)
    elif results.exit_code == 2:
        print("kvcache_benchmark: nothing was measured (every backend skipped)", file=sys.stderr)
    return results.exit_code


if __name__ == "__main__":
    sys.exit(main())
