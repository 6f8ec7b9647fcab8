"""The Engine end to end on the built-in tiny model (CPU): prefix reuse, chunked prefill,
retraction, stopping, sampling, streaming and bad input; greedy output never depends on how the
KV was obtained."""

import importlib.util
import json
import math
import random

import pytest
import torch
from engine_utils import chats, make_engine

from kvtier.sampling_params import SamplingParamsError
from kvtier.scheduler.scheduler import RequestError
from kvtier.server_args import ServerArgsError

GREEDY = {"temperature": 0, "max_new_tokens": 12, "ignore_eos": True}


make = make_engine


@pytest.fixture(scope="module")
def engine():
    with make() as e:
        yield e


@pytest.fixture(scope="module")
def reference():
    """No prefix reuse at all: every token recomputed."""
    with make(disable_radix_cache=True) as e:
        yield e


def prompts(n, length, seed=0, vocab=1500):
    rng = random.Random(seed)
    return [[rng.randrange(10, vocab) for _ in range(length)] for _ in range(n)]


def conversations(engine, n=4, turns=3, seed=0, concurrent=False, max_new=8):
    return chats(engine, n, turns, seed, concurrent, first_len=30, extra_len=7, max_new=max_new)


def test_generate_text_and_meta(engine):
    out = engine.generate("The quick brown fox", {"temperature": 0, "max_new_tokens": 5})
    assert set(out) == {"text", "output_ids", "meta_info"}
    meta = out["meta_info"]
    assert meta["completion_tokens"] == len(out["output_ids"]) <= 5
    assert meta["prompt_tokens"] == len(engine.tokenizer.encode("The quick brown fox"))
    assert meta["finish_reason"]["type"] in ("length", "stop")
    assert out["text"] == engine.tokenizer.decode(out["output_ids"], skip_special_tokens=True)
    engine.check_integrity()


def test_the_model_is_not_degenerate(reference):
    # Equality tests below mean something only if greedy outputs vary with the input.
    outs = [
        reference.generate(input_ids=p, sampling_params=GREEDY)["output_ids"]
        for p in prompts(3, 20)
    ]
    assert len({tuple(o) for o in outs}) == 3
    assert all(len(set(o)) > 2 for o in outs)


def test_shared_prefix_is_reused_and_output_unchanged(engine, reference):
    base = prompts(1, 40, seed=3)[0]
    a, b = base + [11, 12, 13], base + [21, 22]
    engine.flush_cache()
    first = engine.generate(input_ids=a, sampling_params=GREEDY)
    second = engine.generate(input_ids=b, sampling_params=GREEDY)
    assert first["meta_info"]["cached_tokens"] == 0
    assert second["meta_info"]["cached_tokens"] == 40
    assert second["meta_info"]["cached_tokens_by_tier"] == {"device": 40}
    assert (
        second["output_ids"]
        == reference.generate(input_ids=b, sampling_params=GREEDY)["output_ids"]
    )
    engine.check_integrity()


def test_prompt_cached_whole_computes_only_its_last_token(reference):
    """The last page of a prompt sent again lends its first 3 tokens' KV (copied into the
    request's own page): 39 of 40 tokens come from the cache, not 36."""
    p = prompts(1, 40, seed=5)[0]
    want = reference.generate(input_ids=p, sampling_params=GREEDY)["output_ids"]
    with make(page_size=4) as e:
        first = e.generate(input_ids=p, sampling_params=GREEDY)
        again = e.generate(input_ids=p, sampling_params=GREEDY)
        assert first["output_ids"] == again["output_ids"] == want
        assert again["meta_info"]["cached_tokens_by_tier"] == {"device": 39}
        assert e.get_stats()["tail_tokens_copied"] == 3
        # Three at once (each copies the tail into its own page), and a prompt that leaves the
        # cached path two tokens into the last page, then runs 20 new tokens in chunks of 8.
        outs = e.generate(input_ids=[p, p, p], sampling_params=GREEDY)
        assert [o["output_ids"] for o in outs] == [want] * 3
        assert [o["meta_info"]["cached_tokens"] for o in outs] == [39] * 3
        e.check_integrity()
    branch = p[:38] + prompts(1, 20, seed=6)[0]
    want = reference.generate(input_ids=branch, sampling_params=GREEDY)["output_ids"]
    with make(page_size=4, chunked_prefill_size=8) as e:
        e.generate(input_ids=p, sampling_params=GREEDY)
        out = e.generate(input_ids=branch, sampling_params=GREEDY)
        assert out["output_ids"] == want
        assert out["meta_info"]["cached_tokens"] == 38
        assert e.get_stats()["tail_tokens_copied"] == 2
        e.check_integrity()


def test_gpu_hit_tail_is_copied_for_all_layers_before_the_step(reference):
    """With no load in flight the tail is copied for every layer when the step is prepared
    (one op over the layer axis) and the forward gets no per-layer hook: it runs as a step
    without tiers would, which lets the q/k kernel store the new KV itself."""
    from kvtier.runner.forward_batch import ForwardMode

    p = prompts(1, 40, seed=8)[0]
    want = reference.generate(input_ids=p, sampling_params=GREEDY)["output_ids"]
    with make(page_size=4) as e:
        e.generate(input_ids=p, sampling_params=GREEDY)
        runner = e.scheduler.runner
        pool = runner.kv_pool
        seen, real = [], runner.forward
        copies, real_copy = [], pool.copy_slots_all_layers

        def forward(fb):
            seen.append((fb.mode, fb.wait_layer))
            return real(fb)

        def copy_all(src, dst):
            copies.append((src.tolist(), dst.tolist()))
            real_copy(src, dst)

        runner.forward, pool.copy_slots_all_layers = forward, copy_all
        out = e.generate(input_ids=p, sampling_params=GREEDY)
        assert out["output_ids"] == want
        assert out["meta_info"]["cached_tokens_by_tier"] == {"device": 39}
        assert len(copies) == 1 and len(copies[0][0]) == 3  # the 3 tail slots, once
        assert [w for _, w in seen] == [None] * len(seen)
        # The prompt's one new token runs as a decode batch (the decode graph on CUDA), and so
        # does every step after it.
        assert [m for m, _ in seen] == [ForwardMode.DECODE] * len(seen)
        e.check_integrity()


def test_tail_copy_of_a_skipped_admission_step_runs_before_a_decode_step(reference):
    """If a request's admission step is skipped (a failed load of another request's prefix),
    its last prompt token runs as a decode step: the tail copy must then cover every layer
    before it (a decode CUDA graph waits only once), and the answer stays the recomputed one."""
    from kvtier.runner.forward_batch import ForwardMode
    from kvtier.sampling_params import SamplingParams
    from kvtier.scheduler.batch import ScheduleBatch
    from kvtier.scheduler.request import Req

    p = prompts(1, 40, seed=7)[0]
    want = reference.generate(input_ids=p, sampling_params=GREEDY)["output_ids"]
    with make(page_size=4) as e:
        e.generate(input_ids=p, sampling_params=GREEDY)
        s = e.scheduler
        req = Req(rid="t", input_ids=p, sampling=SamplingParams(**GREEDY))
        s.add_request(req)
        batch = s._schedule_extend()
        assert batch is not None and batch.reqs == [req] and batch.num_new == [1]
        src_page, dst_page, n = req.tail_copy
        assert n == 3 and req.kv_len == 39
        pool = s.runner.kv_pool
        pool.k[:, dst_page * 4 : dst_page * 4 + 3] = float("nan")  # poison the own page
        decode = ScheduleBatch(ForwardMode.DECODE, [req], [1])
        # Copied for every layer when the step is prepared, not left to a per-layer hook.
        assert s._with_tail_copies(decode, None) is None
        assert req.tail_copy is None
        assert torch.equal(
            pool.k[:, dst_page * 4 : dst_page * 4 + 3], pool.k[:, src_page * 4 : src_page * 4 + 3]
        )
        s._run(decode)
        while s.has_work():
            s.step()
        assert req.output_ids == want
        e.check_integrity()


@pytest.mark.parametrize("page_size", [1, 16])
def test_multi_turn_equals_recompute(page_size, reference):
    want, _ = conversations(reference)
    with make(page_size=page_size) as e:
        got, metas = conversations(e)
        assert got == want
        assert sum(m["cached_tokens"] for m in metas) > 0
        e.check_integrity()


def test_concurrent_batch_equals_sequential(reference):
    want, _ = conversations(reference)
    with make(page_size=4) as e:
        got, _ = conversations(e, concurrent=True)
    assert got == want


def test_chunked_prefill_equals_one_shot(reference):
    ps = prompts(3, 50, seed=5)
    want = [reference.generate(input_ids=p, sampling_params=GREEDY)["output_ids"] for p in ps]
    with make(chunked_prefill_size=7, max_prefill_tokens=16, page_size=4) as e:
        got = e.generate(input_ids=ps, sampling_params=GREEDY)
        assert [g["output_ids"] for g in got] == want
        assert e.get_stats()["forward_steps"] > 12  # the prompts really went in chunks
        e.check_integrity()


def test_retraction_under_page_pressure_keeps_outputs(reference):
    ps = prompts(6, 30, seed=7)
    sp = {"temperature": 0, "max_new_tokens": 24, "ignore_eos": True}
    want = [reference.generate(input_ids=p, sampling_params=sp)["output_ids"] for p in ps]
    # 6 requests x 54 tokens do not fit in 160 slots: decode must retract and recompute.
    with make(max_total_tokens=160, page_size=4) as e:
        got = e.generate(input_ids=ps, sampling_params=sp)
        assert [g["output_ids"] for g in got] == want
        assert e.get_stats()["retractions"] > 0
        e.check_integrity()
        assert e.get_stats()["device_free_pages"] + e.get_stats()["device_cached_pages"] == 40


def test_stop_conditions(engine):
    p = prompts(1, 20, seed=9)[0]
    full = engine.generate(input_ids=p, sampling_params=GREEDY)["output_ids"]
    target = full[4]
    out = engine.generate(input_ids=p, sampling_params={**GREEDY, "stop_token_ids": [target]})
    assert out["output_ids"] == full[: full.index(target) + 1]
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": target}
    out = engine.generate(input_ids=p, sampling_params={**GREEDY, "max_new_tokens": 3})
    assert out["output_ids"] == full[:3]
    assert out["meta_info"]["finish_reason"] == {"type": "length"}


def test_stop_string_is_trimmed_and_never_streamed(engine):
    p = prompts(1, 20, seed=11)[0]
    text = engine.generate(input_ids=p, sampling_params=GREEDY)["text"]
    assert len(text) > 6
    stop = text[3:6]
    out = engine.generate(input_ids=p, sampling_params={**GREEDY, "stop": stop})
    assert out["text"] == text[: text.index(stop)]
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    chunks = list(
        engine.generate(input_ids=p, sampling_params={**GREEDY, "stop": stop}, stream=True)
    )
    assert "".join(c["text"] for c in chunks) == out["text"]
    engine.check_integrity()


def test_streaming_yields_increments(engine):
    p = prompts(1, 15, seed=13)[0]
    full = engine.generate(input_ids=p, sampling_params=GREEDY)
    chunks = list(engine.generate(input_ids=p, sampling_params=GREEDY, stream=True))
    assert len(chunks) == GREEDY["max_new_tokens"]
    assert [t for c in chunks for t in c["output_ids"]] == full["output_ids"]
    assert "".join(c["text"] for c in chunks) == full["text"]
    assert chunks[-1]["meta_info"]["finish_reason"] == {"type": "length"}
    assert all(c["meta_info"]["finish_reason"] is None for c in chunks[:-1])


def test_abandoned_stream_aborts_and_frees(engine):
    p = prompts(1, 15, seed=15)[0]
    it = engine.generate(input_ids=p, sampling_params={**GREEDY, "max_new_tokens": 50}, stream=True)
    next(it)
    it.close()
    assert not engine.scheduler.has_work()
    engine.check_integrity()


def test_sampling_seed_is_reproducible(engine):
    p = prompts(1, 15, seed=17)[0]
    sp = {"temperature": 1.0, "top_p": 0.9, "top_k": 50, "max_new_tokens": 16, "seed": 1234}
    a = engine.generate(input_ids=p, sampling_params=sp)["output_ids"]
    b = engine.generate(input_ids=p, sampling_params=sp)["output_ids"]
    c = engine.generate(input_ids=p, sampling_params={**sp, "seed": 99})["output_ids"]
    assert a == b and a != c


def test_bad_requests_raise_clear_errors(engine):
    with pytest.raises(RequestError, match="the prompt is empty"):
        engine.generate(input_ids=[], sampling_params=GREEDY)
    with pytest.raises(RequestError, match=r"token id 999999 is outside the vocabulary"):
        engine.generate(input_ids=[1, 999999], sampling_params=GREEDY)
    with pytest.raises(SamplingParamsError, match=r"top_p must be in \(0, 1\]; got 0"):
        engine.generate(input_ids=[5, 6], sampling_params={"top_p": 0})
    with pytest.raises(SamplingParamsError, match="unknown sampling parameter\\(s\\): temprature"):
        engine.generate(input_ids=[5, 6], sampling_params={"temprature": 0})
    with pytest.raises(RequestError, match="give exactly one of prompt and input_ids"):
        engine.generate()
    with pytest.raises(
        RequestError, match="the prompt has 40000 tokens; the context length is 32768"
    ):
        engine.generate(input_ids=[5] * 40000, sampling_params=GREEDY)
    engine.check_integrity()
    assert not engine.scheduler.has_work()


def test_bad_engine_arguments_name_the_flag():
    with pytest.raises(ServerArgsError, match="--page-size must be a power of two; got 3"):
        make(page_size=3)
    with pytest.raises(ServerArgsError, match=r"unknown engine argument\(s\): page_sise"):
        make(page_sise=4)
    with pytest.raises(
        ServerArgsError, match=r"--mem-fraction-static must be in \(0, 1\); got 1\.5"
    ):
        make(mem_fraction_static=1.5)
    with pytest.raises(ServerArgsError, match="--hicache-write-policy must be one of"):
        make(enable_hierarchical_cache=True, hicache_write_policy="sometimes")
    with pytest.raises(
        ServerArgsError,
        match="--hicache-io-backend must be one of auto, kernel, direct; got 'dma'",
    ):
        make(enable_hierarchical_cache=True, hicache_io_backend="dma")
    with pytest.raises(
        ServerArgsError, match="--triton-attention-num-kv-splits must be a positive integer; got 0"
    ):
        make(triton_attention_num_kv_splits=0)


def test_triton_attention_num_kv_splits_bounds_decode_splits():
    from kvtier.runner.model_runner import make_attention_backend

    cpu = torch.device("cpu")
    backend = make_attention_backend("triton", cpu, "auto", 8)
    assert backend.max_kv_splits == 8
    # Batch 1, 4 kv heads, 4096 keys: the heuristic wants 64 splits, the flag caps them.
    assert backend.num_kv_splits_for(1, 4, 4096, cpu) == 8
    assert make_attention_backend("triton", cpu).num_kv_splits_for(1, 4, 4096, cpu) == 64


def test_json_model_override_args():
    with pytest.raises(ServerArgsError, match="--json-model-override-args is not valid JSON"):
        make(json_model_override_args="{rope_scaling: yarn}")
    with pytest.raises(ServerArgsError, match="must be a JSON object; got list"):
        make(json_model_override_args="[1]")
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
    args = json.dumps({"rope_scaling": yarn})
    with make(json_model_override_args=args, context_length=300) as e:
        runner = e.scheduler.runner
        scaling = runner.model_config.rope_scaling
        assert (scaling.rope_type, scaling.factor) == ("yarn", 4.0)
        assert scaling.original_max_position_embeddings == 64
        layer = runner.model.decoder_layers[0].self_attn
        assert layer.scale == pytest.approx(layer.head_dim**-0.5 * (0.1 * math.log(4) + 1) ** 2)
        # Past the original 64 positions: served, and the same tokens batched or alone.
        p = prompts(2, 200, seed=23)
        together = [o["output_ids"] for o in e.generate(input_ids=p, sampling_params=GREEDY)]
        alone = [e.generate(input_ids=q, sampling_params=GREEDY)["output_ids"] for q in p]
        assert together == alone
        e.check_integrity()


def test_flush_refused_while_busy_then_clears(engine):
    p = prompts(1, 20, seed=19)[0]
    engine.generate(input_ids=p, sampling_params=GREEDY)
    it = engine.generate(input_ids=p, sampling_params=GREEDY, stream=True)
    next(it)
    assert engine.flush_cache() is False
    list(it)
    assert engine.flush_cache() is True
    stats = engine.get_stats()
    assert stats["device_cached_pages"] == 0
    assert stats["device_free_pages"] == stats["device_total_pages"]
    engine.check_integrity()


def test_padded_graph_batches_equal_recompute(reference):
    """The CUDA-graph runner's padding (rows past the batch size write to and read the reserved
    page 0) changes no output. Without CUDA the padded static batches run eagerly."""
    from kvtier.runner.cuda_graph import CudaGraphRunner

    want, _ = conversations(reference, n=5)
    with make(page_size=4) as e:
        runner = e.scheduler.runner
        if runner.graph_runner is None:
            runner.graph_runner = CudaGraphRunner(
                runner, max_bs=8, max_pages=runner.max_pages_per_req, capture=False
            )
            assert runner.graph_runner.batch_sizes == [1, 2, 4, 8]
        # 5 concurrent requests decode in the size-8 bucket (3 padding rows), then fewer.
        assert 8 in runner.graph_runner.batch_sizes
        got, _ = conversations(e, n=5, concurrent=True)
        assert got == want
        e.check_integrity()


@pytest.mark.parametrize("concurrent", [False, True])
def test_piecewise_graph_batches_equal_recompute(reference, concurrent):
    """Short extends (new turns after a prefix hit) through the per-layer graph runner: the
    padding (empty sequence slots, padding tokens in their own sequence over page 0) changes no
    output. Without CUDA the padded static batches run eagerly, layer by layer."""
    from kvtier.runner.piecewise_graph import PiecewiseGraphRunner

    want, _ = conversations(reference, n=3)
    with make(page_size=4) as e:
        runner = e.scheduler.runner
        if runner.piecewise_runner is None:
            runner.piecewise_runner = PiecewiseGraphRunner(
                runner, max_tokens=48, max_bs=3, max_pages=runner.max_pages_per_req, capture=False
            )
            pw = runner.piecewise_runner
            assert pw.token_sizes == [1, 2, 4, 8, 16, 32, 48]
            assert pw.batch_sizes == [1, 2, 3]
            assert pw.bucket(1, 1) == (1, 1) and pw.bucket(3, 3) == (4, 3)
            assert pw.bucket(17, 2) == (32, 2)
            assert not pw._reachable(1, 2) and not pw._reachable(2, 3) and pw._reachable(4, 3)
        pw = runner.piecewise_runner
        # Every step (t >= b: each sequence has a token) lands in a bucket that gets captured;
        # the ones no step can reach (fewer tokens than sequences) are skipped.
        assert all(
            pw._reachable(*pw.bucket(t, b))
            for t in range(1, pw.max_tokens + 1)
            for b in range(1, pw.max_bs + 1)
            if b <= t
        )
        calls = []
        run = pw.run

        def counted(batch):
            calls.append((batch.num_tokens, batch.batch_size))
            return run(batch)

        pw.run = counted
        got, _ = conversations(e, n=3, concurrent=concurrent)
        assert got == want
        # Every later turn's extend (7 new tokens + the last output) went through the runner.
        assert len(calls) >= 2 if concurrent else len(calls) >= 6
        e.check_integrity()


def test_warm_up_leaves_no_trace(reference, caplog):
    """The server's start-up warm-up (a prompt and a turn over its cached prefix, then the turn
    again from L2) leaves the cache empty, the counters at zero, nothing leaked, and later
    outputs unchanged."""
    want, _ = conversations(reference, n=2)
    with make(page_size=4, enable_hierarchical_cache=True) as e:
        with caplog.at_level("INFO", logger="kvtier.scheduler.scheduler"):
            e.scheduler.warm_up()
        # The second turn (16 tokens) again, after its GPU copy was dropped: all but its last
        # token come back from L2.
        assert "warm-up: 15 tokens served from L2" in caplog.messages
        # The structured-output compiler is ready when xgrammar is installed.
        has_xgrammar = importlib.util.find_spec("xgrammar") is not None
        assert (e.scheduler._grammars is not None) == has_xgrammar
        stats = e.get_stats()
        assert stats["device_cached_pages"] == 0
        assert stats["device_free_pages"] == stats["device_total_pages"]
        assert set(e.scheduler.counters.values()) == {0}
        # The tier's counters too: the warm-up's backups are not the server's traffic.
        assert stats["backed_up_bytes"] == stats["backup_ops"] == 0
        assert stats["l2_used_tokens"] == stats["device_evictions_to_l2"] == 0
        e.check_integrity()
        got, metas = conversations(e, n=2)
        assert got == want
        assert metas[0]["cached_tokens"] == 0


def test_piecewise_block_table_covers_the_padding_sequence():
    """The padding sequence of a bucket maps up to max_tokens tokens to page 0 through its
    block-table row: the static table must be that wide even when the pool is not (a narrower
    row made the GPU attention kernel read past it: an illegal address on the H200)."""
    from kvtier.runner.piecewise_graph import PiecewiseGraphRunner

    with make(page_size=4, max_total_tokens=160) as e:
        runner = e.scheduler.runner
        assert runner.max_pages_per_req < 64
        pw = PiecewiseGraphRunner(
            runner, max_tokens=256, max_bs=4, max_pages=runner.max_pages_per_req, capture=False
        )
        assert pw.block_table.shape == (5, 64)
        assert pw.max_pages == 64


def test_piecewise_graph_metadata_with_triton_split_kv_equals_recompute(reference, monkeypatch):
    """The metadata the per-layer graphs capture (grid and split-KV count fixed per bucket for
    the longest context, every length read from the static buffers, padding slots) run through
    the Triton kernels, eagerly, under Triton's interpreter: greedy output equals recompute,
    with the split-KV extend path taken."""
    pytest.importorskip("triton")
    from kvtier.kernels import attention
    from kvtier.runner.piecewise_graph import PiecewiseGraphRunner

    split_calls = []
    split = attention._extend_attention_split

    def counted(*a, **kw):
        split_calls.append(kw.get("num_kv_splits", a[13] if len(a) > 13 else None))
        return split(*a, **kw)

    monkeypatch.setattr(attention, "_extend_attention_split", counted)
    want, _ = conversations(reference, n=2, turns=2, max_new=4)
    with make(page_size=4, attention_backend="triton") as e:
        runner = e.scheduler.runner
        backend = runner.attn_backend
        # Tiny contexts: let the heuristic split keys into short splits.
        backend.min_extend_split_len = 8
        runner.piecewise_runner = PiecewiseGraphRunner(
            runner, max_tokens=48, max_bs=2, max_pages=runner.max_pages_per_req,
            capture=False, graph_metadata=True,
        )  # fmt: skip
        assert max(runner.piecewise_runner.splits.values()) > 1
        got, _ = conversations(e, n=2, turns=2, max_new=4)
        assert got == want
        assert split_calls, "the split-KV extend path never ran"
        e.check_integrity()


@pytest.mark.parametrize(
    "kw",
    [
        {"disable_radix_cache": True},
        {"context_length": 20},  # too small: skipped
        {"max_total_tokens": 24, "page_size": 4},  # a pool of 6 pages
        {"enable_hierarchical_cache": True, "page_size": 16, "hicache_write_policy": "write_back"},
    ],
)
def test_warm_up_fits_any_configuration(kw):
    with make(**kw) as e:
        e.scheduler.warm_up()
        assert e.get_stats()["device_cached_pages"] == 0
        assert set(e.scheduler.counters.values()) == {0}
        e.check_integrity()
        out = e.generate(input_ids=[11, 12, 13, 14], sampling_params=GREEDY)
        assert len(out["output_ids"]) == GREEDY["max_new_tokens"]


# ---------------------------------------------------------------------------- logprobs
def _check_logprob_shapes(out, top_n):
    meta = out["meta_info"]
    tokens, tops = meta["output_token_logprobs"], meta["output_top_logprobs"]
    assert [t for _, t, _ in tokens] == out["output_ids"]
    assert len(tops) == len(tokens) and all(len(top) == top_n for top in tops)
    for (lp, token, text), top in zip(tokens, tops, strict=True):
        assert text is None and lp <= 0.0
        values = [v for v, _, _ in top]
        assert values == sorted(values, reverse=True)
        # The sampled token, when among the top ones, carries the same logprob there.
        assert all(v == lp for v, t, _ in top if t == token)
    return tokens, tops


def test_logprobs_greedy_top_stream_and_batch(engine):
    p, q = prompts(2, 14, seed=21)
    kw = {"sampling_params": GREEDY, "return_logprob": True, "top_logprobs_num": 5}
    one = engine.generate(input_ids=p, **kw)
    tokens, tops = _check_logprob_shapes(one, 5)
    # Greedy: each token is the most likely one.
    assert all(top[0][1] == t and top[0][0] == lp for (lp, t, _), top in zip(tokens, tops))
    # The log-softmax is normalised: the probabilities of the top 5 sum to at most 1.
    assert all(sum(math.exp(v) for v, _, _ in top) <= 1.0 + 1e-6 for top in tops)
    # Streamed: the increments hold their own tokens' logprobs, which add up to the whole.
    chunks = list(engine.generate(input_ids=p, stream=True, **kw))
    streamed = [e for c in chunks for e in c["meta_info"]["output_token_logprobs"]]
    assert [t for _, t, _ in streamed] == one["output_ids"]
    assert all(abs(a[0] - b[0]) < 1e-5 for a, b in zip(streamed, tokens, strict=True))
    # In a batch (and with the prefix now cached) the values stay those of the request alone.
    both = engine.generate(input_ids=[p, q], **kw)
    assert both[0]["output_ids"] == one["output_ids"]
    again = both[0]["meta_info"]["output_token_logprobs"]
    assert all(abs(a[0] - b[0]) < 1e-5 for a, b in zip(again, tokens, strict=True))
    _check_logprob_shapes(both[1], 5)
    # Without the option nothing is added.
    plain = engine.generate(input_ids=p, sampling_params=GREEDY)
    assert "output_token_logprobs" not in plain["meta_info"]
    engine.check_integrity()


def test_logprobs_of_sampled_tokens_follow_the_raw_distribution(engine):
    # Sampled at temperature 1.5 among the 5 most likely: every token is in its position's top
    # 5 with the logprob reported for it, and the values are the raw distribution's (the first
    # position's top 5 equal a greedy request's, which shares that position).
    p = prompts(1, 12, seed=22)[0]
    sp = {"temperature": 1.5, "top_k": 5, "max_new_tokens": 8, "seed": 7, "ignore_eos": True}
    kw = {"return_logprob": True, "top_logprobs_num": 5}
    hot = engine.generate(input_ids=p, sampling_params=sp, **kw)
    tokens, tops = _check_logprob_shapes(hot, 5)
    assert all(t in {u for _, u, _ in top} for (_, t, _), top in zip(tokens, tops))
    assert any(top[0][1] != t for (_, t, _), top in zip(tokens, tops))  # not all greedy
    greedy = engine.generate(input_ids=p, sampling_params={**GREEDY, "max_new_tokens": 1}, **kw)
    first = greedy["meta_info"]["output_top_logprobs"][0]
    assert [t for _, t, _ in first] == [t for _, t, _ in tops[0]]
    assert all(abs(a[0] - b[0]) < 1e-5 for a, b in zip(first, tops[0], strict=True))
    # No top list asked for: empty lists.
    plain = engine.generate(input_ids=p, sampling_params=sp, return_logprob=True)
    assert plain["output_ids"] == hot["output_ids"]
    assert plain["meta_info"]["output_top_logprobs"] == [[] for _ in tokens]


def test_logprob_arguments_are_checked(engine):
    with pytest.raises(SamplingParamsError, match=r"^top_logprobs_num needs return_logprob$"):
        engine.generate(input_ids=[5, 6], sampling_params=GREEDY, top_logprobs_num=2)
    with pytest.raises(
        SamplingParamsError, match=r"^top_logprobs_num must be an integer in \[0, 20\]; got 21$"
    ):
        engine.generate(
            input_ids=[5, 6], sampling_params=GREEDY, return_logprob=True, top_logprobs_num=21
        )
    with pytest.raises(SamplingParamsError, match=r"^return_logprob must be true or false"):
        engine.generate(input_ids=[5, 6], sampling_params=GREEDY, return_logprob=1)
    assert not engine.scheduler.has_work()
    engine.check_integrity()


# ---------------------------------------------------------------------------- penalties
def test_frequency_and_presence_penalties_steer_greedy_choices(engine):
    # Greedy with penalties: each token is the argmax of the raw logprobs minus the penalty of
    # what was generated before it. Checked from the top-20 raw logprobs the request returns:
    # whenever the best penalized value among them is at least the 20th raw value, no token
    # outside the list can beat it, so the choice is known exactly.
    f, pres = 0.5, 0.8
    sp = {**GREEDY, "max_new_tokens": 16, "frequency_penalty": f, "presence_penalty": pres}
    decided = 0
    for p in prompts(3, 18, seed=31):
        out = engine.generate(
            input_ids=p, sampling_params=sp, return_logprob=True, top_logprobs_num=20
        )
        tops = out["meta_info"]["output_top_logprobs"]
        for i, (token, top) in enumerate(zip(out["output_ids"], tops, strict=True)):
            before = out["output_ids"][:i]

            def penalized(t, v, before=before):
                n = before.count(t)
                return v - f * n - (pres if n else 0.0)

            best = max(top, key=lambda e: penalized(e[1], e[0]))
            if penalized(best[1], best[0]) >= top[-1][0]:
                assert token == best[1]
                decided += 1
        plain = engine.generate(input_ids=p, sampling_params={**GREEDY, "max_new_tokens": 16})
        assert len(set(out["output_ids"])) >= len(set(plain["output_ids"]))
    assert decided >= 40  # of 48 positions
    engine.check_integrity()


def test_min_new_tokens_holds_back_stop_tokens(engine):
    p = prompts(1, 16, seed=32)[0]
    first = engine.generate(input_ids=p, sampling_params={**GREEDY, "max_new_tokens": 1})
    stop = first["output_ids"][0]
    sp = {"temperature": 0, "max_new_tokens": 8, "stop_token_ids": [stop]}
    stopped = engine.generate(input_ids=p, sampling_params=sp)
    assert stopped["output_ids"] == [stop]
    assert stopped["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    held = engine.generate(input_ids=p, sampling_params={**sp, "min_new_tokens": 3})
    assert len(held["output_ids"]) >= 3 and stop not in held["output_ids"][:3]
    engine.check_integrity()


def test_repetition_penalty_and_min_p_change_or_keep_outputs(engine):
    p = prompts(1, 20, seed=33)[0]
    plain = engine.generate(input_ids=p, sampling_params=GREEDY)["output_ids"]
    # min_p = 1 keeps only the likeliest token: sampling at any temperature is greedy.
    hot = {"temperature": 2.0, "min_p": 1.0, "max_new_tokens": 12, "ignore_eos": True, "seed": 3}
    assert engine.generate(input_ids=p, sampling_params=hot)["output_ids"] == plain
    # The strongest repetition penalty moves the greedy choice off tokens of the prompt.
    rep = engine.generate(input_ids=p, sampling_params={**GREEDY, "repetition_penalty": 2.0})
    assert rep["output_ids"] != plain
    engine.check_integrity()


def test_prompt_logprobs_scoring_only_and_errors(engine):
    p = prompts(1, 20, seed=34)[0]
    kw = {"return_logprob": True, "logprob_start_len": 0}
    first = engine.generate(input_ids=p, sampling_params={**GREEDY, "max_new_tokens": 3}, **kw)
    # Scoring only (max_new_tokens 0): the prompt runs, nothing is generated, and its
    # positions are recomputed although the prompt is now cached: the same values.
    score = engine.generate(input_ids=p, sampling_params={"max_new_tokens": 0}, **kw)
    assert score["output_ids"] == [] and score["meta_info"]["finish_reason"] == {"type": "length"}
    assert score["meta_info"]["cached_tokens"] == 0
    a, b = first["meta_info"]["input_token_logprobs"], score["meta_info"]["input_token_logprobs"]
    assert [t for _, t, _ in a] == p and a[0][0] is None
    assert all(abs(x[0] - y[0]) < 1e-5 for x, y in zip(a[1:], b[1:], strict=True))
    # Streamed: the prompt's logprobs come once, with the first output.
    chunks = list(
        engine.generate(
            input_ids=p, sampling_params={**GREEDY, "max_new_tokens": 3}, stream=True, **kw
        )
    )
    with_prompt = [c for c in chunks if "input_token_logprobs" in c["meta_info"]]
    assert len(with_prompt) == 1 and with_prompt[0] is chunks[0]
    with pytest.raises(
        RequestError,
        match=r"^logprob_start_len must be -1 \(no prompt logprobs\) or in \[0, 20\) \(the "
        r"prompt has 20 tokens\), with return_logprob; got 20$",
    ):
        engine.generate(
            input_ids=p, sampling_params=GREEDY, return_logprob=True, logprob_start_len=20
        )
    with pytest.raises(RequestError, match=r"with return_logprob; got 0$"):
        engine.generate(input_ids=p, sampling_params=GREEDY, logprob_start_len=0)
    assert not engine.scheduler.has_work()
    engine.check_integrity()


def test_prompt_logprob_steps_are_capped(engine, monkeypatch):
    # A request collecting prompt logprobs runs at most PROMPT_LOGPROB_CHUNK prompt tokens a
    # step (a float32 logits row each): here 8, so a 30-token prompt takes 4 steps.
    from kvtier.scheduler import scheduler as sched

    monkeypatch.setattr(sched, "PROMPT_LOGPROB_CHUNK", 8)
    p = prompts(1, 30, seed=35)[0]
    before = engine.scheduler.counters["forward_steps"]
    out = engine.generate(
        input_ids=p,
        sampling_params={"max_new_tokens": 0},
        return_logprob=True,
        logprob_start_len=0,
    )
    assert engine.scheduler.counters["forward_steps"] - before == 4
    assert len(out["meta_info"]["input_token_logprobs"]) == 30
    engine.check_integrity()


def test_logit_bias_steers_greedy_tokens(engine):
    p = prompts(1, 12, seed=36)[0]
    out = engine.generate(input_ids=p, sampling_params={**GREEDY, "logit_bias": {777: 100}})
    assert out["output_ids"] == [777] * GREEDY["max_new_tokens"]
    with pytest.raises(RequestError, match=r"^logit_bias token id 999999 is outside the vocab"):
        engine.generate(input_ids=p, sampling_params={**GREEDY, "logit_bias": {999999: 1}})
    engine.check_integrity()


# ---------------------------------------------------------------------------- schedule policy
@pytest.mark.parametrize(("policy", "want"), [("fcfs", ["b", "c", "d"]), ("lpm", ["d", "c", "b"])])
def test_schedule_policy_orders_admission(policy, want):
    """With one request running at a time, admission order is completion order: lpm admits the
    waiting request with the longest cached prefix first (d shares 16 tokens with the cached
    prompt, c 8, b none), fcfs in arrival order."""
    from kvtier.sampling_params import SamplingParams
    from kvtier.scheduler.request import Req

    base = prompts(1, 24, seed=31)[0]
    other = prompts(1, 24, seed=32)[0]
    with make(page_size=4, max_running_requests=1, schedule_policy=policy) as e:
        e.generate(input_ids=base, sampling_params=GREEDY)
        sched = e.scheduler
        sp = SamplingParams(max_new_tokens=2, temperature=0, ignore_eos=True)
        for rid, ids in (("b", other), ("c", base[:8] + other[8:]), ("d", base[:16] + other)):
            sched.add_request(Req(rid=rid, input_ids=ids, sampling=sp))
        done = []
        while sched.has_work():
            done += [o.rid for o in sched.step() if o.finished]
        assert done == want
        e.check_integrity()


def test_schedule_policy_is_checked():
    from kvtier.server_args import ServerArgs

    with pytest.raises(ServerArgsError, match="--schedule-policy must be one of fcfs, lpm"):
        ServerArgs(schedule_policy="random")


def test_chat_template_flag(tmp_path):
    from kvtier.engine import read_chat_template

    template = "{%- for m in messages %}<{{ m.role }}>{{ m.content }}{%- endfor %}"
    path = tmp_path / "t.jinja"
    path.write_text(template)
    assert read_chat_template(str(path)) == template
    assert read_chat_template(template) == template
    with pytest.raises(ServerArgsError, match=r"--chat-template 'no/such\.jinja' is neither"):
        read_chat_template("no/such.jinja")
    with make(chat_template=str(path)) as e:
        tok = e.tokenizer
        text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
        assert text == "<user>hi"


def test_chat_renders_the_template_and_reuses_repeated_messages(engine):
    system = {"role": "system", "content": "You write code. " * 60}
    conv = [system, {"role": "user", "content": "Sort a list."}]
    text = engine.tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    ids = list(engine.tokenizer.encode(text, add_special_tokens=False))
    out = engine.chat(conv, GREEDY)
    assert out["meta_info"]["prompt_tokens"] == len(ids)
    assert out["output_ids"] == engine.generate(input_ids=ids, sampling_params=GREEDY)["output_ids"]
    # A batch of conversations; the system prompt's ids come from the cache the second time.
    hits = engine._chat_encoder.hits
    conv2 = [system, {"role": "user", "content": "Reverse a string."}]
    both = engine.chat([conv, conv2], GREEDY)
    assert both[0]["output_ids"] == out["output_ids"] and len(both) == 2
    assert engine._chat_encoder.hits >= hits + 2
    # Streamed: the pieces join to the whole answer.
    pieces = list(engine.chat(conv, GREEDY, stream=True))
    assert [t for p in pieces for t in p["output_ids"]] == out["output_ids"]
    with pytest.raises(RequestError, match=r"^messages must not be empty$"):
        engine.chat([], GREEDY)
    with pytest.raises(RequestError, match=r"^chat_template_kwargs may not set tools$"):
        engine.chat(conv, GREEDY, chat_template_kwargs={"tools": []})
    with pytest.raises(RequestError, match=r"^messages must be a list"):
        engine.chat("hi", GREEDY)
    engine.check_integrity()
