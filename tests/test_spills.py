"""The batch-1 decode step's weight- and KV-streaming kernels compile for sm_90 without register
spills, at the Qwen3-30B-A3B shapes and the default tiles (no GPU needed: Triton's ptxas).

Why: a spill is silent (the outputs stay right) and costly: the packed extend kernel's bf16
epilogue spilled 288-392 bytes a thread and ran ~15% slower on an H200 (docs/benchmarks.md, run
15). ``ptxas -v`` said so where the timings alone did not.
"""

import textwrap

import pytest
import torch
from compile_utils import SM90_HELPERS, run_compile_check

_SPILL_CHECK = SM90_HELPERS + textwrap.dedent(
    """
    import torch
    from kvtier.kernels import attention as A, fused as FK, fused_moe as M, gemv as G
    assert not A.INTERPRETED

    def spills(fn, args, constexprs, num_warps, num_stages=3, **options):
        return spill_bytes(compile_sm90(fn, args, constexprs, num_warps, num_stages, **options))

    found = {}
    tiles = A.default_decode_config(128, torch.bfloat16)
    decode = dict(Q="*bf16", K="*bf16", V="*bf16", BlockTable="*i32", SeqLens="*i32",
                  qk_scale="fp32", stride_qh=128, stride_kt=512, stride_kh=128, stride_vt=512,
                  stride_vh=128, stride_bt=1024, Out="*bf16", MidO="*fp32", MidLse="*fp32",
                  num_splits="i32", stride_qb=4096, stride_ob=4096, stride_oh=128,
                  stride_mb=262144, stride_mh=8192, stride_ms=128, stride_lb=2048, stride_lh=64)
    for prefetch in (False, True):
        found[f"decode stage 1, prefetch {prefetch}"] = spills(
            A._decode_stage1_kernel, decode, dict(
                GROUP=8, BLOCK_H=16, HEAD_DIM=128, PAGE_SIZE=64, BLOCK_N=tiles.block_n,
                SINGLE_SPLIT=False, PREFETCH=prefetch, DOT_PREC="tf32", INTERPRET=False,
                CARRY=True, PDL=True), tiles.num_warps, tiles.num_stages)
    gemv = dict(X="*bf16", W="*bf16", OUT="*bf16", PART="*fp32", COUNT="*i32", R="*bf16",
                NW="*bf16", RES_OUT="*bf16", NORM_OUT="*bf16", T="i32", N="i32", K="i32",
                K_SPLIT="i32", PART_ROWS="i32", stride_xt="i32", stride_ot="i32",
                stride_rt="i32", stride_rot="i32", stride_not="i32", n_f="fp32", inv_n="fp32",
                eps="fp32")
    shapes = {"qkv": (5120, 2048), "o_proj": (2048, 4096), "lm_head": (151936, 2048),
              "router (norm in the prologue)": (128, 2048)}
    for name, (n, k) in shapes.items():
        cfg = G.default_config(1, n, k)
        norm = name.startswith("router")
        found[f"gemv {name}"] = spills(G._gemv_kernel, gemv, dict(
            BLOCK_T=1, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SPLIT_K=cfg.split_k,
            USE_DOT=cfg.use_dot, EVEN_K=True, NORM=norm, HAS_RESIDUAL=norm,
            WRITE_NORMED=norm, NORM_BLOCK=2048 if norm else 1, DOT_PRECISION="tf32",
            INTERPRET=False, PDL=True), cfg.num_warps, cfg.num_stages, enable_fp_fusion=True)
    moe = M.default_tiles(1)
    H, I, TOPK = 2048, 768, 8
    found["moe gate/up"] = spills(M._gate_up_kernel, dict(
        X="*bf16", W_GATE="*bf16", W_UP="*bf16", IDS="*i64", HOUT="*bf16", stride_xt=H,
        stride_we=2 * I * H, stride_wn=H, stride_wk=1, stride_ht=I), dict(
        HIDDEN=H, INTER=I, TOPK=TOPK, BLOCK_N=moe["block_n"], BLOCK_K=moe["block_k"],
        INTERPRET=False, PDL=True), moe["num_warps"], **FK._EXACT)
    found["moe down"] = spills(M._down_kernel, dict(
        HIN="*bf16", W2="*bf16", IDS="*i64", TW="*bf16", OUT="*bf16", stride_ht=I,
        stride_we=H * I, stride_wn=I, stride_wk=1, stride_ot=H), dict(
        HIDDEN=H, INTER=I, TOPK=TOPK, BLOCK_H=moe["block_h"], BLOCK_I=moe["block_i"],
        INTERPRET=False, PDL=True), moe["down_warps"], **FK._EXACT)
    spilling = {name: b for name, b in found.items() if b > 16}
    assert not spilling, spilling
    print("ok")
    """
)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on CUDA the kernels themselves run")
def test_decode_step_kernels_do_not_spill_sm90():
    run_compile_check(_SPILL_CHECK)
