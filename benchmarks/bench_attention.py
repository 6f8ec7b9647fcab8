"""Benchmark the Triton paged attention kernels (GPU only).

Decode: batch 1/32/128 at a 4K context, Qwen3-30B-A3B geometry (32 q heads, 4 kv heads,
head_dim 128), page 64 and page 1; reports the KV bandwidth achieved (bytes of K and V read per
second) against a device-to-device copy measured in the same run, and TFLOP/s; for each variant
of --decode-prefetch (the first key block loaded before the PDL wait or after it).
Extend: 16K new tokens with no prefix and after a 64K prefix; reports TFLOP/s (causal FLOPs
only), next to torch SDPA (flash) on contiguous K/V for the no-prefix case.
Short extend (a prompt served from the cache, or a new turn): 64 new tokens (or each of
--short-extend-tokens) after a 32K and an 80K prefix, batch 1; the one-pass kernel (splits 1)
against split-KV extend (the heuristic's count, marked *, or each of --extend-splits); reports
us, the KV read rate (each key and value read once: the bytes of the sequence's K
and V per second) and TFLOP/s.

Times are ``triton.testing.do_bench`` medians (it flushes L2 between runs, so decode reads come
from HBM as they would across a model's layers).

    python benchmarks/bench_attention.py                  # the default table
    python benchmarks/bench_attention.py --sweep          # also time alternative tiles / splits
    python benchmarks/bench_attention.py --mode short-extend --sweep --check
    python benchmarks/bench_attention.py --mode decode --decode-prefetch both --check
    python benchmarks/bench_attention.py --mode short-extend --carry both   # A/B of the loops
    python benchmarks/bench_attention.py --mode short-extend --short-extend-tokens 512 1024 2048 \
        --extend-splits 2 4 8                             # new turns: one pass against splits
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=["decode", "extend", "short-extend", "all"], default="all")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32, 128])
    p.add_argument("--context", type=int, default=4096, help="decode: KV length per sequence")
    p.add_argument("--page-sizes", type=int, nargs="+", default=[64, 1])
    p.add_argument("--extend-tokens", type=int, default=16384)
    p.add_argument("--prefix-lens", type=int, nargs="+", default=[0, 65536])
    p.add_argument("--extend-page-size", type=int, default=64)
    p.add_argument(
        "--short-extend-tokens", type=int, nargs="+", default=[64], help="new tokens (each)"
    )
    p.add_argument("--short-prefix-lens", type=int, nargs="+", default=[32768, 81920])
    p.add_argument(
        "--extend-splits",
        type=int,
        nargs="+",
        default=None,
        help="short extend split counts to time (default: the heuristic's); 1 here runs the "
        "split kernel with one split (its GQA-packed tiles, no split of the keys)",
    )
    p.add_argument(
        "--split-tiles",
        nargs="+",
        default=None,
        metavar="ROWS,KEYS,WARPS,STAGES",
        help="short extend: split-kernel tiles to time (default: the kernel's default; with "
        "--sweep, a fixed list)",
    )
    p.add_argument("--num-q-heads", type=int, default=32)
    p.add_argument("--num-kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument(
        "--num-kv-splits", type=int, default=None, help="decode splits (default: heuristic)"
    )
    p.add_argument(
        "--decode-prefetch",
        choices=["0", "1", "both"],
        default="both",
        help="decode: first key block loaded before the PDL wait (1, forced), after (0), or both",
    )
    p.add_argument(
        "--carry",
        choices=["auto", "0", "1", "both"],
        default="auto",
        help="key loops look up the next block's pages a step ahead (1), in the step (0), both "
        "in turn, or as the kernels choose (auto; attention.CARRY_SLOTS)",
    )
    p.add_argument("--sweep", action="store_true", help="also time alternative tiles and splits")
    p.add_argument("--check", action="store_true", help="compare outputs with the torch refs")
    p.add_argument("--rep", type=int, default=100, help="do_bench repetition time, ms")
    return p.parse_args(argv)


def bench(fn: Callable[[], object], rep: int) -> float:
    """Median milliseconds."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median"))


def copy_bandwidth(rep: int) -> float:
    """Device-to-device copy bandwidth, bytes read + written per second (the HBM ceiling)."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src), rep)
    return 2 * src.numel() / (ms * 1e-3)


def random_pool(num_tokens: int, page_size: int, hkv: int, d: int, dtype: torch.dtype, gen):
    """K/V buffers with room for num_tokens (+ the reserved page 0) and a random page order."""
    num_pages = (num_tokens + page_size - 1) // page_size + 1
    k = torch.randn((num_pages * page_size, hkv, d), dtype=dtype, device="cuda", generator=gen)
    v = torch.randn_like(k)
    pages = torch.randperm(num_pages - 1, device="cuda", generator=gen).to(torch.int32) + 1
    return k, v, pages


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def bench_graph(fns: list[Callable[[], object]], rep: int) -> float:
    """Median milliseconds per call of ``fns`` run back to back, replayed as one CUDA graph:
    no host launch overhead (as in the engine's decode), each call on its own buffers."""
    import triton.testing

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for fn in fns:  # compile and warm up outside the capture
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in fns:
            fn()
    ms = triton.testing.do_bench(graph.replay, warmup=25, rep=rep, return_mode="median")
    return float(ms) / len(fns)


def decode_variants(args: argparse.Namespace) -> list[bool]:
    """Prefetch before the PDL wait, or not, for each variant to time (--decode-prefetch)."""
    return {"0": [False], "1": [True], "both": [False, True]}[args.decode_prefetch]


def decode_case(args: argparse.Namespace, bs: int, ps: int, bw_copy: float, gen) -> None:
    """Time decode for one (batch, page size) as one layer of a model: a CUDA graph runs it over
    enough layers' KV (separate buffers) that the reads come from HBM, not L2. Prints, for each
    variant (prefetch before the PDL wait or not), the heuristic's split count with the default
    tiles (marked *) and, with --sweep, a row per tile config with the time for each split
    count."""
    from kvtier.kernels import attention as A

    dtype, hq, hkv, d, ctx = (
        DTYPES[args.dtype], args.num_q_heads, args.num_kv_heads, args.head_dim, args.context
    )  # fmt: skip
    elt = torch.empty((), dtype=dtype).element_size()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    kv_bytes = 2 * bs * ctx * hkv * d * elt
    flops = 4 * bs * hq * ctx * d
    # >= 256 MB of KV in all (over 4x the H200's 60 MB L2), at most 32 layers.
    layers = max(1, min(32, -(-(256 << 20) // kv_bytes)))
    pools = [random_pool(bs * ctx, ps, hkv, d, dtype, gen) for _ in range(layers)]
    pages = pools[0][2]
    ppseq = (ctx + ps - 1) // ps
    table = pages[: bs * ppseq].view(bs, ppseq).contiguous()
    seq_lens = torch.full((bs,), ctx, dtype=torch.int32, device="cuda")
    q = torch.randn((bs, hq, d), dtype=dtype, device="cuda", generator=gen)
    out = torch.empty_like(q)
    chosen = args.num_kv_splits or A.choose_num_kv_splits(bs, hkv, ctx, num_sms=sms)
    base = A.default_decode_config(d, dtype)
    splits_all = sorted({chosen, 1, 2, 4, 8, 16, 32, 64, 128}) if args.sweep else [chosen]
    tiles = [base]
    if args.sweep:
        for bn, w, st in ((16, 2, 1), (32, 2, 1), (32, 4, 1), (32, 4, 2), (64, 2, 1), (64, 4, 1),
                          (64, 4, 2), (64, 4, 3), (64, 4, 4), (128, 4, 2), (128, 4, 3),
                          (64, 8, 3), (128, 8, 3)):  # fmt: skip
            if A.KernelConfig(16, bn, w, st) not in tiles:
                tiles.append(A.KernelConfig(16, bn, w, st))
    mid_o, mid_lse = A.decode_scratch(bs, hq, max(splits_all), d, "cuda")

    def call(k: torch.Tensor, v: torch.Tensor, cfg: A.KernelConfig, splits: int):
        return functools.partial(
            A.decode_attention, q, k, v, out, table, seq_lens, 0.088, splits, page_size=ps,
            mid_o=mid_o, mid_lse=mid_lse, config=cfg,
        )  # fmt: skip

    def run(cfg: A.KernelConfig, splits: int, prefetch: bool) -> float:
        # Read at launch, so it is baked into the captured graph.
        A.DECODE_PREFETCH = prefetch
        return bench_graph([call(k, v, cfg, splits) for k, v, _ in pools], args.rep)

    first = None
    for prefetch in decode_variants(args):
        ms = run(base, chosen, prefetch)
        bw = kv_bytes / (ms * 1e-3)
        tag = f"{base.block_n}/{base.num_warps}w/{base.num_stages}s"
        var = "pf" if prefetch else "--"
        print(f"{bs:>5} {ps:>4} {chosen:>6} {var:>7} {tag:>14} {layers:>6} {ms * 1e3:>8.1f} "
              f"{bw / 1e9:>7.0f} {100 * bw / bw_copy:>5.0f}% "
              f"{flops / (ms * 1e-3) / 1e12:>7.2f}")  # fmt: skip
        if args.check:
            k, v, _ = pools[-1]
            call(k, v, base, chosen)()
            ref = A.decode_attention_ref(
                q, k, v, torch.empty_like(q), table, seq_lens, 0.088, page_size=ps
            )
            err = rel_err(out, ref)
            assert err < 2e-2, f"decode mismatch: rel err {err}"
            if first is None:
                first = out.clone()
            same = torch.equal(out, first)
            print(f"      check: rel err {err:.1e}, bitwise the first variant's: {same}")
        if args.sweep:
            print(f"      sweep, us per call for splits {splits_all}:")
            for cfg in tiles:
                times = [run(cfg, s, prefetch) * 1e3 for s in splits_all]
                tag = f"{cfg.block_n}/{cfg.num_warps}w/{cfg.num_stages}s"
                print(f"      {tag:>14} " + " ".join(f"{t:>7.1f}" for t in times))
    A.DECODE_PREFETCH = None


def run_decode(args: argparse.Namespace, bw_copy: float) -> None:
    from kvtier.kernels import fused

    gen = torch.Generator(device="cuda").manual_seed(0)
    pdl = fused.pdl_options(torch.device("cuda"))["PDL"]
    print(
        f"\ndecode: ctx {args.context}, {args.num_q_heads} q / {args.num_kv_heads} kv heads, "
        f"head_dim {args.head_dim}, {args.dtype}; CUDA-graph replay over `layers` KV buffers; "
        f"PDL {'on' if pdl else 'off'}; variant: first key block loaded before the PDL wait "
        f"(pf) or not (--)"
    )
    print(f"{'batch':>5} {'page':>4} {'splits':>6} {'variant':>7} {'tiles':>14} {'layers':>6} "
          f"{'us':>8} {'GB/s':>7} {'%copy':>6} {'TFLOP/s':>7}")  # fmt: skip
    for ps in args.page_sizes:
        for bs in args.batch_sizes:
            decode_case(args, bs, ps, bw_copy, gen)


def extend_case(args: argparse.Namespace, prefix: int, gen) -> None:
    """Time extend of --extend-tokens new tokens after ``prefix`` cached ones (one sequence)."""
    import torch.nn.functional as F

    from kvtier.kernels import attention as A

    dtype, hq, hkv, d, n, ps = (
        DTYPES[args.dtype], args.num_q_heads, args.num_kv_heads, args.head_dim,
        args.extend_tokens, args.extend_page_size,
    )  # fmt: skip
    scale = d**-0.5
    total = prefix + n
    k, v, pages = random_pool(total, ps, hkv, d, dtype, gen)
    table = pages.view(1, -1).contiguous()

    def i32(x: int) -> torch.Tensor:
        return torch.tensor([x], dtype=torch.int32, device="cuda")

    seq_lens, ext, starts, pre = i32(total), i32(n), i32(0), i32(prefix)
    q = torch.randn((n, hq, d), dtype=dtype, device="cuda", generator=gen)
    out = torch.empty_like(q)
    flops = 4 * hq * d * (n * prefix + n * (n + 1) / 2)
    cfgs = [A.default_extend_config(d, dtype, n)]
    if args.sweep:
        tiles = (
            (128, 64, 4, 2), (128, 64, 4, 4), (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3),
            (256, 64, 8, 2), (256, 64, 8, 3), (256, 64, 8, 4), (256, 32, 8, 3),
        )  # fmt: skip
        cfgs += [c for c in (A.KernelConfig(*t) for t in tiles) if c != cfgs[0]]
    for cfg in cfgs:
        fn = functools.partial(
            A.extend_attention, q, k, v, out, table, seq_lens, ext, starts, pre, scale, n,
            page_size=ps, config=cfg,
        )  # fmt: skip
        tag = f"{cfg.block_m}x{cfg.block_n}/{cfg.num_warps}w/{cfg.num_stages}s"
        try:
            ms = bench(fn, args.rep)
        except Exception as e:  # an over-sized tile must not stop the sweep
            print(f"{prefix:>7} {tag:>18} failed: {type(e).__name__}: {e}"[:200])
            continue
        print(f"{prefix:>7} {tag:>18} {ms:>9.2f} {flops / (ms * 1e-3) / 1e12:>8.1f}")
    if A.packed_one_pass(hq, hkv):
        # What extend_attention runs by default here: the packed one-pass kernel.
        packed = A.default_extend_split_config(d, dtype, n, hq // hkv)
        ms = bench(
            functools.partial(
                A.extend_attention,
                q,
                k,
                v,
                out,
                table,
                seq_lens,
                ext,
                starts,
                pre,
                scale,
                n,
                page_size=ps,
            ),
            args.rep,
        )
        tag = f"packed {packed.block_m}r x{packed.block_n}/{packed.num_warps}w"
        print(f"{prefix:>7} {tag:>17}* {ms:>9.2f} {flops / (ms * 1e-3) / 1e12:>8.1f}")
    # The dense path (cuDNN over gathered KV; what long prefill chunks run): its first call for
    # a new shape builds a cuDNN graph, timed apart from the steady state.
    from kvtier.kernels.dense_attention import dense_extend_attention

    dense = functools.partial(
        dense_extend_attention, q, k, v, out, table, [prefix], [n], scale, page_size=ps
    )
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    dense()
    torch.cuda.synchronize()
    first = (time.perf_counter() - t0) * 1e3
    ms = bench(dense, args.rep)
    print(
        f"{prefix:>7} {'dense (cudnn)':>18} {ms:>9.2f} {flops / (ms * 1e-3) / 1e12:>8.1f}"
        f"   first call {first:.1f} ms"
    )
    if args.check:
        ref = A.extend_attention_ref(
            q, k, v, torch.empty_like(q), table, seq_lens, ext, starts, pre, scale, n,
            page_size=ps,
        )  # fmt: skip
        dense()
        err = rel_err(out, ref)
        assert err < 2e-2, f"dense extend mismatch: rel err {err}"
        print(f"{prefix:>7} dense check: rel err {err:.1e}")
    if args.check:
        A.extend_attention(q, k, v, out, table, seq_lens, ext, starts, pre, scale, n, page_size=ps)
        ref = A.extend_attention_ref(
            q, k, v, torch.empty_like(q), table, seq_lens, ext, starts, pre, scale, n,
            page_size=ps,
        )  # fmt: skip
        err = rel_err(out, ref)
        assert err < 2e-2, f"extend mismatch: rel err {err}"
        print(f"{prefix:>7} check: rel err {err:.1e}")
    # Baselines: torch SDPA over contiguous K/V (the same causal FLOPs; the queries are the
    # last n positions, so a prefix needs the lower-right causal mask), each backend apart.
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.bias import causal_lower_right

    slots = torch.arange(total, device="cuda")
    phys = table[0, slots // ps].long() * ps + slots % ps
    kc = k[phys].transpose(0, 1).unsqueeze(0).contiguous()
    vc = v[phys].transpose(0, 1).unsqueeze(0).contiguous()
    qc = q.transpose(0, 1).unsqueeze(0).contiguous()
    mask = {"is_causal": True} if prefix == 0 else {"attn_mask": causal_lower_right(n, total)}
    backends = (
        SDPBackend.FLASH_ATTENTION,
        SDPBackend.CUDNN_ATTENTION,
        SDPBackend.EFFICIENT_ATTENTION,
    )
    for backend in backends:
        name = backend.name

        def sdpa(backend: SDPBackend = backend) -> torch.Tensor:
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(
                    qc, kc, vc, scale=scale, enable_gqa=True, **mask
                )

        try:
            ms = bench(sdpa, args.rep)
        except Exception as e:  # a backend that refuses the shape must not stop the table
            print(f"{prefix:>7} SDPA {name} failed: {type(e).__name__}: {e}"[:200])
            continue
        tag = "sdpa " + name.split("_")[0].lower()
        print(f"{prefix:>7} {tag:>18} {ms:>9.2f} {flops / (ms * 1e-3) / 1e12:>8.1f}")


def run_extend(args: argparse.Namespace) -> None:
    gen = torch.Generator(device="cuda").manual_seed(1)
    print(f"\nextend: {args.extend_tokens} new tokens, page {args.extend_page_size}, "
          f"{args.num_q_heads} q / {args.num_kv_heads} kv heads, head_dim {args.head_dim}, "
          f"{args.dtype}")  # fmt: skip
    print(f"{'prefix':>7} {'tiles':>18} {'ms':>9} {'TFLOP/s':>8}")
    for prefix in args.prefix_lens:
        extend_case(args, prefix, gen)


def short_extend_case(args: argparse.Namespace, prefix: int, n: int, gen) -> None:
    """Time an extend of ``n`` tokens after ``prefix`` cached tokens (one sequence): the one-pass
    kernel, then split-KV with the heuristic's split count and default tiles (*) or with each
    of --extend-splits, and with --sweep every tile config for each split count."""
    from kvtier.kernels import attention as A

    dtype, hq, hkv, d, ps = (
        DTYPES[args.dtype], args.num_q_heads, args.num_kv_heads, args.head_dim,
        args.extend_page_size,
    )  # fmt: skip
    scale = d**-0.5
    total = prefix + n
    elt = torch.empty((), dtype=dtype).element_size()
    kv_bytes = 2 * total * hkv * d * elt
    flops = 4 * hq * d * (n * prefix + n * (n + 1) / 2)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    k, v, pages = random_pool(total, ps, hkv, d, dtype, gen)
    table = pages.view(1, -1).contiguous()

    def i32(x: int) -> torch.Tensor:
        return torch.tensor([x], dtype=torch.int32, device="cuda")

    seq_lens, ext, starts, pre = i32(total), i32(n), i32(0), i32(prefix)
    q = torch.randn((n, hq, d), dtype=dtype, device="cuda", generator=gen)
    out = torch.empty_like(q)
    base = A.default_extend_split_config(d, dtype, n, hq // hkv)
    chosen = A.choose_extend_kv_splits(1, hq, hkv, n, total, num_sms=sms, block_rows=base.block_m)
    if args.sweep:
        splits_all = sorted({chosen, 2, 4, 8, 12, 16, 24, 32, *(args.extend_splits or [])})
    else:
        splits_all = sorted(set(args.extend_splits or [chosen]))
    # 1 among --extend-splits: the split kernel with one split (stage 2 then only copies).
    one_split = 1 in (args.extend_splits or [])
    splits_all = [s for s in splits_all if s > 1 or (s == 1 and one_split)]
    mid_o, mid_lse = A.extend_scratch(n, hq, max([*splits_all, 1]), d, "cuda")

    def run(cfg: A.KernelConfig | None, splits: int, split_kernel: bool = True) -> float:
        fn = functools.partial(
            A.extend_attention, q, k, v, out, table, seq_lens, ext, starts, pre, scale, n,
            page_size=ps, config=cfg, num_kv_splits=splits, mid_o=mid_o, mid_lse=mid_lse,
        )  # fmt: skip
        if splits == 1 and split_kernel:
            fn = functools.partial(
                A._extend_attention_split, q, k, v, out, table, seq_lens, ext, starts, pre,
                scale, n, ps, cfg, 1, mid_o, mid_lse,
            )  # fmt: skip
        return bench(fn, args.rep)

    def row(tag: str, splits: int, ms: float, mark: str = " ") -> None:
        sec = ms * 1e-3
        print(f"{n:>6} {prefix:>7} {splits:>6} {tag:>18}{mark} {ms * 1e3:>9.1f} "
              f"{kv_bytes / sec / 1e12:>7.2f} {flops / sec / 1e12:>8.1f}")  # fmt: skip

    one = A.default_extend_config(d, dtype, n)
    # The per-head one-pass kernel (a config given pins it).
    row(f"one-pass {one.block_m}x{one.block_n}/{one.num_warps}w", 1, run(one, 1, False))
    if A.packed_one_pass(hq, hkv):
        packed = A.default_extend_split_config(d, dtype, n, hq // hkv)
        # The packed one pass as extend_attention runs it by default (straight to the output).
        row(f"packed {packed.block_m}r (default)", 1, run(None, 1, False))
    cfgs = [base]
    if args.split_tiles:
        cfgs = [A.KernelConfig(*map(int, t.split(","))) for t in args.split_tiles]
    elif args.sweep:
        for t in ((128, 64, 4, 3), (128, 64, 8, 2), (128, 64, 8, 4), (128, 32, 8, 3),
                  (128, 128, 8, 2), (64, 64, 4, 3), (64, 64, 8, 3), (64, 32, 4, 3),
                  (256, 64, 8, 3)):  # fmt: skip
            if A.KernelConfig(*t) not in cfgs:
                cfgs.append(A.KernelConfig(*t))
    for cfg in cfgs:
        tag = f"{cfg.block_m}r x{cfg.block_n}/{cfg.num_warps}w/{cfg.num_stages}s"
        for splits in splits_all:
            try:
                ms = run(cfg, splits)
            except Exception as e:  # an over-sized tile must not stop the sweep
                print(f"{n:>6} {prefix:>7} {splits:>6} {tag:>18} failed: "
                      f"{type(e).__name__}: {e}"[:200])  # fmt: skip
                break
            row(tag, splits, ms, "*" if cfg == base and splits == chosen else " ")
    if args.check and splits_all:
        ref = A.extend_attention_ref(
            q, k, v, torch.empty_like(q), table, seq_lens, ext, starts, pre, scale, n,
            page_size=ps,
        )  # fmt: skip
        for splits in splits_all:
            A.extend_attention(q, k, v, out, table, seq_lens, ext, starts, pre, scale, n,
                               page_size=ps, num_kv_splits=splits, mid_o=mid_o,
                               mid_lse=mid_lse)  # fmt: skip
            err = rel_err(out, ref)
            assert err < 2e-2, f"split extend mismatch at {splits} splits: rel err {err}"
            print(f"{n:>6} {prefix:>7} {splits:>6} check: rel err {err:.1e}")


def run_short_extend(args: argparse.Namespace) -> None:
    gen = torch.Generator(device="cuda").manual_seed(2)
    print(f"\nshort extend: new tokens after a cached prefix, batch 1, page "
          f"{args.extend_page_size}, {args.num_q_heads} q / {args.num_kv_heads} kv heads, "
          f"head_dim {args.head_dim}, {args.dtype}; r = tile rows (queries x q heads)")  # fmt: skip
    print(f"{'new':>6} {'prefix':>7} {'splits':>6} {'tiles':>18} {'us':>9} {'TB/s':>7} "
          f"{'TFLOP/s':>8}")  # fmt: skip
    for n in args.short_extend_tokens:
        for prefix in args.short_prefix_lens:
            short_extend_case(args, prefix, n, gen)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # Run from a checkout without installing: make the repository root importable.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    if not torch.cuda.is_available():
        sys.exit("bench_attention.py needs a CUDA GPU (Triton kernels); none is available here.")
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    bw_copy = copy_bandwidth(args.rep)
    print(f"device-to-device copy: {bw_copy / 1e9:.0f} GB/s (read + write)")
    from kvtier.kernels import attention as A

    carries = {"auto": [None], "0": [False], "1": [True], "both": [False, True]}[args.carry]
    for carry in carries:
        # Read at launch, so it is baked into each graph captured while it is set.
        A.CARRY_SLOTS = carry
        if carry is not None:
            where = "a step ahead" if carry else "in the step"
            print(f"\n--- next block's pages looked up {where}")
        if args.mode in ("decode", "all"):
            run_decode(args, bw_copy)
        if args.mode in ("extend", "all"):
            run_extend(args)
        if args.mode in ("short-extend", "all"):
            run_short_extend(args)
    A.CARRY_SLOTS = None


if __name__ == "__main__":
    main()
