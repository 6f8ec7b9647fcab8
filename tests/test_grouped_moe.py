"""The expert-major MoE kernels (kvtier/kernels/grouped_moe.py) against FusedExperts' math.

On CPU the kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET=1) on small
shapes whose sizes are not multiples of the tiles (H = 40, I = 24), with experts chosen by more
pairs than one row block holds (the chunk loop) and experts chosen by none. The CUDA test uses
Qwen3-30B-A3B's layer shapes at decode batch sizes.
"""

from __future__ import annotations

import pytest
import torch
from moe_utils import NUM_EXPERTS, moe_inputs

from kvtier.kernels import fused_moe, grouped_moe
from kvtier.kernels.fused_moe import fused_moe_ref
from kvtier.kernels.grouped_moe import grouped_moe as run_grouped
from kvtier.models.layers import FusedExperts

pytestmark = pytest.mark.skipif(grouped_moe.triton is None, reason="needs Triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Small tiles: several steps along H and I with partial last tiles.
SMALL = {"block_m": 16, "block_n": 16, "block_k": 16, "block_h": 16, "block_i": 16}


IDS = [[5, 1, 5], [1, 5, 0], [7, 7, 7], [2, 3, 4]]


def _slot_lists(experts, lists, counts):
    """{expert: its pairs} over the slots with pairs."""
    return {
        int(e): lists[j, :n].tolist()
        for j, (e, n) in enumerate(zip(experts.tolist(), counts.tolist(), strict=True))
        if n
    }


def test_align_pairs_one_slot_an_expert():
    ids = torch.tensor(IDS, device=DEVICE)
    experts, lists, counts = grouped_moe.align_pairs(ids, 9)
    assert lists.shape == (9, 16) and lists.dtype == torch.int32
    assert experts.tolist() == list(range(9))
    assert counts.tolist() == [1, 2, 1, 1, 1, 3, 0, 3, 0]
    want = {0: [5], 1: [1, 3], 2: [9], 3: [10], 4: [11], 5: [0, 2, 4], 7: [6, 7, 8]}
    assert _slot_lists(experts, lists, counts) == want


@pytest.mark.parametrize(
    ("t", "k", "num_experts"),
    # 1 pair; 2 experts x 20 pairs (chunks of 16: a full one and a partial one); 24 pairs over
    # 8 experts; experts never chosen (32 experts, 6 pairs).
    [(1, 1, 8), (20, 2, 2), (8, 3, 8), (3, 2, 32)],
)
def test_float32_matches_reference(t, k, num_experts):
    x, w13, w2, ids, weights = moe_inputs(
        t, k, 40, 24, torch.float32, seed=t * 7 + k, device=DEVICE, num_experts=num_experts
    )
    out = run_grouped(x, w13, w2, ids, weights, **SMALL)
    assert out.shape == (t, 40) and out.dtype == torch.float32
    torch.testing.assert_close(out, fused_moe_ref(x, w13, w2, ids, weights), rtol=1e-5, atol=1e-5)


def test_bf16_within_an_ulp_or_two_of_reference():
    # The GEMMs sum in another order than the reference's: equal up to a rounding of each
    # rounded intermediate (h, y), so within a few bf16 ulps of the output's scale.
    x, w13, w2, ids, weights = moe_inputs(12, 4, 40, 24, torch.bfloat16, seed=3, device=DEVICE)
    out = run_grouped(x, w13, w2, ids, weights, **SMALL)
    ref = fused_moe_ref(x, w13, w2, ids, weights)
    scale = ref.float().abs().max().item()
    assert (out.float() - ref.float()).abs().max().item() <= scale * 2.0**-6
    assert (out == ref).float().mean().item() > 0.8


def test_default_tiles_by_pairs_per_expert():
    # Twice the mean pairs an expert, a power of two in [16, 64] (E = 128, k = 8); 32 rows and
    # more with 8 warps.
    tiles = [grouped_moe.default_tiles(t * 8, 128) for t in (9, 64, 128, 256, 512, 1024)]
    assert [(x["block_m"], x["num_warps"]) for x in tiles] == [
        (16, 4), (16, 4), (16, 4), (32, 8), (64, 8), (64, 8)
    ]  # fmt: skip
    assert grouped_moe.default_tiles(80, 8)["block_m"] == 32


def test_default_tiles_and_repeated_expert_in_a_token():
    # Default tiles (capped to the shape, padded to tl.dot's 16); one token routed to one
    # expert twice (two pairs of the same expert and token) and a token with all three the same.
    x, w13, w2, _, weights = moe_inputs(4, 3, 40, 24, torch.float32, seed=5, device=DEVICE)
    ids = torch.tensor([[5, 1, 5], [1, 5, 0], [7, 7, 7], [2, 3, 4]], device=DEVICE)
    out = run_grouped(x, w13, w2, ids, weights)
    torch.testing.assert_close(out, fused_moe_ref(x, w13, w2, ids, weights), rtol=1e-5, atol=1e-5)


def test_chunks_of_32_pairs():
    # block_m 32 (the larger row block), one expert chosen by 40 pairs: two chunks.
    x, w13, w2, _, weights = moe_inputs(40, 1, 40, 24, torch.float32, seed=6, device=DEVICE)
    ids = torch.full((40, 1), 3, device=DEVICE)
    out = run_grouped(x, w13, w2, ids, weights, **{**SMALL, "block_m": 32})
    torch.testing.assert_close(out, fused_moe_ref(x, w13, w2, ids, weights), rtol=1e-5, atol=1e-5)


def test_empty_batch():
    _, w13, w2, _, _ = moe_inputs(1, 2, 40, 24, torch.float32, seed=1, device=DEVICE)
    x = torch.empty(0, 40, device=DEVICE)
    ids = torch.empty(0, 2, dtype=torch.int64, device=DEVICE)
    out = run_grouped(x, w13, w2, ids, torch.empty(0, 2, device=DEVICE))
    assert out.shape == (0, 40) and out.dtype == torch.float32


def test_bad_arguments_raise_naming_the_argument():
    x, w13, w2, ids, weights = moe_inputs(2, 2, 32, 16, torch.bfloat16, seed=2, device=DEVICE)
    with pytest.raises(ValueError, match=r"^grouped_moe: w2 must be \[E, H, I\]"):
        run_grouped(x, w13, w2[:4], ids, weights)
    with pytest.raises(ValueError, match=r"^grouped_moe: topk_weights must be \[T, k\]"):
        run_grouped(x, w13, w2, ids, weights[:, :1])
    with pytest.raises(ValueError, match=r"^grouped_moe: block_m must be >= 16"):
        run_grouped(x, w13, w2, ids, weights, block_m=8)
    with pytest.raises(ValueError, match=r"^grouped_moe: block_n must be a positive power of two"):
        run_grouped(x, w13, w2, ids, weights, block_n=48)


def test_fused_experts_dispatch(monkeypatch):
    # FusedExperts takes the per-pair kernels up to fused_moe.MAX_PAIRS pairs, then these up to
    # grouped_moe.MAX_PAIRS, then the grouped GEMMs; use_grouped_mm set pins the torch path.
    # The CUDA-only conditions are forced so that the interpreter runs the kernels.
    calls: list[str] = []

    def spy(name, fn):
        def wrapped(*args, **kwargs):
            calls.append(name)
            return fn(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(fused_moe, "use_fused", lambda x, n: n <= 4)
    monkeypatch.setattr(grouped_moe, "use_grouped", lambda x, n: 4 < n <= 8)
    monkeypatch.setattr(fused_moe, "fused_moe_small", spy("small", fused_moe.fused_moe_small))
    monkeypatch.setattr(grouped_moe, "grouped_moe", spy("grouped", grouped_moe.grouped_moe))
    experts = FusedExperts(NUM_EXPERTS, 32, 16).to(DEVICE)
    with torch.no_grad():
        for p in (experts.w13, experts.w2):
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)) * 0.2)
    for t, want in ((2, "small"), (4, "grouped"), (5, None)):
        x, _, _, ids, weights = moe_inputs(t, 2, 32, 16, torch.float32, seed=t, device=DEVICE)
        calls.clear()
        out = experts(x, ids, weights)
        assert calls == ([want] if want else [])
        ref = fused_moe_ref(x, experts.w13, experts.w2, ids, weights)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    experts.use_grouped_mm = False
    calls.clear()
    x, _, _, ids, weights = moe_inputs(4, 2, 32, 16, torch.float32, seed=9, device=DEVICE)
    experts(x, ids, weights)
    assert calls == []


def test_use_grouped_limits(monkeypatch):
    x = torch.zeros(1, 8, dtype=torch.bfloat16)
    assert not grouped_moe.use_grouped(x, 16)  # CPU tensors: never
    if torch.cuda.is_available():
        xc = x.cuda()
        assert grouped_moe.use_grouped(xc, grouped_moe.MAX_PAIRS) == grouped_moe.ENABLED
        assert not grouped_moe.use_grouped(xc, grouped_moe.MAX_PAIRS + 1)
        assert not grouped_moe.use_grouped(xc.float(), 16)
        monkeypatch.setattr(grouped_moe, "ENABLED", False)
        assert not grouped_moe.use_grouped(xc, 16)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("t", [17, 32, 128])
def test_qwen3_moe_layer_cuda(t):
    # Qwen3-30B-A3B's layer (E = 128, k = 8, H = 2048, I = 768) at decode batch sizes: against
    # the torch grouped-GEMM path, the reference's bf16 rounding points, a few ulps apart.
    x, w13, w2, ids, weights = moe_inputs(
        t, 8, 2048, 768, torch.bfloat16, seed=t, device="cuda", num_experts=128, scale=0.02
    )
    out = run_grouped(x, w13, w2, ids, weights)
    ref = fused_moe_ref(x, w13, w2, ids, weights)
    scale = ref.float().abs().max().item()
    assert (out.float() - ref.float()).abs().max().item() <= scale * 2.0**-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_replay_matches_eager_on_new_routing():
    # Captured once, replayed after the ids change in place: the programs read the routing on
    # the device, so the replay follows it (the engine's decode graphs rely on this).
    x, w13, w2, ids, weights = moe_inputs(
        24, 8, 256, 128, torch.bfloat16, seed=40, device="cuda", num_experts=32
    )
    static = [x.clone(), ids.clone(), weights.clone()]
    run_grouped(static[0], w13, w2, static[1], static[2])  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run_grouped(static[0], w13, w2, static[1], static[2])
    for seed in (41, 42):
        x2, _, _, ids2, weights2 = moe_inputs(
            24, 8, 256, 128, torch.bfloat16, seed=seed, device="cuda", num_experts=32
        )
        for dst, src in zip(static, (x2, ids2, weights2), strict=True):
            dst.copy_(src)
        graph.replay()
        assert torch.equal(out, run_grouped(x2, w13, w2, ids2, weights2))
