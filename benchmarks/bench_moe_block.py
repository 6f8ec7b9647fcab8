"""The MoE half of a decoder layer at decode batch 1: the persistent ``moe_block`` kernel against
the chain of kernels it replaces (the router GEMV with its norm prologue, ``moe_route``, the
two ``fused_moe`` kernels), each as a CUDA graph over ``--layers`` layers with their own weights
(Qwen3-30B-A3B's shapes, random bf16), one layer's outputs feeding the next as in the model.

    python benchmarks/bench_moe_block.py --layers 8 --repeats 20 \\
        --tiles '{}' '{"num_warps": 4}' '{"block_h": 16}'

Prints us a layer, the weight bytes a layer reads (router + k experts) over that time, and
that as a ratio of the device copy rate measured in the same run (bytes read + written, as
bench_engine's decode ratio). Also checks each variant against the chain on the first layer
(the same expert ids; the largest output difference) and counts barrier give-ups. GPU only.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
from bench_engine import copy_gbps
from bench_moe import as_graph
from common import run_metadata, time_cuda_ms, write_json

from kvtier.kernels import fused, fused_moe, gemv, moe_block


def make_layers(n: int, hidden: int, experts: int, inter: int, seed: int) -> list[dict]:
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def randn(*shape: int, s: float) -> torch.Tensor:
        return (torch.randn(shape, generator=gen, device="cuda") * s).to(torch.bfloat16)

    return [
        {
            "nw": (1 + randn(hidden, s=0.1).float()).to(torch.bfloat16),
            "rw": randn(experts, hidden, s=hidden**-0.5),
            "w13": randn(experts, 2 * inter, hidden, s=hidden**-0.5),
            "w2": randn(experts, hidden, inter, s=inter**-0.5),
        }
        for _ in range(n)
    ]


def chain_layer(x, res, layer, top_k, eps=1e-6):
    """SparseMoeBlock.forward_norm's kernels at T = 1 (layers.normed_linear, _experts)."""
    h = torch.empty_like(x)
    normed = torch.empty_like(x)
    prologue = gemv.NormPrologue(layer["nw"], eps, res, h, normed)
    logits = gemv.gemv(x, layer["rw"], norm=prologue)
    weights, ids = fused.moe_route(logits, top_k, True, out_dtype=x.dtype)
    return fused_moe.fused_moe_small(normed, layer["w13"], layer["w2"], ids, weights), h, ids


def block_layer(x, res, layer, top_k, phased, tiles, eps=1e-6):
    out, h = moe_block.moe_block(
        x, res, layer["nw"], eps, layer["rw"], layer["w13"], layer["w2"], top_k, True,
        phased=phased, **tiles,
    )  # fmt: skip
    return out, h


def time_graph(step, repeats: int) -> list[float]:
    """ms of each replay of a CUDA graph of ``step``."""
    return time_cuda_ms(as_graph(step), torch.device("cuda"), repeats)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--tiles", nargs="*", default=["{}"], help="JSON tile overrides, one a variant")
    p.add_argument(
        "--per-phase", action="store_true",
        help="also time each phase of the first --tiles alone, and the chain's kernels alone",
    )  # fmt: skip
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_moe_block: needs a CUDA GPU", file=sys.stderr)
        return 2
    hidden, experts, inter, top_k = 2048, 128, 768, 8
    layers = make_layers(args.layers, hidden, experts, inter, seed=0)
    gen = torch.Generator(device="cuda").manual_seed(1)
    x0 = torch.randn(1, hidden, generator=gen, device="cuda").to(torch.bfloat16)
    r0 = torch.randn(1, hidden, generator=gen, device="cuda").to(torch.bfloat16)
    layer_bytes = 2 * (experts * hidden + top_k * 3 * inter * hidden)
    rate = copy_gbps()
    print(f"copy rate (read + write): {rate:.0f} GB/s; a layer reads {layer_bytes / 1e6:.1f} MB")

    ref_out, ref_h, _ = chain_layer(x0, r0, layers[0], top_k)

    def run_chain() -> None:
        x, r = x0, r0
        for layer in layers:
            x, r, _ = chain_layer(x, r, layer, top_k)

    variants = [("chain", run_chain, None)]
    for spec in args.tiles:
        tiles = json.loads(spec)
        for phased in (False, True):

            def run(tiles=tiles, phased=phased) -> None:
                x, r = x0, r0
                for layer in layers:
                    x, r = block_layer(x, r, layer, top_k, phased, tiles)

            name = ("phased " if phased else "block ") + json.dumps(tiles)
            variants.append((name, run, (tiles, phased)))

    rows = []
    for name, run, cfg in variants:
        check = ""
        if cfg is not None:
            out, h = block_layer(x0, r0, layers[0], top_k, cfg[1], cfg[0])
            diff = (out.float() - ref_out.float()).abs().max().item()
            check = f"max |out - chain| {diff:.3g}, h equal {torch.equal(h, ref_h)}"
        ms = time_graph(run, args.repeats)
        us = statistics.median(ms) * 1e3 / args.layers
        gbps = layer_bytes / (us * 1e-6) / 1e9
        rows.append(
            {"variant": name, "tiles": cfg and cfg[0], "phased": bool(cfg and cfg[1]),
             "us_per_layer": us, "gbps": gbps, "ratio": gbps / rate}
        )  # fmt: skip
        print(f"{name:40s} {us:7.2f} us/layer  {gbps:6.0f} GB/s  {gbps / rate:.3f}  {check}")
    if args.per_phase:
        # Each piece alone over the layers (inputs fixed: no chain between them), to see where
        # the block's time goes against the chain's kernels.
        tiles = json.loads(args.tiles[0])
        eps = 1e-6
        h, normed = torch.empty_like(x0), torch.empty_like(x0)

        def chain_router() -> None:
            for layer in layers:
                prologue = gemv.NormPrologue(layer["nw"], eps, r0, h, normed)
                gemv.gemv(x0, layer["rw"], norm=prologue)

        prologue = gemv.NormPrologue(layers[0]["nw"], eps, r0, h, normed)
        logits = gemv.gemv(x0, layers[0]["rw"], norm=prologue)
        weights, ids = fused.moe_route(logits, top_k, True, out_dtype=x0.dtype)
        pieces = [
            ("chain: norm + router gemv", chain_router),
            ("chain: moe_route",
             lambda: [fused.moe_route(logits, top_k, True, out_dtype=x0.dtype) for _ in layers]),
            ("chain: gate/up + down",
             lambda: [fused_moe.fused_moe_small(normed, ly["w13"], ly["w2"], ids, weights)
                      for ly in layers]),
        ]  # fmt: skip
        for phase in (1, 2, 3):

            def run_phase(phase=phase) -> None:
                for layer in layers:
                    block_layer(x0, r0, layer, top_k, (phase,), tiles)

            pieces.append((f"block phase {phase} alone {json.dumps(tiles)}", run_phase))
        for name, fn in pieces:
            us = statistics.median(time_graph(fn, args.repeats)) * 1e3 / args.layers
            rows.append({"variant": name, "us_per_layer": us})
            print(f"{name:48s} {us:7.2f} us/layer")
    errors = moe_block.sync_errors(torch.device("cuda", torch.cuda.current_device()))
    print(f"barrier give-ups: {errors}")
    print("programs a SM that fit, by launch config:")
    for key, fits in moe_block._RESIDENT.items():
        print(f"  {fits}: {dict(k for k in key[2:] if isinstance(k, tuple))}")
    if args.out:
        write_json(args.out, {"meta": run_metadata(), "copy_gbps": rate, "rows": rows,
                              "sync_errors": errors})  # fmt: skip
    return 0 if errors == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
