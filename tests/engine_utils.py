"""Engines for tests: the built-in tiny model with a pool sized explicitly (on a GPU the default
pool takes most of its memory, and tests build several engines at once)."""

import kvtier


def make_engine(**kw) -> kvtier.Engine:
    kw.setdefault("model_path", "builtin:tiny-qwen3")
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
