"""Decode attention with the q/k prologue (``attention.decode_attention_qk``): stage 1 norms and
rotates q from the qkv projection's output and stores the new key's K/V itself, in place of
``fused.qk_norm_rope_store``'s launch.

Without a GPU the kernels run in Triton's interpreter on CPU tensors, where the prologue is
bitwise the separate kernel's (the same ops and roundings; ``fused.head_norm_rope``). On CUDA:
model-sized shapes in bf16 (the pool bitwise, q's norm reduced in another layout), and the
fused kernel right after the qkv GEMV in a PDL CUDA graph.
"""

import itertools
import os

import torch

# Must precede the first import of triton in this process (tests/conftest.py does the same).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

pytest.importorskip("triton")

from model_utils import PagedRunner

from kvtier.attention.triton_backend import TritonAttention
from kvtier.cache.kv_pool import KVPool
from kvtier.kernels import attention as K
from kvtier.kernels import fused
from kvtier.models import ModelConfig, ResolvedModel, load_model
from kvtier.runner.forward_batch import ForwardBatch, ForwardMode
from kvtier.tokenizer import builtin_tokenizer_dir

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
SCALE = 0.37
EPS = 1e-6
cuda_only = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")


def qk_inputs(
    seq_lens: list[int], *, page_size: int, hq: int, hkv: int, d: int, seed: int,
    use_norm: bool = True, dtype: torch.dtype = torch.float32,
) -> tuple[fused.DecodeQK, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """A decode step's inputs: (qk, k_buf, v_buf, block_table, seq_lens). Random pool (the new
    keys' slots poisoned with NaN, so a path that reads them before they are stored shows),
    random non-contiguous pages; a seq_len of 0 is a padded row whose slot is page 0's."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, device=DEVICE).to(dtype)

    bs = len(seq_lens)
    pages = [max(1, -(-n // page_size)) for n in seq_lens]
    perm = torch.randperm(sum(pages), generator=g, device=DEVICE).to(torch.int32) + 1
    table = torch.zeros(bs, max(pages), dtype=torch.int32, device=DEVICE)
    used = 0
    for b, n in enumerate(pages):
        table[b, :n] = perm[used : used + n]
        used += n
    slots = (sum(pages) + 1) * page_size
    k_buf, v_buf = rnd(slots, hkv, d), rnd(slots, hkv, d)
    seq = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    pos = (seq.long() - 1).clamp(min=0)
    rows = torch.arange(bs, device=DEVICE)
    loc = table[rows, pos // page_size].long() * page_size + pos % page_size
    loc[seq == 0] = 0
    k_buf[loc[seq > 0]] = float("nan")
    v_buf[loc[seq > 0]] = float("nan")
    qkv = rnd(bs, (hq + 2 * hkv) * d)
    qn = (1 + 0.1 * torch.randn(d, generator=g, device=DEVICE)).to(dtype) if use_norm else None
    kn = (1 + 0.1 * torch.randn(d, generator=g, device=DEVICE)).to(dtype) if use_norm else None
    inv_freq = 1.0 / (1e4 ** (torch.arange(0, d, 2, device=DEVICE).float() / d))
    return fused.DecodeQK(qkv, qn, kn, pos, inv_freq, EPS, loc), k_buf, v_buf, table, seq


def separate(
    qk: fused.DecodeQK, k_buf: torch.Tensor, v_buf: torch.Tensor, table: torch.Tensor,
    seq: torch.Tensor, hq: int, splits: int, page_size: int,
) -> torch.Tensor:  # fmt: skip
    """The two-launch chain the fused kernel replaces (the q/k kernel forced to Triton)."""
    hkv, d = k_buf.shape[1], k_buf.shape[2]
    q = fused.qk_norm_rope_store(
        qk.qkv, qk.q_weight, qk.k_weight, qk.positions, qk.inv_freq, hq, hkv, d, qk.eps,
        qk.q_weight is not None, k_buf, v_buf, qk.loc, use_triton=True,
    )  # fmt: skip
    out = torch.full((qk.qkv.shape[0], hq, d), float("nan"), dtype=qk.qkv.dtype, device=DEVICE)
    return K.decode_attention(q, k_buf, v_buf, out, table, seq, SCALE, splits,
                              page_size=page_size)  # fmt: skip


def fused_qk(
    qk: fused.DecodeQK, k_buf: torch.Tensor, v_buf: torch.Tensor, table: torch.Tensor,
    seq: torch.Tensor, hq: int, splits: int, page_size: int,
) -> torch.Tensor:  # fmt: skip
    d = k_buf.shape[2]
    out = torch.full((qk.qkv.shape[0], hq, d), float("nan"), dtype=qk.qkv.dtype, device=DEVICE)
    return K.decode_attention_qk(qk, k_buf, v_buf, out, table, seq, SCALE, splits,
                                 page_size=page_size)  # fmt: skip


@pytest.mark.parametrize(
    ("seq_lens", "page_size", "hq", "hkv", "splits", "use_norm"),
    [
        ([0, 1, 5, 16, 33], 4, 8, 2, 3, True),  # GQA 4, page gather, an empty row, one key
        ([0, 1, 5, 16, 33], 4, 8, 2, 1, True),  # one split: stage 1 writes the output
        ([3, 64, 17], 16, 2, 2, 4, False),  # GQA 1, no q/k norm (Llama)
        ([50, 2], 64, 6, 1, 5, True),  # GQA 6 (padded head rows), pages of several blocks
        ([40, 9, 1, 100], 8, 4, 1, 16, True),  # more splits than key blocks
    ],
)
def test_qk_prologue_is_the_separate_kernel_bitwise(
    seq_lens: list[int], page_size: int, hq: int, hkv: int, splits: int, use_norm: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """Output and pool bit for bit those of the q/k kernel then decode attention, with the
    prefetch path and the carried page lookup off and on; the rows' new keys are stored (the
    NaN poison gone) and no other slot changes; an empty row gets zeros and stores nothing."""
    d = 16
    qk, kb, vb, table, seq = qk_inputs(seq_lens, page_size=page_size, hq=hq, hkv=hkv, d=d,
                                       seed=splits, use_norm=use_norm)  # fmt: skip
    kb_ref, vb_ref = kb.clone(), vb.clone()
    ref = separate(qk, kb_ref, vb_ref, table, seq, hq, splits, page_size)
    full = seq > 0
    assert not ref[full].isnan().any()
    # The separate kernel also stores the empty rows' (unused) k/v at page 0's slot 0.
    kb_ref[0], vb_ref[0] = kb[0], vb[0]
    for prefetch, carry in itertools.product((False, True), (False, True)):
        monkeypatch.setattr(K, "DECODE_PREFETCH", prefetch)
        monkeypatch.setattr(K, "CARRY_SLOTS", carry)
        k2, v2 = kb.clone(), vb.clone()
        out = fused_qk(qk, k2, v2, table, seq, hq, splits, page_size)
        assert torch.equal(out, ref), (prefetch, carry, (out - ref).abs().max())
        assert torch.equal(k2, kb_ref) and torch.equal(v2, vb_ref), (prefetch, carry)
    for b, n in enumerate(seq_lens):
        if n == 0:
            assert torch.equal(out[b], torch.zeros_like(out[b]))


def test_qk_prologue_matches_the_torch_reference() -> None:
    """Against torch alone: qk_norm_rope_ref, the index copies, decode_attention_ref."""
    hq, hkv, d, ps = 4, 2, 16, 4
    qk, kb, vb, table, seq = qk_inputs([7, 30], page_size=ps, hq=hq, hkv=hkv, d=d, seed=11)
    q, k, v = fused.qk_norm_rope_ref(qk.qkv, qk.q_weight, qk.k_weight, qk.positions,
                                     qk.inv_freq, hq, hkv, d, EPS, True)  # fmt: skip
    kb_ref, vb_ref = kb.clone(), vb.clone()
    kb_ref[qk.loc], vb_ref[qk.loc] = k, v
    ref = K.decode_attention_ref(q, kb_ref, vb_ref, torch.empty_like(q), table, seq, SCALE,
                                 page_size=ps)  # fmt: skip
    out = fused_qk(qk, kb, vb, table, seq, hq, 3, ps)
    assert ((out - ref).norm() / ref.norm()).item() < 1e-5
    assert torch.allclose(kb, kb_ref, rtol=1e-6, atol=1e-6) and torch.equal(vb, vb_ref)


def test_qk_argument_errors() -> None:
    hq, hkv, d, ps = 4, 2, 16, 4
    qk, kb, vb, table, seq = qk_inputs([5, 9], page_size=ps, hq=hq, hkv=hkv, d=d, seed=1)
    out = torch.empty(2, hq, d, device=DEVICE)

    def call(qk: fused.DecodeQK, out: torch.Tensor = out, kb: torch.Tensor = kb) -> None:
        K.decode_attention_qk(qk, kb, vb, out, table, seq, SCALE, 2, page_size=ps)

    def replace(**kw: object) -> fused.DecodeQK:
        return fused.DecodeQK(**{**qk.__dict__, **kw})

    with pytest.raises(ValueError, match=r"qkv must be \[B, \(Hq \+ 2 Hkv\) \* D\]; got \(2, 64\)"):
        call(replace(qkv=qk.qkv[:, :64]))
    with pytest.raises(ValueError, match=r"the pool's dtype \(torch.float16\) must be qkv's"):
        call(qk, kb=kb.half())
    with pytest.raises(ValueError, match="q_weight and k_weight must both be given or both"):
        call(replace(k_weight=None))
    with pytest.raises(ValueError, match=r"loc must be \[2\] int64 on qkv's device"):
        call(replace(loc=qk.loc.int()))
    with pytest.raises(ValueError, match=r"positions must be \[2\]"):
        call(replace(positions=qk.positions[:1]))
    with pytest.raises(ValueError, match=r"inv_freq must be \[8\] float32"):
        call(replace(inv_freq=qk.inv_freq.double()))
    with pytest.raises(ValueError, match=r"out dtype torch.float16 must be qkv's"):
        call(qk, out=out.half())
    with pytest.raises(ValueError, match=r"qkv has 2 rows, out 3"):
        call(qk, out=torch.empty(3, hq, d, device=DEVICE))
    assert K.qk_supported(qk, kb, vb, hq) is None


def _decode_batch(qk: fused.DecodeQK, table: torch.Tensor, seq: torch.Tensor, pool, mode):
    return ForwardBatch(
        mode=mode,
        input_ids=torch.zeros(len(seq), dtype=torch.int64, device=DEVICE),
        positions=qk.positions,
        out_cache_loc=qk.loc,
        seq_lens=seq,
        block_table=table,
        logits_indices=torch.arange(len(seq), device=DEVICE),
        kv_pool=pool,
        attn_backend=None,
        seq_lens_cpu=seq.tolist(),
    )


def _pool(k: torch.Tensor, v: torch.Tensor, page_size: int) -> KVPool:
    """A one-layer pool holding ``k`` / ``v`` ([slots, Hkv, D], slots a multiple of the page)."""
    pool = KVPool(k.shape[0] // page_size, page_size, 1, k.shape[1], k.shape[2], k.dtype, DEVICE)
    pool.k_buffer(0).copy_(k)
    pool.v_buffer(0).copy_(v)
    return pool


def test_backend_attend_qk_takes_decode_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """TritonAttention.attend_qk: a decode batch gets the fused kernel's output (bitwise the
    q/k kernel then ``attend``); with DECODE_QK off, a pool of another dtype, or an extend
    batch it returns None and touches nothing."""
    hq, hkv, d, ps = 4, 2, 16, 4
    qk, kb, vb, table, seq = qk_inputs([6, 21], page_size=ps, hq=hq, hkv=hkv, d=d, seed=3)
    backend = TritonAttention(min_split_len=4)
    pool = _pool(kb, vb, ps)
    batch = _decode_batch(qk, table, seq, pool, ForwardMode.DECODE)
    backend.prepare(batch)
    splits = batch.attn_metadata.num_kv_splits
    assert splits > 1
    kb_ref, vb_ref = kb.clone(), vb.clone()
    ref = separate(qk, kb_ref, vb_ref, table, seq, hq, splits, ps)

    monkeypatch.setattr(K, "DECODE_QK", False)
    assert backend.attend_qk(qk, hq, 0, batch, SCALE) is None
    monkeypatch.setattr(K, "DECODE_QK", True)
    other = _decode_batch(qk, table, seq, _pool(kb.double(), vb.double(), ps),
                          ForwardMode.DECODE)  # fmt: skip
    assert backend.attend_qk(qk, hq, 0, other, SCALE) is None
    extend = _decode_batch(qk, table, seq, pool, ForwardMode.EXTEND)
    assert backend.attend_qk(qk, hq, 0, extend, SCALE) is None
    assert pool.k_buffer(0)[qk.loc].isnan().all()  # nothing stored by the refusals

    out = backend.attend_qk(qk, hq, 0, batch, SCALE)
    assert out is not None and torch.equal(out, ref)
    assert torch.equal(pool.k_buffer(0), kb_ref) and torch.equal(pool.v_buffer(0), vb_ref)


def _tiny_qwen3(dtype: torch.dtype) -> tuple[ModelConfig, torch.nn.Module]:
    import json

    raw = json.loads((builtin_tokenizer_dir() / "config.json").read_text())
    raw.update(num_hidden_layers=2, hidden_size=64, intermediate_size=128,
               num_attention_heads=4, num_key_value_heads=2, head_dim=16)  # fmt: skip
    config = ModelConfig.from_hf_dict(raw)
    resolved = ResolvedModel("tiny-qwen3-qk", config, None, None, source="builtin")
    return config, load_model(resolved, "dummy", dtype, DEVICE, seed=3)


def test_model_decode_with_the_prologue_matches_without(monkeypatch: pytest.MonkeyPatch):
    """A Qwen3 model (q/k norms) on the Triton backend: greedy decode with the prologue in
    attention gives the tokens, and logits within float32 rounding, of the separate q/k
    kernel; the step does not launch that kernel."""
    config, model = _tiny_qwen3(torch.float32)
    prompts = [[5, 9, 13, 2, 7, 1, 4], [3, 3, 8]]
    calls = []
    original = fused.qk_norm_rope_store

    def counting(*args, **kwargs):
        calls.append(args[0].shape[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(fused, "qk_norm_rope_store", counting)
    runs = {}
    for on in (False, True):
        monkeypatch.setattr(K, "DECODE_QK", on)
        calls.clear()
        runner = PagedRunner(model, config, page_size=4, backend=TritonAttention(min_split_len=4),
                             device=DEVICE)  # fmt: skip
        runs[on] = runner.generate_greedy(prompts, 4)
        # Prefill: one extend batch a layer either way; then 3 decode steps (the prefill gave
        # the first of the 4 tokens) x 2 layers without the prologue, none with it.
        assert calls == [10, 10] + ([] if on else [2] * 6), (on, calls)
    (logits_off, tokens_off), (logits_on, tokens_on) = runs[False], runs[True]
    assert tokens_on == tokens_off
    for a, b in zip(logits_on, logits_off):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------- CUDA


@cuda_only
@pytest.mark.parametrize("splits", [1, 64])
def test_qk_prologue_model_sized_bf16_cuda(splits: int) -> None:
    """Qwen3-30B-A3B's attention geometry in bf16: the pool bitwise the separate kernel's; the
    output within bf16 rounding of it (q's norm sums in another layout)."""
    hq, hkv, d, ps = 32, 4, 128, 64
    seq_lens = [4096, 1, 300, 0, 2049]
    qk, kb, vb, table, seq = qk_inputs(seq_lens, page_size=ps, hq=hq, hkv=hkv, d=d, seed=2,
                                       dtype=torch.bfloat16)  # fmt: skip
    kb_ref, vb_ref = kb.clone(), vb.clone()
    ref = separate(qk, kb_ref, vb_ref, table, seq, hq, splits, ps)
    kb_ref[0], vb_ref[0] = kb[0], vb[0]
    out = fused_qk(qk, kb, vb, table, seq, hq, splits, ps)
    assert torch.equal(kb, kb_ref) and torch.equal(vb, vb_ref)
    err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    assert not out.isnan().any() and err < 1e-2, err


@cuda_only
def test_qk_prologue_after_the_qkv_gemv_in_a_pdl_graph_cuda() -> None:
    """As in a model's decode step: per layer the qkv GEMV then the fused decode attention, in
    a CUDA graph with PDL (stage 1 loads its first key block and the prologue's tables before
    it waits for the GEMV). With the new keys' slots poisoned before each replay, every replay
    gives the bits of the same chain run eagerly."""
    from kvtier.kernels import gemv

    if torch.cuda.get_device_capability()[0] < 9 or not fused.PDL_ENABLED:
        pytest.skip("needs PDL (sm_90+, KVTIER_PDL not 0)")
    hq, hkv, d, ps, hidden, layers = 32, 4, 128, 64, 2048, 4
    seq_lens = [4096, 300, 1]
    bs = len(seq_lens)
    inputs = [qk_inputs(seq_lens, page_size=ps, hq=hq, hkv=hkv, d=d, seed=i,
                        dtype=torch.bfloat16) for i in range(layers)]  # fmt: skip
    g = torch.Generator(device="cuda").manual_seed(9)
    x = torch.randn(bs, hidden, generator=g, device="cuda").to(torch.bfloat16)
    weights = [(torch.randn((hq + 2 * hkv) * d, hidden, generator=g, device="cuda") * 0.02)
               .to(torch.bfloat16) for _ in range(layers)]  # fmt: skip
    qkvs = [qk.qkv for qk, *_ in inputs]  # the GEMV writes each layer's qkv in place
    splits = K.choose_num_kv_splits(bs, hkv, max(seq_lens))
    mid_o, mid_lse = K.decode_scratch(bs, hq, splits, d, "cuda")
    outs = [torch.empty(bs, hq, d, dtype=torch.bfloat16, device="cuda") for _ in range(layers)]

    def step() -> None:
        for i, (qk, kb, vb, table, seq) in enumerate(inputs):
            gemv.gemv(x, weights[i], out=qkvs[i])
            K.decode_attention_qk(qk, kb, vb, outs[i], table, seq, SCALE, splits, page_size=ps,
                                  mid_o=mid_o, mid_lse=mid_lse)  # fmt: skip

    def poison() -> None:
        for qk, kb, vb, *_ in inputs:
            kb[qk.loc] = float("nan")
            vb[qk.loc] = float("nan")

    poison()
    step()
    torch.cuda.synchronize()
    expected = [o.clone() for o in outs]
    assert not any(o.isnan().any() for o in expected)
    step()  # warm, then capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for _ in range(5):
        poison()
        for o in outs:
            o.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        for o, e in zip(outs, expected):
            assert torch.equal(o, e)
