"""The fused small-batch MoE kernels (kvtier/kernels/fused_moe.py) against FusedExperts' math,
and the routed variant (fused_moe_routed) against moe_route + fused_moe_small, bitwise.

On CPU the kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET=1), on small
shapes with small tiles so that every loop runs several steps and every tile has a masked tail
(H = 40 and I = 24 are not powers of two); the interpreter does not compile them, so a
subprocess compiles them for sm_90 (no GPU needed) to check what only the compiled code shows
(the softmax sum's addition order, the reduction layouts, the PDL load order). The CUDA tests
use Qwen3-30B-A3B's layer shapes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from kvtier.kernels import fused, fused_moe
from kvtier.kernels.fused_moe import fused_moe_ref, fused_moe_routed, fused_moe_small
from kvtier.models.layers import FusedExperts

pytestmark = pytest.mark.skipif(fused_moe.triton is None, reason="needs Triton")

NUM_EXPERTS = 8
# The kernels on the GPU where there is one, else in the interpreter.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Small tiles: 2-4 steps along H and I, partial last tiles.
SMALL_TILES = {"block_n": 8, "block_k": 16, "block_h": 16, "block_i": 8}


def _inputs(t, k, hidden, inter, dtype, seed, device="cpu", num_experts=NUM_EXPERTS, scale=0.2):
    # Drawn on the target device: a full Qwen3-30B layer's weights are 1.2 GB in bf16.
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape, s=1.0):
        return (torch.randn(shape, generator=gen, device=device) * s).to(dtype)

    x = randn(t, hidden)
    w13 = randn(num_experts, 2 * inter, hidden, s=scale)
    w2 = randn(num_experts, hidden, inter, s=scale)
    # Distinct experts per token (what top-k gives); tokens share experts across the batch.
    ids = torch.stack(
        [torch.randperm(num_experts, generator=gen, device=device)[:k] for _ in range(t)]
    )
    weights = torch.softmax(torch.randn(t, k, generator=gen, device=device), dim=-1).to(dtype)
    return x, w13, w2, ids, weights


def _bf16_ulp(v: torch.Tensor) -> torch.Tensor:
    """bf16 spacing at |v| (8 significant bits), floored at the smallest normal's."""
    a = v.float().abs().clamp_min(2.0**-126)
    return torch.exp2(torch.floor(torch.log2(a)) - 7)


def test_reference_is_fused_experts_loop_path():
    x, w13, w2, ids, weights = _inputs(5, 3, 40, 24, torch.bfloat16, seed=0)
    experts = FusedExperts(NUM_EXPERTS, 40, 24).to(torch.bfloat16)
    with torch.no_grad():
        experts.w13.copy_(w13)
        experts.w2.copy_(w2)
        experts.use_grouped_mm = False
        expected = experts(x, ids, weights)
    assert torch.equal(fused_moe_ref(x, w13, w2, ids, weights), expected)


@pytest.mark.parametrize(
    ("t", "k", "hidden", "inter"), [(1, 2, 32, 16), (3, 4, 40, 24), (5, 3, 48, 16)]
)
def test_float32_matches_reference(t, k, hidden, inter):
    x, w13, w2, ids, weights = _inputs(t, k, hidden, inter, torch.float32, seed=t, device=DEVICE)
    out = fused_moe_small(x, w13, w2, ids, weights, **SMALL_TILES)
    ref = fused_moe_ref(x, w13, w2, ids, weights)
    assert out.shape == (t, hidden) and out.dtype == torch.float32
    # Only the float32 summation order differs from the reference.
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("t", "k", "hidden", "inter"), [(1, 4, 40, 24), (5, 2, 32, 16)])
def test_bf16_matches_reference_within_ulps(t, k, hidden, inter):
    # The kernels round where the reference rounds (each GEMM's output, F.silu, the product,
    # the combine once), and bf16 x bf16 products are exact in float32, so only the order of
    # the float32 sums inside the dot products differs. That changes a rounded value only next
    # to a rounding boundary, by 1 ulp; such a change in h (or SiLU's rounded output, which is
    # multiplied and rounded again) can reach the output as 1-2 ulps. In practice the CPU
    # results are bitwise equal (60 seeds checked while writing this); the bound allows 2.
    x, w13, w2, ids, weights = _inputs(
        t, k, hidden, inter, torch.bfloat16, seed=10 + t, device=DEVICE
    )
    out = fused_moe_small(x, w13, w2, ids, weights, **SMALL_TILES)
    ref = fused_moe_ref(x, w13, w2, ids, weights)
    assert out.dtype == torch.bfloat16
    err_ulps = (out.float() - ref.float()).abs() / _bf16_ulp(ref)
    assert err_ulps.max().item() <= 2.0
    assert (err_ulps > 0).float().mean().item() <= 0.05


def test_default_tiles_and_repeated_experts():
    # Default (capped) tiles: one step per loop; tokens all routed to the same experts, and one
    # token routed to one expert twice: every pair still reads its own weights.
    x, w13, w2, _, weights = _inputs(3, 3, 40, 24, torch.float32, seed=7, device=DEVICE)
    ids = torch.tensor([[5, 1, 5], [1, 5, 0], [7, 7, 7]], device=DEVICE)
    out = fused_moe_small(x, w13, w2, ids, weights)
    torch.testing.assert_close(out, fused_moe_ref(x, w13, w2, ids, weights), rtol=1e-5, atol=1e-5)


def test_default_tiles():
    # One-warp programs (what the routed kernels need, so fused_moe_small matches them).
    assert fused_moe.default_tiles(1) == {
        "block_n": 4, "block_k": 256, "block_h": 2, "block_i": 128, "num_warps": 1
    }  # fmt: skip
    assert fused_moe.default_tiles(4) == fused_moe.default_tiles(1)
    assert fused_moe.default_tiles(16) == {
        "block_n": 8, "block_k": 128, "block_h": 2, "block_i": 128, "num_warps": 1
    }  # fmt: skip
    assert fused_moe.default_tiles(1)["num_warps"] == fused_moe.ROUTED_WARPS


def test_fused_experts_path_unchanged_with_switch_off(monkeypatch):
    # The switch off (KVTIER_FUSED_MOE=0): forward never calls the kernels, whatever the inputs.
    monkeypatch.setattr(fused_moe, "ENABLED", False)
    monkeypatch.setattr(fused_moe, "fused_moe_small", _fail)
    x, w13, w2, ids, weights = _inputs(3, 2, 32, 16, torch.bfloat16, seed=3)
    experts = FusedExperts(NUM_EXPERTS, 32, 16).to(torch.bfloat16)
    with torch.no_grad():
        experts.w13.copy_(w13)
        experts.w2.copy_(w2)
        out = experts(x, ids, weights)
    assert torch.equal(out, fused_moe_ref(x, w13, w2, ids, weights))
    # Switched on, CPU tensors still take the torch path (the fused path is CUDA bf16 only).
    monkeypatch.setattr(fused_moe, "ENABLED", True)
    with torch.no_grad():
        assert torch.equal(experts(x, ids, weights), out)


def _fail(*args, **kwargs):
    raise AssertionError("fused_moe_small called")


def test_use_fused_conditions(monkeypatch):
    monkeypatch.setattr(fused_moe, "ENABLED", True)
    cpu = torch.zeros(1, 8, dtype=torch.bfloat16)
    assert not fused_moe.use_fused(cpu, 8)
    meta = torch.empty(1, 8, dtype=torch.bfloat16, device="meta")
    assert not fused_moe.use_fused(meta, 8)
    monkeypatch.setattr(fused_moe, "ENABLED", False)
    assert not fused_moe.use_fused(cpu, 8)


# ---------------------------------------------------------------------------- routed
def _routed_inputs(t, num_experts, hidden, inter, seed, dtype=torch.bfloat16, logits_dtype=None):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)

    def randn(*shape, s=1.0, dt=dtype):
        return (torch.randn(shape, generator=gen, device=DEVICE) * s).to(dt)

    x = randn(t, hidden)
    w13 = randn(num_experts, 2 * inter, hidden, s=0.2)
    w2 = randn(num_experts, hidden, inter, s=0.2)
    logits = randn(t, num_experts, s=2.0, dt=logits_dtype or dtype)
    return x, w13, w2, logits


def _route_then_small(x, w13, w2, logits, k, renormalize, **tiles):
    """The two-step path fused_moe_routed replaces: moe_route's kernel, then the experts."""
    weights, ids = fused.moe_route(logits, k, renormalize, out_dtype=x.dtype, use_triton=True)
    return fused_moe_small(x, w13, w2, ids, weights, **tiles)


@pytest.mark.parametrize(
    ("t", "k", "num_experts", "hidden", "inter", "renormalize", "dtype", "logits_dtype", "tiles"),
    [
        (1, 2, 8, 64, 48, True, torch.bfloat16, None, SMALL_TILES),
        (3, 4, 12, 40, 24, False, torch.bfloat16, None, SMALL_TILES),
        (5, 3, 16, 64, 48, True, torch.bfloat16, None, SMALL_TILES),
        (4, 2, 10, 40, 24, True, torch.bfloat16, torch.float32, SMALL_TILES),
        (2, 3, 8, 32, 16, False, torch.float32, None, SMALL_TILES),
        (2, 4, 16, 64, 48, False, torch.bfloat16, None, {}),  # default tiles: one step a loop
    ],
)
def test_routed_matches_route_then_small(
    t, k, num_experts, hidden, inter, renormalize, dtype, logits_dtype, tiles
):
    # Non-powers of two: E = 12 / 10 (padded softmax), k = 3 (padded slots), H = 40, I = 24.
    x, w13, w2, logits = _routed_inputs(t, num_experts, hidden, inter, seed=t + k, dtype=dtype,
                                        logits_dtype=logits_dtype)  # fmt: skip
    out = fused_moe_routed(x, w13, w2, logits, k, renormalize, **tiles)
    assert out.shape == (t, hidden) and out.dtype == dtype
    assert torch.equal(out, _route_then_small(x, w13, w2, logits, k, renormalize, **tiles))


@pytest.mark.parametrize("renormalize", [True, False])
def test_routed_ties_take_the_lowest_id_first(renormalize):
    x, w13, w2, _ = _routed_inputs(3, 8, 32, 16, seed=5)
    # Exactly tied logits (so tied probabilities): a four-way tie across the top-3 boundary,
    # a row all tied, a tied pair on top and then a three-way tie for the last slot.
    logits = torch.tensor(
        [[0, 1, 1, 1, 1, 0, 0, 0], [0] * 8, [2, -1, 5, 5, -1, 2, 2, 0]],
        dtype=torch.bfloat16, device=DEVICE,
    )  # fmt: skip
    lowest_first = torch.tensor([[1, 2, 3], [0, 1, 2], [2, 3, 0]], device=DEVICE)
    weights, ids = fused.moe_route(logits, 3, renormalize, out_dtype=x.dtype, use_triton=True)
    assert torch.equal(ids, lowest_first)
    out = fused_moe_routed(x, w13, w2, logits, 3, renormalize, **SMALL_TILES)
    assert torch.equal(out, fused_moe_small(x, w13, w2, lowest_first, weights, **SMALL_TILES))


def test_prefetch_variants_are_bitwise_equal():
    # The prefetching loops add the same products in the same order as the plain ones.
    x, w13, w2, logits = _routed_inputs(2, 12, 40, 24, seed=9)
    plain = fused_moe_routed(x, w13, w2, logits, 3, True, prefetch_k=False, prefetch_i=False,
                             **SMALL_TILES)  # fmt: skip
    for prefetch_k, prefetch_i in ((True, True), (True, False), (False, True)):
        out = fused_moe_routed(x, w13, w2, logits, 3, True, prefetch_k=prefetch_k,
                               prefetch_i=prefetch_i, **SMALL_TILES)  # fmt: skip
        assert torch.equal(out, plain)
    # fused_moe_small's kernels prefetch (PREFETCH): the same values again.
    assert torch.equal(_route_then_small(x, w13, w2, logits, 3, True, **SMALL_TILES), plain)


def test_routed_zero_tokens():
    x, w13, w2, logits = _routed_inputs(0, 8, 32, 16, seed=1)
    assert fused_moe_routed(x, w13, w2, logits, 2, True).shape == (0, 32)


def test_bad_shapes_raise_naming_the_argument():
    x, w13, w2, logits = _routed_inputs(2, 8, 32, 16, seed=2)
    ids = torch.tensor([[0, 1], [2, 3]], device=DEVICE)
    weights = torch.full((2, 2), 0.5, dtype=x.dtype, device=DEVICE)
    routed = [
        ((x[0], w13, w2, logits, 2), "x"),
        ((x, w13[:, :, :16], w2, logits, 2), "w13"),
        ((x, w13[:, :31], w2, logits, 2), "w13"),
        ((x, w13, w2[:, :, :8], logits, 2), "w2"),
        ((x, w13, w2[:4], logits, 2), "w2"),
        ((x, w13, w2, logits[:1], 2), "router_logits"),
        ((x, w13, w2, logits[:, :4], 2), "router_logits"),
        ((x, w13, w2, logits.to(torch.int32), 2), "router_logits"),
        ((x, w13, w2, logits, 0), "top_k"),
        ((x, w13, w2, logits, 9), "top_k"),
    ]
    for args, name in routed:
        with pytest.raises(ValueError, match=rf"^fused_moe_routed: {name} "):
            fused_moe_routed(*args, True)
    # More experts than moe_route runs in one warp.
    many = torch.zeros(513, 2, 4, device=DEVICE), torch.zeros(513, 4, 1, device=DEVICE)
    with pytest.raises(ValueError, match=r"^fused_moe_routed: router_logits "):
        fused_moe_routed(torch.zeros(1, 4, device=DEVICE), *many,
                         torch.zeros(1, 513, device=DEVICE), 2, True)  # fmt: skip
    small = [
        ((x, w13[:, :, :16], w2, ids, weights), "w13"),
        ((x, w13, w2, ids[:1], weights), "topk_ids"),
        ((x, w13, w2, ids, weights[:, :1]), "topk_weights"),
    ]
    for args, name in small:
        with pytest.raises(ValueError, match=rf"^fused_moe_small: {name} "):
            fused_moe_small(*args)


def test_use_routed_conditions(monkeypatch):
    monkeypatch.setattr(fused_moe, "ROUTE_ENABLED", True)
    x = torch.empty(2, 8, dtype=torch.bfloat16, device="meta")
    logits = torch.empty(2, 16, dtype=torch.bfloat16, device="meta")
    monkeypatch.setattr(fused_moe, "ENABLED", True)
    assert not fused_moe.use_routed(x, logits, 4)  # not CUDA: use_fused says no
    monkeypatch.setattr(fused_moe, "use_fused", lambda x, pairs: 0 < pairs <= fused_moe.MAX_PAIRS)
    assert fused_moe.use_routed(x, logits, 4)
    assert not fused_moe.use_routed(x, logits, 17)  # top_k > E
    assert not fused_moe.use_routed(x, logits[:1], 4)  # T differs
    assert not fused_moe.use_routed(x, logits.to(torch.int32), 4)
    assert not fused_moe.use_routed(x, torch.empty(2, 513, device="meta"), 4)
    assert not fused_moe.use_routed(torch.empty(100, 8, device="meta"), logits, 4)  # > MAX_PAIRS
    monkeypatch.setattr(fused_moe, "ROUTE_ENABLED", False)
    assert not fused_moe.use_routed(x, logits, 4)


def test_route_switch_is_read_at_import():
    on = os.environ.get("KVTIER_FUSED_ROUTE", "1") != "0"
    assert fused_moe.ROUTE_ENABLED is on
    code = "from kvtier.kernels import fused_moe; print(fused_moe.ROUTE_ENABLED)"
    env = dict(os.environ, KVTIER_FUSED_ROUTE="0")
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True,
                          text=True)  # fmt: skip
    assert proc.stdout.strip() == "False", proc.stderr[-2000:]


# ---------------------------------------------------------------------------- compiled code
_COMPILE_CHECK = textwrap.dedent(
    """
    import hashlib, re, triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from kvtier.kernels import fused as FK, fused_moe as M
    assert not FK.INTERPRETED
    H, I = 2048, 768

    def compile_(fn, args, constexprs, num_warps):
        # As a launch specialises: pointers and ints divisible by 16 get that divisibility,
        # ints equal to 1 become constants.
        sig, attrs, consts = {}, {}, dict(constexprs)
        for name, v in args.items():
            pos = (fn.arg_names.index(name),)
            if isinstance(v, str):
                sig[name] = v
                attrs[pos] = [["tt.divisibility", 16]]
            elif v == 1:
                sig[name], consts[name] = "constexpr", 1
            else:
                sig[name] = "i32"
                if v % 16 == 0:
                    attrs[pos] = [["tt.divisibility", 16]]
        sig.update({name: "constexpr" for name in constexprs})
        src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
        options = dict(FK._EXACT, num_warps=num_warps)
        return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options).asm

    def split(operands):
        out, depth, cur = [], 0, ""
        for ch in operands:
            depth += ch in "{[" or -(ch in "}]")
            if ch == "," and depth == 0:
                out, cur = out + [cur.strip()], ""
            else:
                cur += ch
        return out + [cur.strip()] if cur.strip() else out

    def softmax_sum(ptx, opaque):
        # A structural hash of the divisor of the first div.rn.f32 (p = ex / sum): every PTX
        # value as a hash of its opcode and operands' hashes, so two kernels agree iff the sum
        # is the same tree of the same operations on the same loaded logits, whatever the
        # register names or the instruction order. opaque: addresses and masks are left out
        # (kernels that find the logits row differently).
        env = {}
        h = lambda *parts: hashlib.sha1("|".join(parts).encode()).hexdigest()[:16]

        def val(tok):
            if tok.startswith("{"):
                return h("vec", *[val(t.strip()) for t in tok[1:-1].split(",")])
            if tok.startswith("["):
                m = re.match(r"\\[\\s*(%\\w+)?\\s*(?:\\+\\s*(-?\\d+))?", tok)
                if not m.group(1):
                    return h("param")
                return h("addr", m.group(2) or "0", "" if opaque else val(m.group(1)))
            if tok.startswith("%"):
                return env.get(tok, h("sreg", tok))
            return h("imm", tok)

        for raw in ptx.splitlines():
            line = raw.split("//")[0].strip().rstrip(";")
            if not line or line[0] in ".${}" or line.endswith(":"):
                continue
            pred = None
            if line.startswith("@"):
                pred, line = line.split(None, 1)
            op, _, rest = line.partition(" ")
            ops = split(rest)
            if op == "div.rn.f32":
                return val(ops[2])
            if not ops or op.startswith(("st.", "bar", "ret", "bra", "griddepcontrol")):
                continue
            if op.startswith("ld.param"):
                node = h("param")
            elif opaque and op.startswith("selp"):
                node = h(op, val(ops[1]), val(ops[2]))
            else:
                node = h(op, *map(val, ops[1:]))
            if pred:
                node = h("pred", "" if opaque else val(pred.lstrip("@!")), node)
            dests = [d.strip() for d in ops[0].strip("{}").split(",")]
            for i, d in enumerate(dests):
                v = h("elem", str(i), node) if len(dests) > 1 else node
                if pred:  # a masked load keeps the register's previous value (the fill)
                    v = h("sel", v, "" if opaque else env.get(d, ""))
                env[d] = v
        raise AssertionError("no softmax division")

    def reduce_layouts(ttgir):
        # Each tt.reduce's axis and operand type with its layout spelled out, but for 1-D
        # operands (the routing's reductions over the experts and over the slots).
        defs = dict(re.findall(r"^(#\\w+) = (.*)$", ttgir, re.M))
        found = re.findall(r'"tt.reduce".*?<\\{axis = (\\d+).*?\\}\\) : \\(([^)]*)\\)', ttgir, re.S)
        return [(axis, re.sub(r"#\\w+", lambda m: defs.get(m.group(0), ""), ty))
                for axis, ty in found if re.search(r"tensor<\\d+x\\d+", ty)]

    def route(e, dtype, k, num_warps):
        args = dict(LOGITS="*" + dtype, W_OUT="*bf16", ID_OUT="*i64", stride_l=e, stride_w=k,
                    stride_id=k, num_experts=e)
        return compile_(FK._moe_route_kernel, args,
                        dict(TOP_K=k, RENORMALIZE=True, BLOCK_E=triton.next_power_of_2(e),
                             BLOCK_K=triton.next_power_of_2(k), INTERPRET=False, PDL=True),
                        num_warps)

    def gate_up(routed, e, dtype, k, tiles, prefetch=True, num_warps=1):
        args = dict(X="*bf16", W_GATE="*bf16", W_UP="*bf16", HOUT="*bf16", stride_xt=H,
                    stride_we=2 * I * H, stride_wn=H, stride_wk=1, stride_ht=I)
        c = dict(HIDDEN=H, INTER=I, TOPK=k, BLOCK_N=tiles["block_n"],
                 BLOCK_K=tiles["block_k"], INTERPRET=False, PDL=True)
        if not routed:
            return compile_(M._gate_up_kernel, dict(args, IDS="*i64"), c, num_warps)
        args.update(LOGITS="*" + dtype, stride_lt=e, num_experts=e)
        c.update(BLOCK_E=triton.next_power_of_2(e), BLOCK_S=triton.next_power_of_2(k),
                 PREFETCH_K=prefetch)
        return compile_(M._gate_up_routed_kernel, args, c, num_warps)

    def down(routed, e, dtype, k, tiles, prefetch=True):
        args = dict(HIN="*bf16", W2="*bf16", OUT="*bf16", stride_ht=I, stride_we=H * I,
                    stride_wn=I, stride_wk=1, stride_ot=H)
        c = dict(HIDDEN=H, INTER=I, TOPK=k, BLOCK_H=tiles["block_h"],
                 BLOCK_I=tiles["block_i"], INTERPRET=False, PDL=True)
        if not routed:
            return compile_(M._down_kernel, dict(args, IDS="*i64", TW="*bf16"), c, 1)
        args.update(LOGITS="*" + dtype, stride_lt=e, num_experts=e)
        c.update(RENORMALIZE=True, BLOCK_E=triton.next_power_of_2(e),
                 BLOCK_S=triton.next_power_of_2(k), PREFETCH_I=prefetch)
        return compile_(M._down_routed_kernel, args, c, 1)

    tiles = M.default_tiles(1)
    assert tiles["num_warps"] == M.ROUTED_WARPS == 1
    # 1. The routed kernels add the softmax sum exactly as moe_route's kernel does: E = 128
    # bf16 (E divisible by 16: four logits a thread, one vector load), E = 60 float32 (one a
    # thread). The down kernel finds the row as moe_route does (ctaid.x), so its addresses and
    # masks are compared too.
    for e, dtype, k in ((128, "bf16", 8), (60, "fp32", 4)):
        ref = route(e, dtype, k, 1)["ptx"]
        d = down(True, e, dtype, k, tiles)["ptx"]
        g = gate_up(True, e, dtype, k, tiles)["ptx"]
        assert softmax_sum(d, False) == softmax_sum(ref, False), (e, dtype)
        assert softmax_sum(g, True) == softmax_sum(ref, True), (e, dtype)
    # ... and would not in four-warp programs (the check sees the difference).
    g4 = gate_up(True, 128, "bf16", 8, tiles, num_warps=4)["ptx"]
    assert softmax_sum(g4, True) != softmax_sum(route(128, "bf16", 8, 1)["ptx"], True)

    # 2. The expert sums reduce in the same layouts with ids given or routed, with or without
    # prefetch: the same trees, so the same results bitwise.
    gu = [gate_up(False, 128, "bf16", 8, tiles), gate_up(True, 128, "bf16", 8, tiles),
          gate_up(True, 128, "bf16", 8, tiles, prefetch=False)]
    dn = [down(False, 128, "bf16", 8, tiles), down(True, 128, "bf16", 8, tiles),
          down(True, 128, "bf16", 8, tiles, prefetch=False)]
    for kernels in (gu, dn):
        layouts = [reduce_layouts(asm["ttgir"]) for asm in kernels]
        assert layouts[0] and layouts[0] == layouts[1] == layouts[2], layouts

    # 3. PDL: the gate/up kernels read nothing before their wait (ids or logits are the previous
    # kernel's output); the down kernels issue their weight loads (and the routed one its
    # logits load) before it.
    for asm in gu:
        assert asm["ptx"].index("griddepcontrol.wait") < asm["ptx"].index("ld.global")
    for asm in dn:
        wait = asm["ptx"].index("griddepcontrol.wait")
        assert asm["ptx"][:wait].count("ld.global") >= 2
    print("ok")
    """
)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on CUDA the kernels themselves run")
def test_compiled_kernels_route_and_reduce_alike_sm90():
    # The interpreter never compiles the kernels; compile them for an H100/H200 (sm_90) in a
    # process without TRITON_INTERPRET, which needs no GPU, only ptxas (shipped with Triton).
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", _COMPILE_CHECK], env=env, cwd=root,
                          capture_output=True, text=True)  # fmt: skip
    if proc.returncode != 0 and "ptxas" in proc.stderr and "not found" in proc.stderr:
        pytest.skip("no ptxas")
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


# ---------------------------------------------------------------------------- CUDA
QWEN3_30B = {"num_experts": 128, "k": 8, "hidden": 2048, "inter": 768}


def _qwen3_layer(t, seed):
    s = QWEN3_30B
    x, w13, w2, ids, weights = _inputs(
        t, s["k"], s["hidden"], s["inter"], torch.bfloat16, seed, "cuda", s["num_experts"], 0.02
    )
    experts = FusedExperts(s["num_experts"], s["hidden"], s["inter"]).to("cuda", torch.bfloat16)
    with torch.no_grad():
        experts.w13.copy_(w13)
        experts.w2.copy_(w2)
    return experts, x, ids, weights


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("t", [1, 4, 16])
def test_cuda_matches_grouped_path_on_qwen3_30b_layer(t):
    experts, x, ids, weights = _qwen3_layer(t, seed=t)
    with torch.no_grad():
        experts.use_grouped_mm = True
        grouped = experts(x, ids, weights).float()
        out = fused_moe_small(x, experts.w13, experts.w2, ids, weights).float()
        exact = fused_moe_ref(
            x.float(), experts.w13.float(), experts.w2.float(), ids, weights.float()
        )
    # Both are bf16 renderings of the same float32 math with the same roundings; the fused
    # path must be as close to the float32 result as the grouped one (up to the odd ulp).
    scale = exact.abs().max().item()
    err_fused = (out - exact).abs().max().item()
    err_grouped = (grouped - exact).abs().max().item()
    assert err_fused <= 1.25 * err_grouped + 2.0**-8 * scale
    err_ulps = (out - grouped).abs() / _bf16_ulp(grouped)
    assert (err_ulps > 2).float().mean().item() < 0.01
    assert torch.equal(fused_moe_small(x, experts.w13, experts.w2, ids, weights).float(), out)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_capture(monkeypatch):
    experts, x, ids, weights = _qwen3_layer(4, seed=0)
    s = QWEN3_30B
    x2, _, _, ids2, weights2 = _inputs(
        4, s["k"], s["hidden"], 1, torch.bfloat16, 1, "cuda", s["num_experts"]
    )
    monkeypatch.setattr(fused_moe, "ENABLED", True)
    with torch.no_grad():
        expected = fused_moe_small(x2, experts.w13, experts.w2, ids2, weights2)
        experts(x, ids, weights)  # compiles the kernels outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = experts(x, ids, weights)  # FusedExperts.forward -> the fused kernels
        x.copy_(x2)
        ids.copy_(ids2)
        weights.copy_(weights2)
        graph.replay()
        torch.cuda.synchronize()
    assert torch.equal(captured, expected)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("t", [1, 4, 16])
def test_cuda_routed_matches_route_then_small_on_qwen3_30b_layer(t):
    experts, x, _, _ = _qwen3_layer(t, seed=t)
    gen = torch.Generator(device="cuda").manual_seed(100 + t)
    logits = torch.randn(t, QWEN3_30B["num_experts"], generator=gen, device="cuda")
    logits = logits.to(torch.bfloat16)
    k = QWEN3_30B["k"]
    with torch.no_grad():
        for renormalize in (True, False):
            expected = _route_then_small(x, experts.w13, experts.w2, logits, k, renormalize)
            for prefetch in (True, False):
                out = fused_moe_routed(x, experts.w13, experts.w2, logits, k, renormalize,
                                       prefetch_k=prefetch, prefetch_i=prefetch)  # fmt: skip
                assert torch.equal(out, expected), (renormalize, prefetch)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_routed_graph_capture():
    experts, x, _, _ = _qwen3_layer(4, seed=0)
    gen = torch.Generator(device="cuda").manual_seed(1)
    e, k = QWEN3_30B["num_experts"], QWEN3_30B["k"]
    logits = torch.randn(4, e, generator=gen, device="cuda").to(torch.bfloat16)

    def run():
        return fused_moe_routed(x, experts.w13, experts.w2, logits, k, True)

    with torch.no_grad():
        run()  # compiles the kernels outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = run()
        x.copy_(torch.randn(x.shape, generator=gen, device="cuda").to(x.dtype))
        logits.copy_(torch.randn(logits.shape, generator=gen, device="cuda").to(logits.dtype))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(captured, run())
