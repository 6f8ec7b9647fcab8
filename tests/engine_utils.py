"""Engines for tests: the built-in tiny model with a pool sized explicitly (on a GPU the default
pool takes most of its memory, and tests build several engines at once)."""

import random

import kvtier


def make_engine(**kw) -> kvtier.Engine:
    kw.setdefault("model_path", "builtin:tiny-qwen3")
    # float32 everywhere (the CPU default): the tests compare greedy tokens of differently
    # computed paths (prefix from a cache tier vs recomputed), and in bfloat16 on a GPU those
    # differ in rounding wherever cuBLAS picks another GEMM algorithm for another row count,
    # which flips near-tied tokens of a random tiny model. float32 keeps such differences far
    # below any logit margin, so a mismatch means wrong KV, not rounding.
    kw.setdefault("dtype", "float32")
    kw.setdefault("log_level", "warning")
    kw.setdefault("max_total_tokens", 16384)
    return kvtier.Engine(**kw)


def make_hicache_engine(**kw) -> kvtier.Engine:
    """Hierarchical cache under pressure: the GPU pool holds about two short conversations, so
    the rest must come back from L2."""
    kw.setdefault("enable_hierarchical_cache", True)
    kw.setdefault("page_size", 4)
    kw.setdefault("max_total_tokens", 128)
    kw.setdefault("hicache_ratio", 4.0)
    return make_engine(**kw)


def chats(
    engine: kvtier.Engine,
    n: int = 4,
    turns: int = 3,
    seed: int = 0,
    concurrent: bool = False,
    first_len: int = 30,
    extra_len: int = 7,
    max_new: int = 8,
) -> tuple[list[list[int]], list[dict]]:
    """Multi-turn chats as token ids: each turn re-sends the whole history plus a new message.
    Returns every turn's output ids and meta_info; checks integrity after each turn."""
    rng = random.Random(seed)
    hist = [[rng.randrange(10, 1500) for _ in range(first_len)] for _ in range(n)]
    sp = {"temperature": 0, "max_new_tokens": max_new, "ignore_eos": True}
    outs, metas = [], []
    for _ in range(turns):
        if concurrent:
            res = engine.generate(input_ids=hist, sampling_params=sp)
        else:
            res = [engine.generate(input_ids=h, sampling_params=sp) for h in hist]
        for i, r in enumerate(res):
            outs.append(r["output_ids"])
            metas.append(r["meta_info"])
            hist[i] = (
                hist[i] + r["output_ids"] + [rng.randrange(10, 1500) for _ in range(extra_len)]
            )
        engine.check_integrity()
    return outs, metas
