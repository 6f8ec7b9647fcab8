"""The soak (benchmarks/soak.py) in CI: a short run against a real server subprocess whose GPU pool
and L2 are tiny, so that the run really goes through eviction, backups and load-back, with every
check of the full soak asserted; and the soak's own measurements on made-up data."""

from __future__ import annotations

import importlib
import os
import random
import sys
from pathlib import Path

import pytest

BENCH_DIR = Path(__file__).resolve().parent.parent / "benchmarks"
# The benchmarks are scripts that import their sibling ``common``: make it importable here too.
sys.path.insert(0, str(BENCH_DIR))
soak = importlib.import_module("soak")

# 16 conversations of 24-96 tokens against a 256-token GPU pool (the running requests alone
# overflow it) and a 1024-token L2: prefixes leave the GPU within a turn and come back from L2.
CI_SERVER = (
    "--enable-hierarchical-cache",
    "--page-size",
    "4",
    "--max-total-tokens",
    "256",
    "--hicache-ratio",
    "4",
)
# On a 2-core CI machine the soak's clients, the server's two processes and whatever else runs
# share the cores: the last/first-tenth ratio of this 10 s run measured 0.88-1.05 in 7 runs, so
# 0.9 would flake. 0.6 still catches the failure the check is for: pages or locks leaking until
# admission stalls, which takes throughput towards zero. Windows of 0.3 of the run, not the
# default tenth (0.9 s here): one run (2026-12-02) measured 0.50 over tenths while the engine
# process got 75% of a core in the last one; a wider window averages such a stall out.
CI_THROUGHPUT_RATIO = "0.6"
CI_WINDOW_FRACTION = "0.3"


def turn(start: float, end: float, tokens: int = 8) -> soak.TurnRecord:
    return soak.TurnRecord(0, 0, 0, start, end, 32, tokens, {})


# ---------------------------------------------------------------------------- measurements
def test_args_split_at_double_dash_and_ranges_parse():
    cfg = soak.parse_args(
        ["--start-server", "--clients", "3", "--output-tokens", "4-6", "--", "--page-size", "8"]
    )
    assert cfg.start_server and cfg.clients == 3
    assert cfg.output_tokens == (4, 6)
    assert cfg.server_flags == ("--page-size", "8")
    assert soak.parse_args(["--base-url", "http://x"]).server_flags == soak.DEFAULT_SERVER_FLAGS
    with pytest.raises(SystemExit):
        soak.parse_args(["--start-server", "--output-tokens", "9-3"])
    with pytest.raises(SystemExit):
        soak.parse_args(["--start-server", "--duration", "0"])


def test_steady_throughput_has_ratio_one_even_when_turns_finish_in_lumps():
    # Batches of 8 turns, each batch taking 1 s and finishing together: counting completions
    # per window would see 0 or 64 tokens; spreading each turn over its lifetime sees 64/s.
    turns = [turn(b, b + 1.0) for b in range(100) for _ in range(8)]
    tp = soak.throughput_windows(turns, 100.0, warmup_fraction=0.1, window_fraction=0.1)
    assert tp["ok"]
    assert tp["first_tokens_per_s"] == pytest.approx(64.0)
    assert tp["ratio"] == pytest.approx(1.0)


def test_throughput_collapse_is_measured():
    # Turns slow down fourfold over the run, as they would once pages leak and admission stalls.
    turns, t = [], 0.0
    while t < 100.0:
        length = 1.0 + 3.0 * t / 100.0
        turns.append(turn(t, t + length))
        t += length
    tp = soak.throughput_windows(turns, 100.0, warmup_fraction=0.1, window_fraction=0.1)
    assert tp["ratio"] < 0.4


def test_cpu_share_interpolates_between_samples():
    samples = [(0.0, 10.0), (2.0, 12.0), (4.0, 13.0)]
    assert soak.cpu_share(samples, 1.0, 3.0) == pytest.approx(0.75)
    assert soak.cpu_share(samples, 3.0, 5.0) is None  # past the last sample
    assert soak.process_cpu_seconds(os.getpid()) is not None


def test_reservoir_keeps_a_bounded_uniform_sample():
    r = soak.Reservoir(10, random.Random(0))
    for i in range(10_000):
        r.add(soak.Sample([i], [], 1, 0, str(i)))
    assert r.seen == 10_000 and len(r.items) == 10
    # A sample of the whole stream, not of its head.
    assert sum(s.input_ids[0] for s in r.items) / 10 > 2000


def test_a_wrong_answer_is_reported_with_its_first_difference():
    s = soak.Sample([1, 2, 3], [5, 6, 7], 3, 2, "client 0 conversation 0 turn 1")
    assert soak.compare([s], [[5, 6, 7]]) == []
    (line,) = soak.compare([s], [[5, 9, 7]])
    assert "client 0 conversation 0 turn 1" in line and "first difference at 1" in line


def test_failed_transfers_and_errors_fail_the_report():
    cfg = soak.SoakConfig(start_server=False, min_throughput_ratio=0)
    result = soak.LoadResult(turns=[turn(0, 1)], errors=2, active_end=1.0, end=1.0)
    data = soak.RunData(
        result,
        before={"enable_hierarchical_cache": True, "failed_loads": 0},
        after={"failed_loads": 1},
        mismatches=["client 0 ..."],
    )
    data.result.samples = [soak.Sample([1], [2], 1, 0, "x")]
    failed = {c.name for c in soak.build_report(cfg, data).failed}
    assert {
        "no error responses",
        "no failed transfers",
        "greedy answers equal recompute",
        "hierarchy exercised (L2 hits, loads, evictions)",
    } <= failed


# ---------------------------------------------------------------------------- the soak itself
def test_short_soak_against_a_real_server_passes_every_check(capsys):
    cfg = soak.parse_args(
        [
            "--start-server",
            "--clients",
            "16",
            "--turns",
            "3",
            "--duration",
            "10",
            "--monitor-every",
            "2",
            "--min-throughput-ratio",
            CI_THROUGHPUT_RATIO,
            "--window-fraction",
            CI_WINDOW_FRACTION,
            "--startup-timeout",
            "120",
            "--request-timeout",
            "60",
            "--drain-timeout",
            "30",
            "--",
            *CI_SERVER,
        ]
    )
    report = soak.run(cfg)
    soak.print_report(report)
    out = capsys.readouterr().out
    assert not report.failed, out
    checks = {c.name: c for c in report.checks}
    # The leak checks and the recompute comparison really ran (none was skipped).
    for name in (
        "greedy answers equal recompute",
        "integrity during the run",
        "drained",
        "integrity after drain",
        "GPU pages all free after flush",
        "L2 empty after flush",
        "integrity after flush",
        "server counters agree with the clients",
        "server exits 0 on SIGTERM",
    ):
        assert checks[name].ok is True, (name, out)
    s = report.summary
    assert s["errors"] == 0 and s["mismatches"] == 0 and s["leaks_found"] == 0
    # The run went through the hierarchy, not around it.
    assert s["l2_hit_tokens"] > 0 and s["turns_with_l2_hit"] > 0
    assert s["loads"] > 0 and s["loaded_bytes"] > 0 and s["backups"] > 0
    assert s["gpu_evictions_to_l2"] > 0
    assert s["conversations_completed"] >= 16
    # Half of the verified sample is drawn from turns served partly from L2.
    assert s["verified_samples"] > 0 and s["verified_with_l2_hit"] > 0
    assert s["failed_transfers"] == 0


def test_logprob_problems_on_made_up_answers():
    ok = {
        "output_token_logprobs": [[-0.5, 7, None], [-1.0, 3, None]],
        "output_top_logprobs": [
            [[-0.5, 7, None], [-2.0, 1, None]],
            [[-1.0, 3, None], [-1.5, 9, None]],
        ],
    }
    assert soak.logprob_problems(ok, [7, 3]) == []
    assert soak.logprob_problems(ok, [7, 4]) == [
        "logprob entries do not line up with the output ids"
    ]
    not_greedy = {
        **ok,
        "output_top_logprobs": [[[-0.4, 8, None], [-0.5, 7, None]], ok["output_top_logprobs"][1]],
    }
    assert soak.logprob_problems(not_greedy, [7, 3])[0].startswith("bad logprob entry [-0.5, 7]")
    assert soak.logprob_problems({}, [7])[0].startswith("malformed logprobs (KeyError")
