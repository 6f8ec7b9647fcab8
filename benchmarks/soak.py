"""Soak test: many concurrent multi-turn conversations against a kvtier server whose GPU pool and
L2 are both small, so that eviction, backups and load-back happen all the time; then checks that
nothing went wrong and nothing leaked.

Each client holds a conversation of ``--turns`` turns: every turn re-sends the whole history
(token ids through ``POST /generate``, greedy, ``ignore_eos``) plus a few new random tokens, and
the answer joins the history. A client starts a new conversation when one ends, until
``--duration`` seconds have passed or it has held ``--conversations`` conversations.

Checks (any failure makes the exit code 1):
  - no error responses, and every answer has the shape asked for (a share of turns, with
    ``--constrained-fraction``, is constrained by a regex to digits: those answers are digits);
  - a sample of (history -> answer) pairs, biased to turns served from L2, is re-run on a
    recompute reference (an in-process ``kvtier.Engine`` with ``disable_radix_cache``, or a
    server started with ``--disable-radix-cache``) and must match token for token;
  - ``/debug/check_integrity`` passes during the run, after draining and after a full flush;
  - after ``POST /flush_cache`` every GPU page is free, L2 is empty and pinned bytes (when the
    server reports them) are back to their value at the start;
  - throughput in the last window of the run (``--window-fraction``, a tenth by default) is at
    least ``--min-throughput-ratio`` of the first window after a warm-up (a leak or a lock never
    released shows up as a collapse);
  - the hierarchy was exercised: some prefix came back from L2 and the server loaded bytes.

Against a running server:

    python benchmarks/soak.py --base-url http://127.0.0.1:30000

Starting its own (the built-in tiny model on a CPU; flags after ``--`` go to the server and
replace the default small-pool hierarchical setup):

    python benchmarks/soak.py --start-server --duration 300 --json soak.json

For a GPU model every size scales together (prompts of thousands of tokens, page 64, a pool of
a few dozen conversations) and the recompute reference is best a second server on another GPU
(``--reference url``): an in-process reference would load the weights a second time.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import random
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import httpx
from common import fmt_str, format_table, run_metadata, write_json

REPO = Path(__file__).resolve().parent.parent

DEFAULT_MODEL = "builtin:tiny-qwen3"
# A GPU pool of 2048 tokens and an L2 twice that, for the default workload: 64 conversations of
# 24-124 tokens (~4,000 in all) fill the GPU pool twice over (their running requests alone fill
# it) and L2 about once, so both tiers evict constantly and a returning conversation often finds
# its prefix in L2 only. With longer conversations L2 thrashes and hits become rare.
DEFAULT_SERVER_FLAGS = (
    "--enable-hierarchical-cache",
    "--page-size",
    "4",
    "--max-total-tokens",
    "2048",
    "--hicache-ratio",
    "2",
)
# Server-side counters whose growth during the run the summary reports.
COUNTERS = (
    "requests_finished",
    "requests_aborted",
    "prompt_tokens",
    "generation_tokens",
    "cached_tokens",
    "retractions",
    "loaded_bytes",
    "backed_up_bytes",
    "load_ops",
    "backup_ops",
    "l2_evicted_pages",
    "l2_backups_skipped",
    "device_evictions_to_l2",
    "failed_loads",
    "failed_backups",
    "load_failures_recovered",
)
# Counters that must not grow in a soak without injected faults: each is a transfer that failed.
FAILURE_COUNTERS = ("failed_loads", "failed_backups", "load_failures_recovered")
# Ids below this are special tokens (pad, eos) in small vocabularies; random prompts avoid them.
LOWEST_TOKEN = 10
ERRORS_KEPT = 10


# ---------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class SoakConfig:
    """Everything a soak run depends on; built from the command line by ``parse_args``."""

    base_url: str | None = None
    start_server: bool = False
    model: str = DEFAULT_MODEL
    server_flags: tuple[str, ...] = DEFAULT_SERVER_FLAGS
    api_key: str | None = None
    clients: int = 64
    turns: int = 4
    conversations: int = 0  # per client; 0: until --duration
    duration: float = 120.0
    max_requests: int = 100_000  # a count bound on top of the time bound
    shared_prefix: int = 16
    prompt_tokens: tuple[int, int] = (8, 24)
    user_tokens: tuple[int, int] = (4, 12)
    output_tokens: tuple[int, int] = (8, 16)
    # Turns whose answer a regex constrains to digits (structured output; needs xgrammar on
    # the server): the grammar masks ride in batches of free requests under eviction.
    constrained_fraction: float = 0.125
    seed: int = 0
    verify_samples: int = 64
    reference: str = "engine"  # engine | server | url | none
    reference_url: str | None = None
    reference_flags: tuple[str, ...] = ()
    min_throughput_ratio: float = 0.9
    warmup_fraction: float = 0.1
    window_fraction: float = 0.1
    monitor_every: float = 5.0
    require_tier_traffic: bool = True
    request_timeout: float = 120.0
    drain_timeout: float = 120.0
    startup_timeout: float = 600.0
    max_errors: int = 100
    json_path: Path | None = None
    quiet: bool = False


# A constrained turn's regex: digits, more than any answer here holds, so that ignore_eos turns
# still end by length (the grammar never completes).
DIGITS = "[0-9]{4096}"


def _token_range(text: str) -> tuple[int, int]:
    """``"8"`` -> (8, 8); ``"8-16"`` -> (8, 16)."""
    lo, _, hi = text.partition("-")
    try:
        a, b = int(lo), int(hi or lo)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a count or a range A-B: {text!r}") from None
    if a < 0 or b < a:
        raise argparse.ArgumentTypeError(f"need 0 <= A <= B: {text!r}")
    return a, b


def parse_args(argv: Sequence[str] | None = None) -> SoakConfig:
    """Flags before ``--`` are the soak's; everything after ``--`` is passed to the server
    started by ``--start-server`` (replacing the default small-pool hierarchical setup)."""
    args = list(sys.argv[1:] if argv is None else argv)
    server_flags: tuple[str, ...] = DEFAULT_SERVER_FLAGS
    if "--" in args:
        i = args.index("--")
        args, server_flags = args[:i], tuple(args[i + 1 :])
    d = SoakConfig()
    p = argparse.ArgumentParser(
        prog="python benchmarks/soak.py",
        description="Concurrent multi-turn soak of a kvtier server with leak and output checks.",
        epilog="Flags after -- go to the server started by --start-server.",
    )
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--base-url", help="a running server, e.g. http://127.0.0.1:30000")
    target.add_argument(
        "--start-server", action="store_true", help="start a server on 127.0.0.1 for the run"
    )
    p.add_argument("--model", default=d.model, help="model of the started server(s)")
    p.add_argument("--api-key", default=d.api_key, help="bearer key of the server")
    p.add_argument("--clients", type=int, default=d.clients, help="concurrent conversations")
    p.add_argument("--turns", type=int, default=d.turns, help="turns per conversation")
    p.add_argument(
        "--conversations",
        type=int,
        default=d.conversations,
        help="conversations per client (0: new ones until --duration)",
    )
    p.add_argument(
        "--duration", type=float, default=d.duration, help="seconds after which no turn starts"
    )
    p.add_argument(
        "--max-requests",
        type=int,
        default=d.max_requests,
        help="turns sent in all, at most (the run is bounded in count as well as in time)",
    )
    p.add_argument(
        "--shared-prefix",
        type=int,
        default=d.shared_prefix,
        help="tokens every conversation starts with (a prefix the tree shares)",
    )
    p.add_argument(
        "--prompt-tokens",
        type=_token_range,
        default=d.prompt_tokens,
        help="first-turn tokens after the shared prefix: N or A-B",
    )
    p.add_argument(
        "--user-tokens", type=_token_range, default=d.user_tokens, help="new tokens per turn"
    )
    p.add_argument(
        "--output-tokens",
        type=_token_range,
        default=d.output_tokens,
        help="max_new_tokens per turn (always generated: ignore_eos)",
    )
    p.add_argument(
        "--constrained-fraction",
        type=float,
        default=d.constrained_fraction,
        help="share of turns constrained to digits by a regex (0: none; needs xgrammar)",
    )
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument(
        "--verify-samples",
        type=int,
        default=d.verify_samples,
        help="(history -> answer) pairs re-run on the reference",
    )
    p.add_argument(
        "--reference",
        choices=("engine", "server", "url", "none"),
        default=d.reference,
        help="recompute reference: an in-process Engine, a started server, --reference-url",
    )
    p.add_argument("--reference-url", help="a server running with --disable-radix-cache")
    p.add_argument(
        "--reference-flags",
        default="",
        help="extra flags for the reference server (one string, shell-quoted)",
    )
    p.add_argument(
        "--min-throughput-ratio",
        type=float,
        default=d.min_throughput_ratio,
        help="last-window over first-window throughput below this fails (0: report only)",
    )
    p.add_argument("--warmup-fraction", type=float, default=d.warmup_fraction)
    p.add_argument("--window-fraction", type=float, default=d.window_fraction)
    p.add_argument(
        "--monitor-every",
        type=float,
        default=d.monitor_every,
        help="seconds between integrity checks and stats samples during the run (0: off)",
    )
    p.add_argument(
        "--no-require-tier-traffic",
        dest="require_tier_traffic",
        action="store_false",
        help="do not fail when no prefix came back from L2",
    )
    p.add_argument("--request-timeout", type=float, default=d.request_timeout)
    p.add_argument("--drain-timeout", type=float, default=d.drain_timeout)
    p.add_argument("--startup-timeout", type=float, default=d.startup_timeout)
    p.add_argument(
        "--max-errors", type=int, default=d.max_errors, help="stop the load after this many"
    )
    p.add_argument("--json", dest="json_path", type=Path, help="write the report here")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    ns = p.parse_args(args)
    if ns.reference == "url" and not ns.reference_url:
        p.error("--reference url needs --reference-url")
    if ns.reference_url and ns.reference != "url":
        ns.reference = "url"
    if ns.clients < 1 or ns.turns < 1 or ns.conversations < 0 or ns.max_requests < 1:
        p.error("--clients, --turns and --max-requests must be >= 1, --conversations >= 0")
    if ns.duration <= 0:
        # Every run is bounded in time as well as in count.
        p.error("--duration must be > 0")
    if not 0 <= ns.warmup_fraction < 1 or not 0 < ns.window_fraction <= 0.5:
        p.error("need 0 <= --warmup-fraction < 1 and 0 < --window-fraction <= 0.5")
    if ns.output_tokens[0] < 1:
        p.error("--output-tokens must be >= 1")
    if not 0 <= ns.constrained_fraction <= 1:
        p.error("--constrained-fraction must be in [0, 1]")
    if ns.prompt_tokens[1] + ns.shared_prefix < 1:
        p.error("the first turn needs at least one token")
    return SoakConfig(
        base_url=ns.base_url,
        start_server=ns.start_server,
        model=ns.model,
        server_flags=server_flags,
        api_key=ns.api_key,
        clients=ns.clients,
        turns=ns.turns,
        conversations=ns.conversations,
        duration=ns.duration,
        max_requests=ns.max_requests,
        shared_prefix=ns.shared_prefix,
        prompt_tokens=ns.prompt_tokens,
        user_tokens=ns.user_tokens,
        output_tokens=ns.output_tokens,
        constrained_fraction=ns.constrained_fraction,
        seed=ns.seed,
        verify_samples=ns.verify_samples,
        reference=ns.reference,
        reference_url=ns.reference_url,
        reference_flags=tuple(shlex.split(ns.reference_flags)),
        min_throughput_ratio=ns.min_throughput_ratio,
        warmup_fraction=ns.warmup_fraction,
        window_fraction=ns.window_fraction,
        monitor_every=ns.monitor_every,
        require_tier_traffic=ns.require_tier_traffic,
        request_timeout=ns.request_timeout,
        drain_timeout=ns.drain_timeout,
        startup_timeout=ns.startup_timeout,
        max_errors=ns.max_errors,
        json_path=ns.json_path,
        quiet=ns.quiet,
    )


def log(cfg: SoakConfig, msg: str) -> None:
    """Progress goes to stderr, so stdout holds only the report."""
    if not cfg.quiet:
        print(f"[soak] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- a started server
def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``python -m kvtier.launch_server`` on 127.0.0.1, its output in a log file (a pipe nobody
    reads would eventually block it)."""

    def __init__(self, model: str, flags: Sequence[str], api_key: str | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_key = api_key
        fd, name = tempfile.mkstemp(prefix="kvtier-soak-server-", suffix=".log")
        os.close(fd)
        self.log_path = Path(name)
        self.cmd = [
            sys.executable,
            "-m",
            "kvtier.launch_server",
            "--model",
            model,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--log-level",
            "warning",
            *flags,
        ]
        if api_key:
            self.cmd += ["--api-key", api_key]
        # One intra-op thread unless the caller chose: on a small CPU box the server's processes
        # and the soak's clients share the cores, and oversubscribed OpenMP threads spin.
        env = {"OMP_NUM_THREADS": "1", **os.environ, "PYTHONUNBUFFERED": "1"}
        # A soak measures a clean run; fault injection has its own tests.
        env.pop("KVTIER_FAULTS", None)
        with self.log_path.open("wb") as out:
            self.proc = subprocess.Popen(
                self.cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT
            )
        self.exit_code: int | None = None

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        headers = auth_headers(self.api_key)
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"the server exited with {self.proc.returncode} while starting:\n"
                    + self.log_tail()
                )
            try:
                r = httpx.get(self.url + "/health", timeout=2.0, headers=headers, trust_env=False)
                if r.status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise RuntimeError(f"the server was not healthy after {timeout:.0f}s:\n{self.log_tail()}")

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, then kill if it does not exit in time; returns its exit code (-9 if
        killed)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.exit_code = self.proc.returncode
        return self.exit_code

    def remove_log(self) -> None:
        self.log_path.unlink(missing_ok=True)


def logprob_problems(meta: dict[str, Any], ids: list[int], constrained: bool = False) -> list[str]:
    """What is wrong with a greedy answer's logprobs (top 2 asked for): one entry a token, its
    id the token's, a logprob <= 0 equal to the top alternative's (greedy). Logprobs are the
    raw distribution's: under a constraint the token is the likeliest allowed one, so its
    logprob is only at most the top alternative's."""
    try:
        tokens = meta["output_token_logprobs"]
        tops = meta["output_top_logprobs"]
        if [int(t) for _, t, _ in tokens] != ids or len(tops) != len(ids):
            return ["logprob entries do not line up with the output ids"]
        for (lp, t, _), top in zip(tokens, tops, strict=True):
            if len(top) != 2 or lp > 0 or top[1][0] > top[0][0]:
                return [f"bad logprob entry {[lp, t]} with top {top}"]
            if constrained and lp > top[0][0]:
                return [f"logprob {lp} of token {t} above the top alternative's {top[0]}"]
            if not constrained and (top[0][1] != t or top[0][0] != lp or top[1][0] > lp):
                return [f"bad logprob entry {[lp, t]} with top {top}"]
    except (KeyError, TypeError, ValueError) as e:
        return [f"malformed logprobs ({type(e).__name__}: {e})"]
    return []


def auth_headers(api_key: str | None) -> dict[str, str]:
    """The bearer header for a server started with --api-key (none without a key)."""
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


# ---------------------------------------------------------------------------- records
@dataclass
class TurnRecord:
    """One completed turn, as the client saw it (times relative to the start of the load)."""

    client: int
    conversation: int
    turn: int
    start: float
    end: float
    prompt_tokens: int
    completion_tokens: int
    cached_by_tier: dict[str, int]
    constrained: bool = False  # its answer was constrained by a regex


@dataclass
class Sample:
    """A (history -> answer) pair kept for the recompute comparison."""

    input_ids: list[int]
    output_ids: list[int]
    max_new_tokens: int
    l2_tokens: int
    where: str  # client/conversation/turn, for the report
    regex: str | None = None  # the turn's constraint, replayed by the reference


@dataclass
class Check:
    """One pass/fail verdict of the report, with what was measured."""

    name: str
    ok: bool | None  # None: skipped (not applicable), never a failure
    detail: str
    leak: bool = False  # counts towards "leaks found"


class Reservoir:
    """A uniform random sample of at most ``k`` items from a stream of unknown length, so the
    memory a long soak keeps for verification stays bounded."""

    def __init__(self, k: int, rng: random.Random) -> None:
        self.k = k
        self.rng = rng
        self.seen = 0
        self.items: list[Sample] = []

    def add(self, item: Sample) -> None:
        self.seen += 1
        if len(self.items) < self.k:
            self.items.append(item)
            return
        j = self.rng.randrange(self.seen)
        if j < self.k:
            self.items[j] = item


@dataclass
class LoadResult:
    """What the clients and the monitor saw (times relative to the start of the load)."""

    turns: list[TurnRecord] = field(default_factory=list)
    errors: int = 0
    first_errors: list[str] = field(default_factory=list)
    conversations_started: int = 0
    conversations_completed: int = 0
    conversations_cut: int = 0  # ended early: the history would not fit the context
    active_end: float = 0.0  # when the first client stopped: concurrency falls after it
    end: float = 0.0
    integrity_checks: int = 0
    integrity_failures: list[str] = field(default_factory=list)
    timeline: list[dict[str, Any]] = field(default_factory=list)
    # (time, CPU seconds) of the server's scheduler process, when it runs on this machine.
    cpu_samples: list[tuple[float, float]] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    stopped_early: str | None = None


# ---------------------------------------------------------------------------- the load
class Load:
    """The concurrent clients and the monitor, sharing one HTTP connection pool."""

    def __init__(self, cfg: SoakConfig, http: httpx.AsyncClient, info: dict[str, Any]) -> None:
        self.cfg = cfg
        self.http = http
        self.vocab = int(info["vocab_size"])
        # Longest history a turn may send: the server refuses prompts past the context, and
        # prompts larger than the whole GPU pool.
        limit = int(info.get("context_length") or 1 << 30)
        pool = info.get("device_total_tokens")
        if isinstance(pool, int) and pool > 0:
            limit = min(limit, pool)
        self.max_history = limit - cfg.output_tokens[1] - 1
        shared_rng = random.Random(f"{cfg.seed}-shared")
        self.shared = [self._token(shared_rng) for _ in range(cfg.shared_prefix)]
        self.result = LoadResult()
        rng = random.Random(f"{cfg.seed}-samples")
        half = cfg.verify_samples // 2
        # Half of the sample from turns whose prefix came (partly) from L2: wrong output after
        # load-back is the failure this soak most wants to catch.
        self.l2_samples = Reservoir(half, rng)
        self.any_samples = Reservoir(cfg.verify_samples - half, rng)
        self.t0 = 0.0
        self.stop_at = 0.0
        self.sent = 0
        self.stopping = asyncio.Event()

    def _token(self, rng: random.Random) -> int:
        return rng.randrange(LOWEST_TOKEN, self.vocab)

    def _tokens(self, rng: random.Random, bounds: tuple[int, int]) -> list[int]:
        return [self._token(rng) for _ in range(rng.randint(*bounds))]

    def now(self) -> float:
        return time.monotonic() - self.t0

    def _error(self, msg: str) -> None:
        r = self.result
        r.errors += 1
        if len(r.first_errors) < ERRORS_KEPT:
            r.first_errors.append(f"t={self.now():.1f}s {msg}")
        if r.errors >= self.cfg.max_errors and not self.stopping.is_set():
            r.stopped_early = f"{r.errors} errors (--max-errors)"
            self.stopping.set()

    def _may_continue(self) -> bool:
        return (
            not self.stopping.is_set()
            and time.monotonic() < self.stop_at
            and self.sent < self.cfg.max_requests
        )

    async def _turn(
        self, cid: int, conv: int, turn: int, history: list[int], rng: random.Random
    ) -> list[int] | None:
        """Send one turn; returns the answer's ids, or None after recording an error."""
        max_new = rng.randint(*self.cfg.output_tokens)
        body: dict[str, Any] = {
            "input_ids": history,
            "sampling_params": {"temperature": 0, "max_new_tokens": max_new, "ignore_eos": True},
        }
        # One turn in four also asks for logprobs (the tokens do not change): their entries
        # must line up with the answer.
        want_logprobs = rng.random() < 0.25
        if want_logprobs:
            body.update(return_logprob=True, top_logprobs_num=2)
        regex = DIGITS if rng.random() < self.cfg.constrained_fraction else None
        if regex is not None:
            body["sampling_params"]["regex"] = regex
        where = f"client {cid} conversation {conv} turn {turn}"
        self.sent += 1
        start = self.now()
        try:
            r = await self.http.post("/generate", json=body)
        except httpx.HTTPError as e:
            self._error(f"{where}: {type(e).__name__}: {e}")
            return None
        end = self.now()
        if r.status_code != 200:
            self._error(f"{where}: HTTP {r.status_code}: {r.text[:300]}")
            return None
        try:
            out = r.json()
            ids = [int(t) for t in out["output_ids"]]
            meta = out["meta_info"]
            by_tier = {str(k): int(v) for k, v in (meta.get("cached_tokens_by_tier") or {}).items()}
            prompt_tokens = int(meta["prompt_tokens"])
            cached = int(meta["cached_tokens"])
        except (ValueError, KeyError, TypeError) as e:
            self._error(f"{where}: malformed response ({type(e).__name__}: {e}): {r.text[:300]}")
            return None
        # ignore_eos: the answer has exactly max_new tokens; the accounting must add up.
        problems = []
        if len(ids) != max_new:
            problems.append(f"{len(ids)} output ids for max_new_tokens={max_new}")
        if prompt_tokens != len(history):
            problems.append(f"prompt_tokens={prompt_tokens} for {len(history)} ids sent")
        if sum(by_tier.values()) != cached or cached >= len(history):
            problems.append(f"cached_tokens={cached} but by tier {by_tier}")
        if any(not 0 <= t < self.vocab for t in ids):
            problems.append("an output id outside the vocabulary")
        if want_logprobs:
            problems += logprob_problems(meta, ids, constrained=regex is not None)
        if regex is not None and not re.fullmatch("[0-9]*", str(out.get("text"))):
            problems.append(f"a digits-only answer reads {str(out.get('text'))[:60]!r}")
        if problems:
            self._error(f"{where}: bad answer: {'; '.join(problems)}")
            return None
        self.result.turns.append(
            TurnRecord(
                cid, conv, turn, start, end, len(history), len(ids), by_tier, regex is not None
            )
        )
        l2 = sum(v for k, v in by_tier.items() if k != "device")
        sample = Sample(list(history), ids, max_new, l2, where, regex)
        if l2:
            self.l2_samples.add(sample)
        self.any_samples.add(sample)
        return ids

    async def _client(self, cid: int) -> None:
        """One client: conversations one after another, each turn waiting for the last."""
        cfg = self.cfg
        rng = random.Random(f"{cfg.seed}-client-{cid}")
        conv = 0
        try:
            while self._may_continue() and (cfg.conversations == 0 or conv < cfg.conversations):
                history = self.shared + self._tokens(rng, cfg.prompt_tokens)
                self.result.conversations_started += 1
                done = 0
                for turn in range(cfg.turns):
                    if not self._may_continue():
                        break
                    if len(history) > self.max_history:
                        self.result.conversations_cut += 1
                        break
                    answer = await self._turn(cid, conv, turn, history, rng)
                    if answer is None:
                        # A failed turn ends the conversation; the pause keeps a failing server
                        # from being hammered in a tight loop.
                        await asyncio.sleep(0.2)
                        break
                    done += 1
                    history = history + answer + self._tokens(rng, cfg.user_tokens)
                if done == cfg.turns:
                    self.result.conversations_completed += 1
                conv += 1
        finally:
            if not self.result.active_end:
                self.result.active_end = self.now()

    async def _monitor(self) -> None:
        """Integrity checks and a stats timeline while the load runs: a leak shows up as free
        pages that never come back, long before the end."""
        every = self.cfg.monitor_every
        while not self.stopping.is_set():
            try:
                await asyncio.wait_for(self.stopping.wait(), timeout=every)
                return
            except asyncio.TimeoutError:
                pass
            self.result.integrity_checks += 1
            try:
                r = await self.http.get("/debug/check_integrity")
                if r.status_code != 200:
                    self.result.integrity_failures.append(
                        f"t={self.now():.1f}s HTTP {r.status_code}: {r.text[:300]}"
                    )
                info = (await self.http.get("/get_server_info")).json()
            except (httpx.HTTPError, ValueError) as e:
                self.result.integrity_failures.append(f"t={self.now():.1f}s monitor: {e}")
                continue
            point = {
                "t": round(self.now(), 2),
                "turns": len(self.result.turns),
                "errors": self.result.errors,
                **{
                    k: info.get(k)
                    for k in ("num_running", "num_waiting", "device_free_pages", "l2_used_tokens")
                },
            }
            self.result.timeline.append(point)
            log(
                self.cfg,
                f"t={point['t']:.0f}s turns={point['turns']} errors={point['errors']} "
                f"running={point['num_running']} waiting={point['num_waiting']} "
                f"free_pages={point['device_free_pages']} l2_used={point['l2_used_tokens']}",
            )

    async def _sample_cpu(self, pid: int) -> None:
        """The scheduler process's CPU time once a second: on a shared machine, a throughput
        drop with the process getting less CPU is contention; with it busy all along, each
        token cost more (a real regression)."""
        stopped = False
        while not stopped:
            try:
                await asyncio.wait_for(self.stopping.wait(), timeout=1.0)
                stopped = True  # one last sample: the last window ends after the previous one
            except asyncio.TimeoutError:
                pass
            cpu = process_cpu_seconds(pid)
            if cpu is None:
                return
            self.result.cpu_samples.append((self.now(), cpu))

    async def run(self, scheduler_pid: int | None = None) -> LoadResult:
        """Run every client to the end; ``scheduler_pid``: the server's engine process, when
        it runs on this machine (its CPU time is sampled)."""
        cfg = self.cfg
        self.t0 = time.monotonic()
        self.stop_at = self.t0 + cfg.duration
        clients = [asyncio.create_task(self._client(i)) for i in range(cfg.clients)]
        monitor = asyncio.create_task(self._monitor()) if cfg.monitor_every > 0 else None
        sampler = None
        if scheduler_pid:
            start_cpu = process_cpu_seconds(scheduler_pid)
            if start_cpu is not None:
                self.result.cpu_samples.append((0.0, start_cpu))
                sampler = asyncio.create_task(self._sample_cpu(scheduler_pid))
        # Turns started before the deadline may finish after it, but not forever.
        hard_deadline = cfg.duration + cfg.request_timeout + 5.0
        done, pending = await asyncio.wait(clients, timeout=hard_deadline)
        for task in pending:
            task.cancel()
        if pending:
            self._error(f"{len(pending)} clients still busy {hard_deadline:.0f}s in: cancelled")
            await asyncio.gather(*pending, return_exceptions=True)
        for task in done:
            if task.exception() is not None:
                self._error(f"client crashed: {task.exception()!r}")
        self.stopping.set()
        for task in (monitor, sampler):
            if task is not None:
                await task
        self.result.end = self.now()
        samples = {id(s): s for s in self.l2_samples.items + self.any_samples.items}
        self.result.samples = list(samples.values())
        return self.result


# ---------------------------------------------------------------------------- measurements
def throughput_windows(
    turns: Sequence[TurnRecord], end: float, warmup_fraction: float, window_fraction: float
) -> dict[str, Any]:
    """Completion tokens per second in the first and the last window of ``[warmup, end]``.

    Each turn's tokens are spread evenly over its lifetime (send to answer) and every window
    gets the share that overlaps it. Counting only the turns that *complete* in a window would
    be lumpy: turns batched together finish together, so a window can hold none or a whole
    batch. Every turn generates the same range of tokens (ignore_eos), so this is also a rate
    of turns that does not drift as histories grow.
    """
    start = warmup_fraction * end
    width = window_fraction * (end - start)
    if width <= 0 or not turns:
        return {"ok": False, "why": "no measured period"}
    first = (start, start + width)
    last = (end - width, end)

    def rate(window: tuple[float, float]) -> float:
        lo, hi = window
        tokens = 0.0
        for t in turns:
            overlap = min(hi, t.end) - max(lo, t.start)
            if overlap > 0:
                tokens += t.completion_tokens * overlap / max(t.end - t.start, 1e-9)
        return tokens / width

    r_first, r_last = rate(first), rate(last)
    return {
        "ok": r_first > 0,
        "window_s": width,
        "first_window": first,
        "last_window": last,
        "first_tokens_per_s": r_first,
        "last_tokens_per_s": r_last,
        "ratio": r_last / r_first if r_first > 0 else math.nan,
    }


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a local process (None when it cannot be read)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            # The command name (field 2) may hold spaces: count fields after its ")".
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def cpu_share(samples: Sequence[tuple[float, float]], lo: float, hi: float) -> float | None:
    """Share of one core a process used over [lo, hi], interpolated between samples."""
    if len(samples) < 2 or lo < samples[0][0] or hi > samples[-1][0] or hi <= lo:
        return None

    def at(t: float) -> float:
        for (t0, c0), (t1, c1) in pairwise(samples):
            if t0 <= t <= t1:
                return c0 + (c1 - c0) * (t - t0) / (t1 - t0) if t1 > t0 else c0
        return samples[-1][1]

    return (at(hi) - at(lo)) / (hi - lo)


def counter_deltas(before: dict[str, Any], after: dict[str, Any]) -> dict[str, float]:
    """How much each server counter grew during the run (only the counters it reports)."""
    out: dict[str, float] = {}
    for key in COUNTERS:
        a, b = before.get(key), after.get(key)
        if isinstance(a, (int, float)) and isinstance(b, (int, float)):
            out[key] = b - a
    tiers_a = before.get("cached_tokens_by_tier") or {}
    tiers_b = after.get("cached_tokens_by_tier") or {}
    for tier in sorted(set(tiers_a) | set(tiers_b)):
        out[f"cached_tokens[{tier}]"] = tiers_b.get(tier, 0) - tiers_a.get(tier, 0)
    return out


def pinned_keys(info: dict[str, Any]) -> dict[str, float]:
    """The pinned-memory figures a server reports, if any (the name says "pinned")."""
    return {
        k: v
        for k, v in info.items()
        if "pinned" in k and isinstance(v, (int, float)) and not isinstance(v, bool)
    }


# ---------------------------------------------------------------------------- server control
async def get_info(http: httpx.AsyncClient) -> dict[str, Any]:
    r = await http.get("/get_server_info")
    r.raise_for_status()
    return r.json()


async def wait_idle(http: httpx.AsyncClient, timeout: float) -> tuple[bool, dict[str, Any]]:
    """Poll until nothing runs, waits or is in flight in the API process."""
    deadline = time.monotonic() + timeout
    while True:
        info = await get_info(http)
        busy = [info.get(k) for k in ("num_running", "num_waiting", "num_in_flight")]
        if not any(busy):
            return True, info
        if time.monotonic() > deadline:
            return False, info
        await asyncio.sleep(0.2)


async def integrity(http: httpx.AsyncClient) -> tuple[bool, str]:
    r = await http.get("/debug/check_integrity")
    if r.status_code == 200:
        return True, "ok"
    return False, f"HTTP {r.status_code}: {r.text[:300]}"


async def flush_all(http: httpx.AsyncClient, timeout: float) -> tuple[bool, str]:
    """Full flush; the server refuses it (400) while requests are queued or running."""
    deadline = time.monotonic() + timeout
    while True:
        r = await http.post("/flush_cache", json={"tier": "all"})
        if r.status_code == 200:
            return True, "flushed"
        if r.status_code != 400 or time.monotonic() > deadline:
            return False, f"HTTP {r.status_code}: {r.text[:300]}"
        await asyncio.sleep(0.2)


# ---------------------------------------------------------------------------- reference
REFERENCE_CHUNK = 16  # samples run together on the reference


def _reference_engine_kwargs(info: dict[str, Any], samples: Sequence[Sample]) -> dict[str, Any]:
    """The serving model exactly (weights come from the seed for dummy loads), without any
    prefix reuse; the pool sized for one chunk of samples."""
    keys = (
        "model_path",
        "tokenizer_path",
        "load_format",
        "dtype",
        "device",
        "context_length",
        "random_seed",
        "attention_backend",
        "page_size",
        "disable_cuda_graph",
    )
    kw = {k: info[k] for k in keys if info.get(k) is not None}
    longest = max(len(s.input_ids) + s.max_new_tokens for s in samples)
    page = int(info.get("page_size") or 1)
    kw.update(
        disable_radix_cache=True,
        enable_hierarchical_cache=False,
        # Token ids only, unless a sample's constraint needs the tokenizer.
        skip_tokenizer_init=all(s.regex is None for s in samples),
        log_level="warning",
        max_total_tokens=max(4096, REFERENCE_CHUNK * (longest + page)),
    )
    return kw


def _reference_params(s: Sample) -> dict[str, Any]:
    params: dict[str, Any] = {
        "temperature": 0,
        "max_new_tokens": s.max_new_tokens,
        "ignore_eos": True,
    }
    if s.regex is not None:
        params["regex"] = s.regex
    return params


def reference_by_engine(info: dict[str, Any], samples: Sequence[Sample]) -> list[list[int]]:
    import kvtier

    outs: list[list[int]] = []
    with kvtier.Engine(**_reference_engine_kwargs(info, samples)) as engine:
        for i in range(0, len(samples), REFERENCE_CHUNK):
            chunk = samples[i : i + REFERENCE_CHUNK]
            res = engine.generate(
                input_ids=[s.input_ids for s in chunk],
                sampling_params=[_reference_params(s) for s in chunk],
            )
            outs.extend(list(r["output_ids"]) for r in res)
    return outs


async def reference_by_http(
    url: str, api_key: str | None, samples: Sequence[Sample], timeout: float
) -> list[list[int]]:
    sem = asyncio.Semaphore(REFERENCE_CHUNK)
    async with httpx.AsyncClient(
        base_url=url, timeout=timeout, headers=auth_headers(api_key), trust_env=False
    ) as http:

        async def one(s: Sample) -> list[int]:
            async with sem:
                r = await http.post(
                    "/generate",
                    json={
                        "input_ids": s.input_ids,
                        "sampling_params": _reference_params(s),
                    },
                )
                r.raise_for_status()
                return [int(t) for t in r.json()["output_ids"]]

        return list(await asyncio.gather(*(one(s) for s in samples)))


def reference_server_flags(info: dict[str, Any], extra: Sequence[str]) -> list[str]:
    """Flags that make a second server compute what the soaked one serves, from scratch."""
    flags = ["--disable-radix-cache"]
    for key in ("load_format", "dtype", "device", "random_seed", "attention_backend"):
        if info.get(key) is not None:
            flags += ["--" + key.replace("_", "-"), str(info[key])]
    if info.get("context_length"):
        flags += ["--context-length", str(info["context_length"])]
    return flags + list(extra)


def compare(samples: Sequence[Sample], got: Sequence[list[int]]) -> list[str]:
    """One line per sample whose reference answer differs."""
    bad = []
    for s, ref in zip(samples, got):
        if s.output_ids != ref:
            pos = next(
                (i for i, (a, b) in enumerate(zip(s.output_ids, ref)) if a != b),
                min(len(s.output_ids), len(ref)),
            )
            bad.append(
                f"{s.where} ({len(s.input_ids)} prompt ids, {s.l2_tokens} from L2): served "
                f"{s.output_ids} but recompute gives {ref} (first difference at {pos})"
            )
    return bad


# ---------------------------------------------------------------------------- the run
@dataclass
class SoakReport:
    config: dict[str, Any]
    summary: dict[str, Any]
    checks: list[Check]
    throughput: dict[str, Any]
    deltas: dict[str, float]
    first_errors: list[str]
    mismatches: list[str]
    timeline: list[dict[str, Any]]
    server_log_tail: str | None = None

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if c.ok is False]

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["failed"] = [c.name for c in self.failed]
        out["metadata"] = run_metadata()
        return out


@dataclass
class RunData:
    """What one soak gathered, for ``build_report``."""

    result: LoadResult
    before: dict[str, Any]
    after: dict[str, Any] = field(default_factory=dict)
    checks: list[Check] = field(default_factory=list)
    mismatches: list[str] = field(default_factory=list)


async def leak_checks(
    cfg: SoakConfig, http: httpx.AsyncClient, before: dict[str, Any]
) -> tuple[list[Check], dict[str, Any]]:
    """Drained, consistent, and every page back after a full flush; returns the checks and the
    server's stats after the flush."""
    checks: list[Check] = []
    idle, drained = await wait_idle(http, cfg.drain_timeout)
    busy = (
        f"still busy after {cfg.drain_timeout:.0f}s: running={drained.get('num_running')} "
        f"waiting={drained.get('num_waiting')} in_flight={drained.get('num_in_flight')}"
    )
    checks.append(Check("drained", idle, "nothing running or queued" if idle else busy, True))
    ok, detail = await integrity(http)
    checks.append(Check("integrity after drain", ok, detail, leak=True))
    ok, detail = await flush_all(http, cfg.drain_timeout)
    checks.append(Check("flush_cache (all tiers)", ok, detail, leak=True))
    after = await get_info(http)
    total, free = after.get("device_total_pages"), after.get("device_free_pages")
    checks.append(
        Check(
            "GPU pages all free after flush",
            total == free and after.get("device_cached_pages", 0) == 0,
            f"{free}/{total} free, {after.get('device_cached_pages')} cached "
            f"(at start: {before.get('device_free_pages')} free)",
            leak=True,
        )
    )
    if before.get("enable_hierarchical_cache"):
        used = after.get("l2_used_tokens")
        checks.append(
            Check(
                "L2 empty after flush",
                used == 0,
                f"{used}/{after.get('l2_total_tokens')} tokens used "
                f"(at start: {before.get('l2_used_tokens')})",
                leak=True,
            )
        )
    else:
        checks.append(Check("L2 empty after flush", None, "no hierarchical cache"))
    p0, p1 = pinned_keys(before), pinned_keys(after)
    if p0 or p1:
        checks.append(
            Check("pinned bytes back to start", p0 == p1, f"start {p0}, end {p1}", leak=True)
        )
    else:
        checks.append(Check("pinned bytes back to start", None, "not reported by the server"))
    ok, detail = await integrity(http)
    checks.append(Check("integrity after flush", ok, detail, leak=True))
    return checks, after


async def soak(cfg: SoakConfig, url: str, ref_url: str | None) -> RunData:
    """The load, then the leak checks, then the recompute comparison. Raises only when the
    server cannot be asked for its stats at the start."""
    limits = httpx.Limits(max_connections=cfg.clients + 8, max_keepalive_connections=cfg.clients)
    async with httpx.AsyncClient(
        base_url=url,
        timeout=cfg.request_timeout,
        limits=limits,
        headers=auth_headers(cfg.api_key),
        trust_env=False,
    ) as http:
        before = await get_info(http)
        log(
            cfg,
            f"{cfg.clients} clients x {cfg.turns} turns for up to {cfg.duration:.0f}s against "
            f"{url} (GPU pool {before.get('device_total_tokens')} tokens, L2 "
            f"{before.get('l2_total_tokens', 0)} tokens)",
        )
        # Only a server this run started is surely on this machine, with its pid ours to read.
        pid = before.get("scheduler_pid") if cfg.start_server else None
        data = RunData(await Load(cfg, http, before).run(pid), before)
        log(cfg, f"load done: {len(data.result.turns)} turns, {data.result.errors} errors")
        try:
            data.checks, data.after = await leak_checks(cfg, http, before)
        except (httpx.HTTPError, ValueError) as e:
            # A server that died during the load: the report says so (with its log, when the
            # soak started it) instead of the run ending without one.
            first_line = str(e).splitlines()[0] if str(e) else ""
            data.checks = [
                Check("server answers after the load", False, f"{type(e).__name__}: {first_line}")
            ]
            return data
    samples = data.result.samples
    if cfg.reference != "none" and samples:
        log(cfg, f"re-running {len(samples)} sampled turns on the reference")
        if ref_url is not None:
            ref = await reference_by_http(ref_url, cfg.api_key, samples, cfg.request_timeout)
        else:
            ref = await asyncio.to_thread(reference_by_engine, before, samples)
        data.mismatches = compare(samples, ref)
    return data


def run(cfg: SoakConfig) -> SoakReport:
    """Start what is needed, soak, check, stop what was started. A failed check does not raise
    (the report says); only a run that could not happen does (RuntimeError, with the started
    server's log)."""
    server = ref_server = None
    try:
        if cfg.start_server:
            server = ServerProcess(cfg.model, cfg.server_flags, cfg.api_key)
            log(cfg, "starting: " + " ".join(shlex.quote(a) for a in server.cmd))
            server.wait_ready(cfg.startup_timeout)
        url = server.url if server else cfg.base_url
        assert url is not None
        ref_url = cfg.reference_url if cfg.reference == "url" else None
        if cfg.reference == "server":
            # Same model and weights as the soaked server, whose settings (also when it was
            # started elsewhere) come from /get_server_info.
            info = httpx.get(
                f"{url}/get_server_info", headers=auth_headers(cfg.api_key), trust_env=False
            ).json()
            ref_server = ServerProcess(
                info["model_path"], reference_server_flags(info, cfg.reference_flags), cfg.api_key
            )
            log(cfg, "reference: " + " ".join(shlex.quote(a) for a in ref_server.cmd))
            ref_server.wait_ready(cfg.startup_timeout)
            ref_url = ref_server.url
        data = asyncio.run(soak(cfg, url, ref_url))
        if server is not None:
            code = server.stop()
            data.checks.append(Check("server exits 0 on SIGTERM", code == 0, f"exit code {code}"))
        report = build_report(cfg, data)
        if server is not None and report.failed:
            report.server_log_tail = server.log_tail()
        return report
    except httpx.HTTPError as e:
        tail = f"\nserver log (tail):\n{server.log_tail()}" if server else ""
        raise RuntimeError(f"{type(e).__name__}: {e}{tail}") from e
    finally:
        for proc in (ref_server, server):
            if proc is not None:
                proc.stop()
                proc.remove_log()


def loaded_tokens(deltas: dict[str, float], info: dict[str, Any]) -> int | None:
    """Tokens the server loaded from L2 during the run (from bytes and the KV size per token)."""
    per_token = info.get("kv_bytes_per_token")
    loaded = deltas.get("loaded_bytes")
    if not per_token or loaded is None:
        return None
    return int(loaded // per_token)


def tier_totals(turns: Sequence[TurnRecord]) -> dict[str, int]:
    """Cached prompt tokens per tier ("device", or the L2 tier's name) over all turns."""
    out: dict[str, int] = {}
    for t in turns:
        for k, v in t.cached_by_tier.items():
            out[k] = out.get(k, 0) + v
    return out


def run_checks(
    cfg: SoakConfig,
    data: RunData,
    deltas: dict[str, float],
    tiers: dict[str, int],
    tp: dict[str, Any],
) -> list[Check]:
    """The checks on the load itself (the leak checks were made on the server already)."""
    result, samples = data.result, data.result.samples
    turns = len(result.turns)
    stopped = f"; stopped: {result.stopped_early}" if result.stopped_early else ""
    checks = [
        Check("turns completed", turns > 0, f"{turns} turns"),
        Check("no error responses", result.errors == 0, f"{result.errors} errors{stopped}"),
        Check(
            "integrity during the run",
            not result.integrity_failures,
            f"{len(result.integrity_failures)} failed of {result.integrity_checks} checks"
            if cfg.monitor_every > 0
            else "monitor off",
            leak=True,
        ),
    ]
    if cfg.reference == "none" or not samples:
        checks.append(Check("greedy answers equal recompute", None, "no reference"))
    else:
        with_l2 = sum(1 for s in samples if s.l2_tokens)
        checks.append(
            Check(
                "greedy answers equal recompute",
                not data.mismatches,
                f"{len(samples) - len(data.mismatches)}/{len(samples)} equal "
                f"({with_l2} with an L2 hit)",
            )
        )
    enforce = cfg.min_throughput_ratio > 0
    if tp["ok"]:
        detail = (
            f"{tp['ratio']:.2f} ({tp['last_tokens_per_s']:.1f} / "
            f"{tp['first_tokens_per_s']:.1f} tok/s over {tp['window_s']:.1f} s windows; "
            f"threshold {cfg.min_throughput_ratio})"
        )
        first_cpu, last_cpu = tp.get("scheduler_cpu_first"), tp.get("scheduler_cpu_last")
        if first_cpu is not None and last_cpu is not None:
            detail += f"; engine process CPU {first_cpu:.0%} then {last_cpu:.0%} of a core"
        ok = tp["ratio"] >= cfg.min_throughput_ratio if enforce else None
    else:
        detail, ok = "nothing measured in the first window", False if enforce else None
    checks.append(Check("throughput holds (last/first window)", ok, detail))
    failed = {k: deltas[k] for k in FAILURE_COUNTERS if deltas.get(k)}
    checks.append(Check("no failed transfers", not failed, str(failed) if failed else "none"))
    if data.before.get("enable_hierarchical_cache") and cfg.require_tier_traffic:
        l2_hit = sum(v for k, v in tiers.items() if k != "device")
        loaded = deltas.get("loaded_bytes", 0)
        evicted = deltas.get("device_evictions_to_l2", 0)
        checks.append(
            Check(
                "hierarchy exercised (L2 hits, loads, evictions)",
                l2_hit > 0 and loaded > 0 and evicted > 0,
                f"{l2_hit} L2-hit tokens, {loaded:.0f} bytes loaded, "
                f"{evicted:.0f} GPU evictions to L2",
            )
        )
    if cfg.start_server:
        # The soak is the server's only client: the tier each hit came from, as the responses
        # reported it, must add up to the server's own tallies (a hit counted as the wrong tier
        # would make every L2 figure a lie).
        server_tiers = {
            k[len("cached_tokens[") : -1]: int(v)
            for k, v in deltas.items()
            if k.startswith("cached_tokens[") and v
        }
        finished, aborted = deltas.get("requests_finished"), deltas.get("requests_aborted")
        checks.append(
            Check(
                "server counters agree with the clients",
                server_tiers == {k: v for k, v in tiers.items() if v}
                and finished == turns
                and not aborted,
                f"clients: {turns} turns, cached by tier {tiers}; server: {finished} finished, "
                f"{aborted} aborted, cached by tier {server_tiers}",
            )
        )
    return checks + data.checks


def build_report(cfg: SoakConfig, data: RunData) -> SoakReport:
    """The summary figures and every check, from what the run gathered."""
    result = data.result
    turns = result.turns
    deltas = counter_deltas(data.before, data.after) if data.after else {}
    tiers = tier_totals(turns)
    tp = throughput_windows(turns, result.active_end, cfg.warmup_fraction, cfg.window_fraction)
    if tp["ok"]:
        tp["scheduler_cpu_first"] = cpu_share(result.cpu_samples, *tp["first_window"])
        tp["scheduler_cpu_last"] = cpu_share(result.cpu_samples, *tp["last_window"])
    checks = run_checks(cfg, data, deltas, tiers, tp)
    completion = sum(t.completion_tokens for t in turns)
    summary = {
        "server": data.before.get("model_path"),
        "duration_s": round(result.end, 1),
        "clients": cfg.clients,
        "turns_per_conversation": cfg.turns,
        "requests_served": len(turns),
        "constrained_turns": sum(t.constrained for t in turns),
        "conversations_started": result.conversations_started,
        "conversations_completed": result.conversations_completed,
        "conversations_cut": result.conversations_cut,
        "prompt_tokens": sum(t.prompt_tokens for t in turns),
        "completion_tokens": completion,
        "device_hit_tokens": tiers.get("device", 0),
        "l2_hit_tokens": sum(v for k, v in tiers.items() if k != "device"),
        "turns_with_l2_hit": sum(
            1 for t in turns if any(v for k, v in t.cached_by_tier.items() if k != "device")
        ),
        "gpu_evictions_to_l2": deltas.get("device_evictions_to_l2"),
        "l2_evicted_pages": deltas.get("l2_evicted_pages"),
        "loads": deltas.get("load_ops"),
        "loaded_bytes": deltas.get("loaded_bytes"),
        # Compared with l2_hit_tokens: tokens loaded from L2 that no response reported as an
        # L2 hit (re-admissions after retraction are not reported; anything else is suspect).
        "loaded_tokens": loaded_tokens(deltas, data.before),
        "backups": deltas.get("backup_ops"),
        "backed_up_bytes": deltas.get("backed_up_bytes"),
        "retractions": deltas.get("retractions"),
        "failed_transfers": sum(deltas.get(k, 0) for k in FAILURE_COUNTERS),
        "errors": result.errors,
        "verified_samples": len(result.samples) if cfg.reference != "none" else 0,
        "verified_with_l2_hit": sum(1 for smp in result.samples if smp.l2_tokens)
        if cfg.reference != "none"
        else 0,
        "mismatches": len(data.mismatches),
        "tokens_per_s": completion / result.active_end if result.active_end else None,
        "throughput_ratio": tp.get("ratio"),
        "leaks_found": sum(1 for c in checks if c.leak and c.ok is False),
    }
    return SoakReport(
        config={k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        summary=summary,
        checks=checks,
        throughput=tp,
        deltas=deltas,
        first_errors=result.first_errors,
        mismatches=data.mismatches[:ERRORS_KEPT],
        timeline=result.timeline,
    )


def _fmt_value(v: Any) -> str:
    """Whole numbers without decimals, other floats with two."""
    if isinstance(v, float):
        return f"{v:.2f}" if not v.is_integer() else f"{v:.0f}"
    return fmt_str(v)


def print_report(report: SoakReport) -> None:
    """The summary table, one line per check, then the first errors and mismatches."""
    rows = [{"metric": k, "value": _fmt_value(v)} for k, v in report.summary.items()]
    print(format_table(rows, [("metric", "metric", str), ("value", "value", str)]))
    print()
    marks = {True: "pass", False: "FAIL", None: "skip"}
    width = max(len(c.name) for c in report.checks)
    for c in report.checks:
        # Left-aligned lines: the details are sentences, too wide for a right-aligned table.
        print(f"{marks[c.ok]}  {c.name.ljust(width)}  {c.detail}")
    if report.first_errors:
        print("\nfirst errors:")
        for e in report.first_errors:
            print("  " + e)
    if report.mismatches:
        print("\nmismatches against recompute:")
        for m in report.mismatches:
            print("  " + m)
    if report.server_log_tail:
        print("\nserver log (tail):\n" + report.server_log_tail)
    print(
        "\nsoak "
        + ("FAILED: " + ", ".join(c.name for c in report.failed) if report.failed else "passed")
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Exit code: 0 every check passed, 1 a check failed, 2 the soak could not run."""
    cfg = parse_args(argv)
    try:
        report = run(cfg)
    except RuntimeError as e:
        print(f"soak could not run: {e}", file=sys.stderr)
        return 2
    print_report(report)
    if cfg.json_path:
        write_json(cfg.json_path, report.to_json())
        print(f"report written to {cfg.json_path}")
    return report.exit_code


if __name__ == "__main__":
    sys.exit(main())
