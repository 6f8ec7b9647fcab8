"""The benchmarks run end to end on a CPU: the README's quick TTFT command, throughput, skipped
backends, a server that cannot say which tier served a hit, and the tier IO smoke mode; and a
"tier hit" that really came from the GPU fails the run instead of becoming a number."""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import re
import statistics
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import torch

BENCH_DIR = Path(__file__).resolve().parent.parent / "benchmarks"
# The benchmarks are scripts that import their sibling ``common``: make it importable here too.
sys.path.insert(0, str(BENCH_DIR))
kb = importlib.import_module("kvcache_benchmark")
tio = importlib.import_module("bench_tier_io")
bench_engine = importlib.import_module("bench_engine")
ab_decode = importlib.import_module("ab_decode")

CPU_ONLY = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU defaults")


def only_file(directory: Path, pattern: str) -> Path:
    found = sorted(directory.glob(pattern))
    assert len(found) == 1, f"{pattern}: {found}"
    return found[0]


# ---------------------------------------------------------------------------- helpers
def test_token_counts_parse_k_as_1024():
    assert kb.parse_token_counts("1K, 10k,2048") == [1024, 10240, 2048]
    with pytest.raises(ValueError):
        kb.parse_token_counts("1.5")


def test_expected_hit_is_whole_pages_of_all_but_the_last_token():
    assert kb.expected_hit_tokens(2048, 16) == 2047  # the last page lends 15 tokens
    assert kb.expected_hit_tokens(2049, 16) == 2048
    assert kb.expected_hit_tokens(2050, 16) == 2048
    assert kb.expected_hit_tokens(16, 16) == 15
    assert kb.expected_hit_tokens(15, 16) == 0


def test_prompts_never_share_a_first_token():
    f = kb.PromptFactory(vocab_size=1826, seed=0)
    prompts = f.make(50, 64) + f.make(50, 64)
    assert {len(p) for p in prompts} == {64}
    assert len({p[0] for p in prompts}) == 100
    assert all(10 <= t < 1826 for p in prompts for t in p)


@CPU_ONLY
def test_cpu_defaults_and_overrides():
    cfg = kb.resolve_config(kb.parse_args([]))
    assert (cfg.ttft, cfg.throughput, cfg.backends) == (True, False, ("dram",))
    assert cfg.model == "builtin:tiny-qwen3" and cfg.page_size == 16
    assert cfg.lengths == [256, 1024, 2048]
    cfg = kb.resolve_config(kb.parse_args(["--backend", "both", "--page-size", "4"]))
    assert cfg.backends == ("dram", "xmem") and cfg.page_size == 4
    kw = kb.engine_kwargs(cfg, "xmem")
    assert kw["hicache_use_xmem"] is True and "hicache_tier" not in kw
    assert kb.engine_kwargs(cfg, "peer")["hicache_tier"] == "peer"


# ---------------------------------------------------------------------------- TTFT
@CPU_ONLY
def test_default_command_runs_and_tier_hits_beat_recompute(tmp_path):
    """``python benchmarks/kvcache_benchmark.py`` (the README's command) as a fresh process."""
    env = {k: v for k, v in os.environ.items() if k != "KVTIER_XMEM_STANDIN"}
    proc = subprocess.run(
        [sys.executable, str(BENCH_DIR / "kvcache_benchmark.py"), "--output-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "tier hit ms" in proc.stdout and "recompute ms" in proc.stdout
    doc = json.loads(only_file(tmp_path, "kvcache_ttft_*.json").read_text())
    only_file(tmp_path, "kvcache_ttft_*.csv")
    for name in ("kvcache_ttft_*.png", "kvcache_speedup_*.png"):
        assert only_file(tmp_path, name).stat().st_size > 1000
    assert doc["error"] is None
    assert doc["hardware"]["cpu"] and doc["versions"]["torch"] == torch.__version__
    assert doc["bandwidth"]["measured"] is False
    samples = doc["ttft_samples"]
    assert {s["kind"] for s in samples} == {"recompute", "gpu_hit", "tier_hit"}
    assert all(s["verified"] is True for s in samples)
    for s in samples:
        if s["kind"] == "tier_hit":
            assert s["cached_tokens_by_tier"] == {"dram": s["expected_hit_tokens"]}
    longest = max(s["length"] for s in samples)
    by_kind = {
        k: [s["ttft_s"] for s in samples if s["length"] == longest and s["kind"] == k]
        for k in ("recompute", "tier_hit")
    }
    # At 2048 tokens the tiny model's prefill takes >10x longer than loading its KV.
    assert statistics.median(by_kind["tier_hit"]) < statistics.median(by_kind["recompute"])
    rows = {r["length"]: r for r in doc["ttft_summary"]}
    assert set(rows) == {256, 1024, 2048}
    assert rows[2048]["speedup"] > 1 and rows[2048]["kv_mb"] == pytest.approx(2048 * 4096 / 1e6)


def test_hits_from_the_gpu_are_an_error_not_a_number(tmp_path, capsys):
    code = kb.main(
        [
            "--skip-device-flush",
            "--lengths",
            "256",
            "--num-prompts",
            "1",
            "--no-plots",
            "--output-dir",
            str(tmp_path),
        ]
    )
    assert code == 1
    err = capsys.readouterr().err
    assert "verification failed" in err
    assert "tier hit was served {'device': 255}" in err and "{'dram': 255} was intended" in err
    doc = json.loads(only_file(tmp_path, "kvcache_ttft_*.json").read_text())
    assert "device flush skipped" in doc["error"]
    assert doc["ttft_samples"][-1]["verified"] is False  # the failing request is on record
    assert doc["ttft_summary"][0]["verified"] == "FAILED"
    assert doc["ttft_summary"][0]["tier_hit_ms"] is None


@pytest.mark.parametrize("length", [256, 250], ids=["whole-pages", "partial-page"])
def test_new_turns_find_the_prompts_pages_on_the_gpu_then_in_l2(tmp_path, capsys, length):
    """--turn-tokens: each prompt followed by fresh tokens, its whole pages served from the GPU
    (turn GPU) and, after the device flush, from L2 (turn tier); the new tokens computed."""
    cfg = kb.resolve_config(
        kb.parse_args(
            ["--lengths", str(length), "--num-prompts", "2", "--turn-tokens", "40", "--no-plots"]
            + ["--output-dir", str(tmp_path), "--device", "cpu", "--page-size", "16"]
        )
    )
    results = kb.run(cfg)
    assert results.exit_code == 0, results.error
    turns = [s for s in results.ttft_samples if s["kind"].startswith("turn_")]
    assert sorted(s["kind"] for s in turns) == ["turn_gpu"] * 2 + ["turn_tier"] * 2
    whole_pages = length // 16 * 16
    for s in turns:
        # The first turn finds the prompt's whole pages, the second (in L2) all of it: the first
        # completed the prompt's last page.
        want = whole_pages if s["kind"] == "turn_gpu" else length
        assert s["verified"] is True and s["cached_tokens"] == want, s
        where = "device" if s["kind"] == "turn_gpu" else "dram"
        assert s["cached_tokens_by_tier"] == {where: want}, s
    # The plain hits are what they are without turns (the turns run after them).
    tier = [s for s in results.ttft_samples if s["kind"] == "tier_hit"]
    assert all(s["cached_tokens_by_tier"] == {"dram": kb.expected_hit_tokens(length, 16)}
               for s in tier)  # fmt: skip
    row = results.ttft_rows[0]
    assert row["turn_gpu_ms"] > 0 and row["turn_tier_ms"] > 0
    assert "turn GPU ms" in capsys.readouterr().out
    # The warm-up took both turn paths too (their kernels compile outside the timed turns).
    assert sorted(results.warmup["dram"]) == [
        "warmup_hit_s", "warmup_miss_s", "warmup_turn_gpu_s", "warmup_turn_tier_s"
    ]  # fmt: skip


def test_unavailable_backends_are_reported_as_skipped(tmp_path, monkeypatch):
    monkeypatch.delenv("KVTIER_XMEM_STANDIN", raising=False)
    cfg = kb.resolve_config(
        kb.parse_args(
            ["--backend", "all", "--lengths", "64", "--num-prompts", "1", "--no-plots"]
            + ["--output-dir", str(tmp_path), "--device", "cpu"]
        )
    )
    results = kb.run(cfg)
    assert results.exit_code == 0
    skipped = {s["backend"]: s["reason"] for s in results.skipped}
    assert "peer" in skipped and "at least 2 GPUs" in skipped["peer"]
    assert "xmem" in skipped and "xmem" in skipped["xmem"]
    assert {s["backend"] for s in results.ttft_samples} == {"dram"}


# ---------------------------------------------------------------------------- throughput
def test_throughput_hit_rates_are_tier_hits(tmp_path):
    code = kb.main(
        ["--throughput", "--tp-num-prompts", "6", "--tp-prompt-len", "128", "--hit-rates"]
        + ["0,50,100", "--device", "cpu", "--output-dir", str(tmp_path)]
    )
    assert code == 0
    doc = json.loads(only_file(tmp_path, "kvcache_throughput_*.json").read_text())
    assert "ttft_samples" in doc and not doc["ttft_samples"]
    rows = doc["throughput"]
    assert [r["target_hit_rate"] for r in rows] == [0.0, 0.5, 1.0]
    assert [r["hit_prompts"] for r in rows] == [0, 3, 6]
    full = 127 / 128  # all but the last token (8 whole pages; the last lends 15 tokens)
    for r in rows:
        assert r["hit_rate_device"] == 0
        assert r["hit_rate_l2"] == pytest.approx(r["target_hit_rate"] * full)
        assert r["output_tokens"] == 6 and r["prompt_tok_per_s"] > 0
    assert only_file(tmp_path, "kvcache_throughput_*.png").stat().st_size > 1000
    only_file(tmp_path, "kvcache_throughput_*.csv")


# ---------------------------------------------------------------------------- servers
class ForeignServer:
    """A server in the style of SGLang without tier reporting: a prefix cache of whole prompts,
    ``cached_tokens`` but no ``cached_tokens_by_tier``, and a /flush_cache that drops everything
    whatever the body says."""

    def __init__(self) -> None:
        self.seen: set[tuple[int, ...]] = set()
        self.flush_bodies: list[bytes] = []
        self.lock = threading.Lock()

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/flush_cache":
            with self.lock:
                self.flush_bodies.append(request.content)
                self.seen.clear()
            return httpx.Response(200, text="Cache flushed.")
        if request.url.path == "/generate":
            body = json.loads(request.content)
            ids = tuple(body["input_ids"])
            with self.lock:
                cached = len(ids) - 1 if ids in self.seen else 0
                self.seen.add(ids)
            meta = {"prompt_tokens": len(ids), "completion_tokens": 1, "cached_tokens": cached}
            return httpx.Response(200, json={"text": "", "output_ids": [7], "meta_info": meta})
        return httpx.Response(404, json={"detail": "not found"})


def test_foreign_server_results_are_labelled_unverified(tmp_path, capsys):
    server = ForeignServer()
    cfg = kb.resolve_config(
        kb.parse_args(
            ["--base-url", "http://bench.invalid", "--lengths", "64,128", "--num-prompts", "2"]
            + ["--ttft", "--throughput", "--tp-num-prompts", "4", "--tp-prompt-len", "64"]
            + ["--hit-rates", "0,100", "--no-plots", "--output-dir", str(tmp_path)]
        )
    )
    results = kb.run(dataclasses.replace(cfg, http_transport=httpx.MockTransport(server)))
    assert results.exit_code == 0 and results.error is None
    assert "tier hits cannot be guaranteed" in capsys.readouterr().err
    # A GPU-only flush would have emptied this server: it is never sent one.
    assert all(b"device" not in b for b in server.flush_bodies)
    assert {r["verified"] for r in results.ttft_rows} == {"unverified"}
    assert {r["verified"] for r in results.throughput_rows} == {"unverified"}
    hits = [s for s in results.ttft_samples if s["kind"] == "tier_hit"]
    assert hits and all(s["verified"] is None and s["cached_tokens"] > 0 for s in hits)


# ---------------------------------------------------------------------------- tier IO
def test_bench_tier_io_smoke(tmp_path, capsys):
    assert tio.main(["--smoke", "--output-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "bulk to GPU" in out and "load" in out and "backup" in out
    doc = json.loads(only_file(tmp_path, "tier_io_*.json").read_text())
    ops = [r for r in doc["rows"] if r["op"] in ("load", "backup")]
    assert len(ops) == 4  # two IO backends requested, load and backup each
    assert all(r["check"] == "ok" and r["gbps"] > 0 for r in ops)
    only_file(tmp_path, "tier_io_*.csv")


@CPU_ONLY
def test_bench_tier_io_refuses_a_cpu_without_smoke(capsys):
    assert tio.main([]) == 2
    assert "needs a CUDA device" in capsys.readouterr().err


def test_decode_bytes_count_each_routed_expert_once():
    # A toy MoE: 2 layers, 16 experts of 3 * 4 * 2 = 24 params, top-2, 100 active params of
    # which 2 * 2 * 24 are routed experts; 10 KV bytes a token.
    cfg = SimpleNamespace(
        active_param_count=100, is_moe=True, hidden_size=4, moe_intermediate_size=2,
        num_hidden_layers=2, is_moe_layer=lambda i: True, num_experts=16, num_experts_per_tok=2,
    )  # fmt: skip
    # Batch 1 reads exactly its k experts a layer: the active params, in bf16.
    assert bench_engine.decode_bytes(cfg, 1, 8, 10) == pytest.approx(100 * 2 + 1 * 8 * 10)
    # Batch 4: 16 (1 - (14/16)^4) = 6.6191... distinct experts expected a layer, not 8.
    touched = 16 * (1 - (14 / 16) ** 4)
    want = (4 + 2 * touched * 24) * 2 + 4 * 8 * 10
    assert bench_engine.decode_bytes(cfg, 4, 8, 10) == pytest.approx(want)
    # Never more than every expert once.
    assert bench_engine.decode_bytes(cfg, 1000, 0, 10) <= (4 + 2 * 16 * 24) * 2


def test_ab_decode_variants_parse_to_settings():
    from kvtier.kernels import attention, fused, gemv

    name, settings = ab_decode.parse_variant(
        'tiles:kvtier.kernels.gemv:TILE_OVERRIDES={"1,8,8": {"block_n": 2, "block_k": 8}};'
        "kvtier.kernels.fused:PDL_ENABLED=false"
    )
    assert name == "tiles"
    assert settings == [
        (gemv, "TILE_OVERRIDES", {"1,8,8": {"block_n": 2, "block_k": 8}}),
        (fused, "PDL_ENABLED", False),
    ]
    assert ab_decode.parse_variant("base:") == ("base", [])
    # Knock-outs stand in for a kernel: the attention stages launch nothing.
    _, ko = ab_decode.parse_variant("k:knockout=attn")
    assert [(m, a) for m, a, _ in ko] == [
        (attention, "_decode_stage1_kernel"),
        (attention, "_decode_stage2_kernel"),
    ]
    assert ko[0][2][(1, 2, 3)](1, 2, x=3) is None
    # @path settings reach the engine's objects once there is an engine.
    engine = SimpleNamespace(scheduler=SimpleNamespace(backend=SimpleNamespace(splits=64)))
    assert ab_decode.parse_variant("s:@scheduler.backend.splits=32") == ("s", [])
    ((obj, attr, value),) = ab_decode.parse_variant("s:@scheduler.backend.splits=32", engine)[1]
    assert (obj, attr, value) == (engine.scheduler.backend, "splits", 32)
    for bad, message in [
        ("nocolon", "expected NAME:"),
        ("x:kvtier.kernels.fused:NOT_THERE=1", "kvtier.kernels.fused has no attribute NOT_THERE"),
        ("x:knockout=everything", "knockout='everything': expected one of route, norm"),
        ("x:fused=1", "is not module:ATTR=JSON"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            ab_decode.parse_variant(bad)
    with pytest.raises(ValueError, match=r"engine\.scheduler\.backend has no attribute nope"):
        ab_decode.parse_variant("s:@scheduler.backend.nope=1", engine)


def test_plot_ab_decode_reads_series_by_variant_and_batch():
    plot = importlib.import_module("plot_ab_decode")
    doc = {
        "variants": {
            "base": {"32768/1": {"median_s": 0.0035}, "4096/1": {"median_s": 0.0029}},
            "old": {"4096/4": {"median_s": 0.006}},
        }
    }
    got = plot.series(doc)
    assert list(got) == [("base", 1), ("old", 4)]
    assert [c for c, _ in got["base", 1]] == [4096, 32768]  # sorted by context
    assert [ms for _, ms in got["base", 1]] == pytest.approx([2.9, 3.5])
    assert got["old", 4] == [(4096, pytest.approx(6.0))]


def test_plot_turns_reads_json_and_csv_samples(tmp_path):
    plot = importlib.import_module("plot_turns")
    samples = [
        {"length": 32768, "kind": "turn_gpu", "ttft_s": 0.05},
        {"length": 32768, "kind": "turn_gpu", "ttft_s": 0.07},
        {"length": 81920, "kind": "tier_hit", "ttft_s": 0.158},
    ]
    src_json = tmp_path / "run.json"
    src_json.write_text(json.dumps({"ttft_samples": samples}))
    src_csv = tmp_path / "run.csv"
    src_csv.write_text(
        "backend,length,kind,ttft_s\n"
        + "".join(f"dram,{s['length']},{s['kind']},{s['ttft_s']}\n" for s in samples)
    )
    for src in (src_json, src_csv):
        got = plot.means_ms(plot.load_samples(src))
        assert got == {
            (32768, "turn_gpu"): pytest.approx(60.0),
            (81920, "tier_hit"): pytest.approx(158.0),
        }
    assert plot.parse_source(f"{src_csv}=auto IO") == (src_csv, "auto IO")
    assert plot.parse_source(str(src_json)) == (src_json, "run")
    out = tmp_path / "turns.png"
    plot.main([f"{src_json}=a", f"{src_csv}=b", "--out", str(out)])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(
        SystemExit, match=re.escape("expected the benchmark's .json or samples .csv")
    ):
        plot.load_samples(tmp_path / "run.txt")
