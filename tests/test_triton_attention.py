"""Triton paged attention (extend + split-KV decode) against the torch reference.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (slow: small shapes, fp32).
On CUDA the same tests run, plus bf16 and larger (model-sized) shapes, CUDA-graph replays and the
decode PDL prefetch after the kernel that stores the new key.
Data is random everywhere, the pool included (never zeros), page ids are random and
non-contiguous, and every output is poisoned with NaN first, so an unwritten element fails.
"""

import itertools
import os
import re
import textwrap

import torch

# Must precede the first import of triton in this process (tests/conftest.py does the same for
# runs that import triton elsewhere first).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
from compile_utils import SM90_HELPERS, run_compile_check

pytest.importorskip("triton")

from kvtier.attention.torch_backend import TorchAttention
from kvtier.attention.triton_backend import TritonAttention
from kvtier.cache.kv_pool import KVPool
from kvtier.kernels import attention as K
from kvtier.runner.forward_batch import ForwardBatch, ForwardMode

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
# fp32 everywhere; bf16 only where the tensor cores exist (the interpreter is fp32-exact anyway).
DTYPES = [torch.float32, torch.bfloat16] if CUDA else [torch.float32]
TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 5e-3}
LAYER = 1  # not 0, so that a wrong layer offset shows
SCALE = 0.37  # not 1/sqrt(D), so that a scale the kernel recomputes itself shows


def test_interpreter_mode_matches_device():
    # If triton was imported before TRITON_INTERPRET was set, the CPU tests would fail obscurely.
    assert K.INTERPRETED is not CUDA, "set TRITON_INTERPRET=1 before importing triton on CPU"


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def make_batch(
    mode: ForwardMode,
    prefix_lens: list[int],
    extend_lens: list[int],
    *,
    page_size: int,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    seed: int,
    table_pad: int = 1,
) -> tuple[ForwardBatch, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A batch over a random pool with random non-contiguous pages; returns (batch, q, k, v)
    with k/v the new tokens' keys/values (not yet stored)."""
    g = torch.Generator().manual_seed(seed)
    seq_lens = [p + e for p, e in zip(prefix_lens, extend_lens)]
    pages_per_seq = [(s + page_size - 1) // page_size for s in seq_lens]
    num_pages = 1 + sum(pages_per_seq) + 7  # spare pages: the pages used are not a prefix
    pool = KVPool(num_pages, page_size, 2, num_kv_heads, head_dim, dtype, DEVICE)
    # Garbage everywhere (other layers, unused slots, page 0): never zeros.
    pool.k.copy_(torch.randn(pool.k.shape, generator=g))
    pool.v.copy_(torch.randn(pool.v.shape, generator=g))
    perm = (torch.randperm(num_pages - 1, generator=g) + 1).tolist()
    width = max(pages_per_seq) + table_pad
    table = torch.zeros((len(seq_lens), width), dtype=torch.int32)
    locs, positions = [], []
    used = 0
    for b, (p, s, n) in enumerate(zip(prefix_lens, seq_lens, pages_per_seq)):
        pages = perm[used : used + n]
        used += n
        table[b, :n] = torch.tensor(pages, dtype=torch.int32)
        pos = torch.arange(p, s)
        locs.append(table[b, pos // page_size].long() * page_size + pos % page_size)
        positions.append(pos)
    num_tokens = sum(extend_lens)
    starts = [0]
    for n in extend_lens[:-1]:
        starts.append(starts[-1] + n)
    i32 = lambda xs: torch.tensor(xs, dtype=torch.int32, device=DEVICE)  # noqa: E731
    batch = ForwardBatch(
        mode=mode,
        input_ids=torch.zeros(num_tokens, dtype=torch.int64, device=DEVICE),
        positions=torch.cat(positions).to(DEVICE),
        out_cache_loc=torch.cat(locs).to(DEVICE),
        seq_lens=i32(seq_lens),
        block_table=table.to(DEVICE),
        logits_indices=torch.zeros(0, dtype=torch.int64, device=DEVICE),
        kv_pool=pool,
        attn_backend=TorchAttention(),
        seq_lens_cpu=seq_lens,
    )
    if mode is ForwardMode.EXTEND:
        batch.extend_lens_cpu = list(extend_lens)
        batch.prefix_lens_cpu = list(prefix_lens)
        batch.extend_lens = i32(extend_lens)
        batch.prefix_lens = i32(prefix_lens)
        batch.extend_starts = i32(starts)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=g).to(device=DEVICE, dtype=dtype)

    q = rand(num_tokens, num_q_heads, head_dim)
    return (
        batch,
        q,
        rand(num_tokens, num_kv_heads, head_dim),
        rand(num_tokens, num_kv_heads, head_dim),
    )


def reference(batch: ForwardBatch, q: torch.Tensor) -> torch.Tensor:
    """TorchAttention in fp32 over the (already written) pool."""
    return TorchAttention().attend(q.float(), LAYER, batch, SCALE)


def check_backend(batch: ForwardBatch, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  backend: TritonAttention) -> None:  # fmt: skip
    # The shared forward() stores the new K/V, then attends: the reference reads the same pool.
    batch.attn_backend = backend
    backend.prepare(batch)
    first = backend.forward(q, k, v, LAYER, batch, SCALE)
    ref = reference(batch, q)
    out = torch.full_like(q, float("nan"))
    backend.attend(q, LAYER, batch, SCALE, out=out)
    assert not out.isnan().any(), "some output elements were not written"
    assert rel_err(out, ref) < TOL[q.dtype], rel_err(out, ref)
    assert torch.equal(out, first)


# Several sequences: prefix 0 with extend 1, prefix 0 with a long extend, extend 1 after a
# prefix, prefix and extend both crossing block and page boundaries.
EXT_PREFIX = [0, 0, 19, 37, 5, 16]
EXT_EXTEND = [1, 23, 1, 18, 40, 16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("page_size", [1, 4, 16])
def test_extend_matches_torch(page_size: int, group: int, dtype: torch.dtype) -> None:
    batch, q, k, v = make_batch(
        ForwardMode.EXTEND, EXT_PREFIX, EXT_EXTEND, page_size=page_size,
        num_q_heads=2 * group, num_kv_heads=2, head_dim=32, dtype=dtype, seed=page_size + group,
    )  # fmt: skip
    check_backend(batch, q, k, v, TritonAttention())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_kv_splits", [1, 3])
@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("page_size", [1, 4, 16])
def test_decode_matches_torch(
    page_size: int, group: int, num_kv_splits: int, dtype: torch.dtype
) -> None:
    # Seq lens 1, page-aligned and not; some shorter than a split (empty splits).
    seq_lens = [1, 7, 16, 33, 69]
    batch, q, k, v = make_batch(
        ForwardMode.DECODE, [s - 1 for s in seq_lens], [1] * len(seq_lens),
        page_size=page_size, num_q_heads=2 * group, num_kv_heads=2, head_dim=32, dtype=dtype,
        seed=10 * page_size + group,
    )  # fmt: skip
    backend = TritonAttention()
    # Force the split count (the heuristic would pick 1 for such short sequences).
    backend.num_kv_splits_for = lambda *args: num_kv_splits  # type: ignore[method-assign]
    check_backend(batch, q, k, v, backend)
    assert batch.attn_metadata.num_kv_splits == num_kv_splits


def test_head_dim_64_and_ratio_8() -> None:
    for mode, prefix, ext in (
        (ForwardMode.EXTEND, [0, 21], [9, 12]),
        (ForwardMode.DECODE, [20, 45], [1, 1]),
    ):
        batch, q, k, v = make_batch(
            mode, prefix, ext, page_size=8, num_q_heads=8, num_kv_heads=1, head_dim=64,
            dtype=torch.float32, seed=3,
        )  # fmt: skip
        check_backend(batch, q, k, v, TritonAttention(min_split_len=16))


def test_decode_graph_style_scratch_and_empty_rows() -> None:
    """Kernel level, as a CUDA-graph runner would call it: scratch and block table sized for a
    larger max batch (scratch poisoned), more splits than short sequences can use, a padded row
    with seq_len 0 (must come out as zeros, not NaN)."""
    seq_lens = [0, 3, 50, 17]
    page_size, hq, hkv, d, splits = 4, 4, 2, 32, 5
    batch, q, _, _ = make_batch(
        ForwardMode.DECODE, [max(s - 1, 0) for s in seq_lens], [1] * len(seq_lens),
        page_size=page_size, num_q_heads=hq, num_kv_heads=hkv, head_dim=d,
        dtype=torch.float32, seed=5, table_pad=3,
    )  # fmt: skip
    seq = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    # Rows past the batch in the table and seq_lens (a captured max batch) are ignored.
    table = torch.cat([batch.block_table, torch.zeros_like(batch.block_table[:2])])
    seq_all = torch.cat([seq, torch.full((2,), 7, dtype=torch.int32, device=DEVICE)])
    mid_o, mid_lse = K.decode_scratch(8, hq, 8, d, DEVICE)
    mid_o.fill_(float("nan"))
    mid_lse.fill_(float("nan"))
    kb, vb = batch.kv_pool.k_buffer(LAYER), batch.kv_pool.v_buffer(LAYER)
    out = torch.full_like(q, float("nan"))
    K.decode_attention(
        q, kb, vb, out, table, seq_all, SCALE, splits, page_size=page_size, mid_o=mid_o,
        mid_lse=mid_lse,
    )  # fmt: skip
    ref = K.decode_attention_ref(
        q, kb, vb, torch.empty_like(q), table, seq, SCALE, page_size=page_size
    )
    assert not out.isnan().any()
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert rel_err(out, ref) < 1e-4
    # The single-split path writes zeros for the empty row too.
    out.fill_(float("nan"))
    K.decode_attention(q, kb, vb, out, table, seq_all, SCALE, 1, page_size=page_size)
    assert not out.isnan().any() and rel_err(out, ref) < 1e-4


def test_kernel_refs_agree_with_torch_backend() -> None:
    """The module's own references (used by the benchmark) match TorchAttention."""
    batch, q, k, v = make_batch(
        ForwardMode.EXTEND, [3, 0], [5, 9], page_size=4, num_q_heads=4, num_kv_heads=2,
        head_dim=16, dtype=torch.float32, seed=9,
    )  # fmt: skip
    batch.kv_pool.write(LAYER, batch.out_cache_loc, k, v)
    kb, vb = batch.kv_pool.k_buffer(LAYER), batch.kv_pool.v_buffer(LAYER)
    ref = K.extend_attention_ref(
        q, kb, vb, torch.empty_like(q), batch.block_table, batch.seq_lens, batch.extend_lens,
        batch.extend_starts, batch.prefix_lens, SCALE, 9, page_size=4,
    )  # fmt: skip
    assert rel_err(ref, reference(batch, q)) < 1e-5


def test_choose_num_kv_splits() -> None:
    f = K.choose_num_kv_splits
    assert f(1, 4, 64) == 1  # too short to split
    assert f(1, 4, 100) == 2  # splits of >= 64 keys
    assert f(1, 4, 4096) == 64  # bounded by the split length and the scratch
    assert f(1, 4, 1 << 20) == 64  # by the scratch: 66 would give ~2 programs per SM
    assert f(1, 4, 4096, min_split_len=256) == 16
    assert f(1, 4, 1 << 20, max_splits=8) == 8
    assert f(128, 4, 4096) == 1  # the batch alone fills the machine
    assert f(32, 4, 4096) == 3  # 384 programs: ~2 per SM of 132
    assert f(32, 4, 4096, num_sms=264) == 5


def test_graph_hooks_reserve_and_freeze() -> None:
    backend = TritonAttention(max_kv_splits=8, min_split_len=16)
    backend.init_cuda_graph_state(4, num_q_heads=4, num_kv_heads=2, head_dim=32,
                                  max_context_len=256, device=DEVICE)  # fmt: skip
    seq_lens = [40, 9, 1]
    batch, q, k, v = make_batch(
        ForwardMode.DECODE, [s - 1 for s in seq_lens], [1] * 3, page_size=4, num_q_heads=4,
        num_kv_heads=2, head_dim=32, dtype=torch.float32, seed=11,
    )  # fmt: skip
    batch.kv_pool.write(LAYER, batch.out_cache_loc, k, v)
    backend.prepare_graph(batch)
    assert batch.attn_metadata.num_kv_splits == backend.graph_num_kv_splits(3) > 1
    scratch = backend._decode_scratch.mid_o.data_ptr()
    out = torch.full_like(q, float("nan"))
    backend.attend(q, LAYER, batch, SCALE, out=out)
    assert backend._decode_scratch.mid_o.data_ptr() == scratch  # no reallocation under "capture"
    assert not out.isnan().any() and rel_err(out, reference(batch, q)) < 1e-4
    with pytest.raises(RuntimeError, match="frozen"):
        backend.decode_scratch_views(64, 4, 32, 8, DEVICE)


@pytest.mark.parametrize(
    ("seq_lens", "want_splits"), [([120, 97, 64], 2), ([120, 97, 64, 33, 80], 1)]
)
def test_eager_decode_past_graph_max_fits_frozen_scratch(
    seq_lens: list[int], want_splits: int
) -> None:
    """Scratch frozen for CUDA graphs up to batch 1 (``--cuda-graph-max-bs 1``): an eager decode
    of a larger batch over a long context, which would want more split rows than reserved, runs
    with the most splits the scratch holds (down to 1) instead of raising or reallocating."""
    backend = TritonAttention(max_kv_splits=8, min_split_len=16)
    backend.init_cuda_graph_state(1, num_q_heads=4, num_kv_heads=2, head_dim=32,
                                  max_context_len=128, device=DEVICE)  # fmt: skip
    assert backend.graph_num_kv_splits(1) == 8 and backend._decode_scratch.rows == 8
    scratch = (backend._decode_scratch.mid_o.data_ptr(), backend._decode_scratch.mid_lse.data_ptr())
    bs = len(seq_lens)
    batch, q, k, v = make_batch(
        ForwardMode.DECODE, [s - 1 for s in seq_lens], [1] * bs, page_size=4, num_q_heads=4,
        num_kv_heads=2, head_dim=32, dtype=torch.float32, seed=23,
    )  # fmt: skip
    batch.kv_pool.write(LAYER, batch.out_cache_loc, k, v)
    batch.attn_backend = backend
    backend.prepare(batch)
    assert batch.attn_metadata.num_kv_splits == 8  # the heuristic wants bs x 8 > 8 rows
    out = torch.full_like(q, float("nan"))
    backend.attend(q, LAYER, batch, SCALE, out=out)
    assert batch.attn_metadata.num_kv_splits == want_splits
    assert scratch == (
        backend._decode_scratch.mid_o.data_ptr(),
        backend._decode_scratch.mid_lse.data_ptr(),
    )
    assert backend._decode_scratch.frozen and backend._decode_scratch.rows == 8
    kb, vb = batch.kv_pool.k_buffer(LAYER), batch.kv_pool.v_buffer(LAYER)
    ref = K.decode_attention_ref(
        q, kb, vb, torch.empty_like(q), batch.block_table, batch.seq_lens, SCALE, page_size=4
    )
    assert not out.isnan().any()
    assert rel_err(out, ref) < 1e-4 and rel_err(out, reference(batch, q)) < 1e-4
    # The step's other layers reuse the lowered count.
    out2 = torch.full_like(q, float("nan"))
    backend.attend(q, LAYER, batch, SCALE, out=out2)
    assert torch.equal(out, out2) and batch.attn_metadata.num_kv_splits == want_splits


# ------------------------------------------------------------------------ decode: PDL prefetch


def decode_kernel_inputs(
    seq_lens: list[int], *, page_size: int, hq: int, hkv: int, seed: int, d: int = 32,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, ...]:  # fmt: skip
    """Kernel arguments of a decode batch (q, k_buf, v_buf, block_table, seq_lens), the new
    keys stored; a seq_len of 0 is a padded row (its table row holds one unused page)."""
    batch, q, k, v = make_batch(
        ForwardMode.DECODE, [max(s - 1, 0) for s in seq_lens], [1] * len(seq_lens),
        page_size=page_size, num_q_heads=hq, num_kv_heads=hkv, head_dim=d, dtype=dtype,
        seed=seed,
    )  # fmt: skip
    batch.kv_pool.write(LAYER, batch.out_cache_loc, k, v)
    seq = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    kb, vb = batch.kv_pool.k_buffer(LAYER), batch.kv_pool.v_buffer(LAYER)
    return q, kb, vb, batch.block_table, seq


def decode_variants(
    q: torch.Tensor, kb: torch.Tensor, vb: torch.Tensor, table: torch.Tensor, seq: torch.Tensor,
    splits: int, page_size: int, monkeypatch: pytest.MonkeyPatch,
) -> list[tuple[bool, torch.Tensor]]:  # fmt: skip
    """Decode (stage 1 + stage 2) with the prefetch path forced off and on, each with the key
    loop's page lookup in the step and a step ahead (``CARRY_SLOTS``), on one scratch (larger
    than needed, as a captured graph's; poisoned before each launch). Returns ((prefetch,
    carry), out) per launch, the plain path (neither) first."""
    hq, d = q.shape[1], q.shape[2]
    rows = q.shape[0] + 1
    mid_o, mid_lse = K.decode_scratch(rows, hq, splits + 1, d, DEVICE)
    outs = []
    for prefetch, carry in itertools.product((False, True), (False, True)):
        monkeypatch.setattr(K, "DECODE_PREFETCH", prefetch)
        monkeypatch.setattr(K, "CARRY_SLOTS", carry)
        mid_o.fill_(float("nan"))
        mid_lse.fill_(float("nan"))
        out = torch.full_like(q, float("nan"))
        K.decode_attention(
            q, kb, vb, out, table, seq, SCALE, splits, page_size=page_size, mid_o=mid_o,
            mid_lse=mid_lse,
        )  # fmt: skip
        outs.append(((prefetch, carry), out))
    return outs


@pytest.mark.parametrize(
    ("seq_lens", "page_size", "hq", "hkv", "splits"),
    [
        ([0, 1, 5, 16, 33, 70], 4, 8, 2, 7),  # GQA 4, page gather; empty and 1-key sequences
        ([3, 64, 17], 16, 2, 2, 3),  # GQA 1, pages of one key block
        ([50, 0, 2], 64, 6, 1, 4),  # GQA 6 (padded head rows), pages of several key blocks
        ([40, 9, 1, 100], 8, 4, 1, 16),  # more splits than key blocks: mostly empty splits
    ],
)
def test_decode_prefetch_matches_plain_path_bitwise(
    seq_lens: list[int], page_size: int, hq: int, hkv: int, splits: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """The PDL prefetch path (forced: the interpreter has no PDL) gives the plain path's output
    bit for bit, which matches the reference (zeros for an empty sequence); unused (poisoned)
    splits are never read."""
    q, kb, vb, table, seq = decode_kernel_inputs(
        seq_lens, page_size=page_size, hq=hq, hkv=hkv, seed=splits
    )
    ref = K.decode_attention_ref(
        q, kb, vb, torch.empty_like(q), table, seq, SCALE, page_size=page_size
    )
    outs = decode_variants(q, kb, vb, table, seq, splits, page_size, monkeypatch)
    base = outs[0][1]
    assert not base.isnan().any() and rel_err(base, ref) < 1e-5, rel_err(base, ref)
    for b, n in enumerate(seq_lens):
        if n == 0:
            assert torch.equal(base[b], torch.zeros_like(base[b]))
    for variant, out in outs[1:]:
        assert torch.equal(out, base), variant


def test_decode_prefetch_single_split_bitwise(monkeypatch: pytest.MonkeyPatch) -> None:
    """One split (stage 1 writes the output itself, no stage 2): the prefetch path and the
    page lookup a step ahead give the same bits, an empty sequence included."""
    seq_lens, page_size = [0, 1, 16, 37], 4
    q, kb, vb, table, seq = decode_kernel_inputs(seq_lens, page_size=page_size, hq=4, hkv=2,
                                                 seed=4)  # fmt: skip
    outs = []
    for prefetch, carry in itertools.product((False, True), (False, True)):
        monkeypatch.setattr(K, "DECODE_PREFETCH", prefetch)
        monkeypatch.setattr(K, "CARRY_SLOTS", carry)
        out = torch.full_like(q, float("nan"))
        K.decode_attention(q, kb, vb, out, table, seq, SCALE, 1, page_size=page_size)
        outs.append(out)
    ref = K.decode_attention_ref(
        q, kb, vb, torch.empty_like(q), table, seq, SCALE, page_size=page_size
    )
    assert not outs[0].isnan().any() and rel_err(outs[0], ref) < 1e-5
    for out in outs[1:]:
        assert torch.equal(outs[0], out)


_PIPELINE_CHECK = SM90_HELPERS + textwrap.dedent(
    """
    import re
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from kvtier.kernels import attention as A
    assert not A.INTERPRETED

    def compiled(fn, args, constexprs, num_warps, num_stages):
        # As a launch specialises: pointers and ints divisible by 16 get that divisibility.
        sig, attrs = {}, {}
        for name, v in args.items():
            pos = (fn.arg_names.index(name),)
            sig[name] = v if isinstance(v, str) else "i32"
            if isinstance(v, str) and v.startswith("*") or not isinstance(v, str) and v % 16 == 0:
                attrs[pos] = [["tt.divisibility", 16]]
        sig.update({name: "constexpr" for name in constexprs})
        src = ASTSource(fn=fn, signature=sig, constexprs=dict(constexprs), attrs=attrs)
        options = dict(num_warps=num_warps, num_stages=num_stages)
        return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)

    def ttgir(fn, args, constexprs, num_warps, num_stages):
        return compiled(fn, args, constexprs, num_warps, num_stages).asm["ttgir"]

    def kv_buffers(code):
        return {int(n) for n in re.findall(r"memdesc<(\\d+)x64x128xbf16", code)}

    common = dict(Q="*bf16", K="*bf16", V="*bf16", BlockTable="*i32", SeqLens="*i32",
                  qk_scale="fp32", stride_qh=128, stride_kt=512, stride_kh=128, stride_vt=512,
                  stride_vh=128, stride_bt=1024)
    decode = dict(common, Out="*bf16", MidO="*fp32", MidLse="*fp32", num_splits="i32",
                  stride_qb=4096, stride_ob=4096, stride_oh=128, stride_mb=262144,
                  stride_mh=8192, stride_ms=128, stride_lb=2048, stride_lh=64)
    split = dict(common, ExtendLens="*i32", ExtendStarts="*i32", PrefixLens="*i32",
                 MidO="*fp32", MidLse="*fp32", num_splits="i32", head_blocks="i32",
                 stride_qt=4096, stride_mt=262144, stride_mh=8192, stride_ms=128,
                 stride_lt=2048, stride_lh=64)
    tiles = A.default_decode_config(128, torch.bfloat16)
    for prefetch in (False, True):
        code = ttgir(A._decode_stage1_kernel, decode, dict(
            GROUP=8, BLOCK_H=16, HEAD_DIM=128, PAGE_SIZE=64, BLOCK_N=tiles.block_n,
            SINGLE_SPLIT=False, PREFETCH=prefetch, DOT_PREC="tf32", INTERPRET=False,
            CARRY=True, PDL=True), tiles.num_warps, tiles.num_stages)
        assert min(kv_buffers(code)) >= 2, ("decode", prefetch, kv_buffers(code))
    # 128-row tiles (short extends), 256-row tiles split and in one pass (reversed order).
    # Those fill the 255 registers a thread: a spill of a few hundred bytes (a bf16 store in
    # the epilogue did it) cost ~15% on an H200, so it is checked here with ptxas.
    for ext_len, reverse in ((64, False), (512, False), (4096, True)):
        cfg = A.default_extend_split_config(128, torch.bfloat16, ext_len, 8)
        # One split (the packed one pass): the scratch is [T, Hq, 1, D] / [T, Hq, 1].
        one = dict(split, stride_mt=4096, stride_mh=128, stride_lt=32, stride_lh=1)
        sig = one if reverse else split
        kernel = compiled(A._extend_split_stage1_kernel, sig, dict(
            GROUP=8, BLOCK_G=8, BLOCKS_PER_GROUP=1, BLOCK_Q=cfg.block_m // 8, HEAD_DIM=128,
            PAGE_SIZE=64, BLOCK_N=cfg.block_n, DOT_PREC="tf32", INTERPRET=False, CARRY=True,
            PDL=True, REVERSE=reverse), cfg.num_warps, cfg.num_stages)
        code = kernel.asm["ttgir"]
        assert min(kv_buffers(code)) >= 2, ("split extend", ext_len, kv_buffers(code))
        spill = spill_bytes(kernel)
        assert spill <= 16, ("split extend spills", ext_len, spill)
    print("ok")
    """
)


def test_carried_loops_keep_two_kv_buffers_sm90():
    """Compiled for an H100 / H200 (sm_90; no GPU needed, only Triton's ptxas), at the
    Qwen3-30B-A3B geometry and the default tiles: with the page lookup carried a step ahead,
    the software pipeliner gives the key loops' K and V tiles at least two shared-memory buffers
    (one block in flight while the other is used), which is what CARRY is for (with the lookup
    in the step, Triton 3.6 and 3.9 gave one at num_stages 3)."""
    run_compile_check(_PIPELINE_CHECK)


# ------------------------------------------------------------------------------ split-KV extend


def extend_kernel_args(batch: ForwardBatch, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """Store the new K/V; return the positional arguments of ``K.extend_attention`` up to
    ``scale`` (q, k_buf, v_buf and the lengths; ``out`` is the caller's)."""
    batch.kv_pool.write(LAYER, batch.out_cache_loc, k, v)
    kb, vb = batch.kv_pool.k_buffer(LAYER), batch.kv_pool.v_buffer(LAYER)
    return kb, vb, (
        batch.block_table, batch.seq_lens, batch.extend_lens, batch.extend_starts,
        batch.prefix_lens, SCALE,
    )  # fmt: skip


def poisoned_scratch(tokens: int, hq: int, splits: int, d: int):
    mid_o, mid_lse = K.extend_scratch(tokens, hq, splits, d, DEVICE)
    mid_o.fill_(float("nan"))
    mid_lse.fill_(float("nan"))
    return mid_o, mid_lse


# Prefix 0 with extend 1 and with a long extend, extend 1 after a prefix, extends not a multiple
# of any block, prefixes from shorter than a key block to several blocks past a page.
SPLIT_PREFIX = [0, 0, 19, 70, 5, 33]
SPLIT_EXTEND = [1, 23, 1, 18, 40, 16]


@pytest.mark.parametrize(
    ("page_size", "num_q_heads", "num_kv_heads", "splits", "seqs"),
    [
        (1, 2, 2, 3, 6),  # GQA 1, page gather
        (16, 4, 2, 2, 6),  # GQA 2 over two kv heads
        (16, 4, 1, 16, 6),  # more splits than most sequences have key blocks: empty splits
        (64, 8, 1, 5, 6),  # GQA 8, a page wider than the key block
        (4, 8, 1, 32, 4),  # GQA 8, gather, 32 splits (mostly empty)
        (16, 6, 1, 3, 6),  # GQA 6: a group that is not a power of two (padded head rows)
    ],
)
def test_extend_split_matches_ref(
    page_size: int, num_q_heads: int, num_kv_heads: int, splits: int, seqs: int
) -> None:
    batch, q, k, v = make_batch(
        ForwardMode.EXTEND, SPLIT_PREFIX[:seqs], SPLIT_EXTEND[:seqs], page_size=page_size,
        num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, head_dim=32, dtype=torch.float32,
        seed=100 + splits,
    )  # fmt: skip
    kb, vb, args = extend_kernel_args(batch, q, k, v)
    max_ext = max(SPLIT_EXTEND[:seqs])
    ref = K.extend_attention_ref(q, kb, vb, torch.empty_like(q), *args, max_ext,
                                 page_size=page_size)  # fmt: skip
    one_pass = torch.full_like(q, float("nan"))
    K.extend_attention(q, kb, vb, one_pass, *args, max_ext, page_size=page_size)
    mid_o, mid_lse = poisoned_scratch(q.shape[0], num_q_heads, splits, 32)
    out = torch.full_like(q, float("nan"))
    K.extend_attention(q, kb, vb, out, *args, max_ext, page_size=page_size,
                       num_kv_splits=splits, mid_o=mid_o, mid_lse=mid_lse)  # fmt: skip
    assert not out.isnan().any(), "unwritten output, or NaN from an empty split"
    assert rel_err(out, ref) < 1e-5, rel_err(out, ref)
    assert rel_err(out, one_pass) < 1e-5, rel_err(out, one_pass)


@pytest.mark.parametrize(("page_size", "splits"), [(1, 3), (16, 2), (64, 5), (4, 32)])
def test_extend_carry_bitwise(page_size: int, splits: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The extend kernels (one pass and split-KV) give the same bits with the key loop's page
    lookup a step ahead and in the step (``CARRY_SLOTS``), and match the reference."""
    batch, q, k, v = make_batch(
        ForwardMode.EXTEND, SPLIT_PREFIX, SPLIT_EXTEND, page_size=page_size, num_q_heads=4,
        num_kv_heads=2, head_dim=32, dtype=torch.float32, seed=200 + page_size,
    )  # fmt: skip
    kb, vb, args = extend_kernel_args(batch, q, k, v)
    max_ext = max(SPLIT_EXTEND)
    ref = K.extend_attention_ref(q, kb, vb, torch.empty_like(q), *args, max_ext,
                                 page_size=page_size)  # fmt: skip
    outs: dict[tuple[int, bool], torch.Tensor] = {}
    for carry in (False, True):
        monkeypatch.setattr(K, "CARRY_SLOTS", carry)
        for n in (1, splits):
            mid_o, mid_lse = poisoned_scratch(q.shape[0], 4, splits, 32)
            out = torch.full_like(q, float("nan"))
            K.extend_attention(q, kb, vb, out, *args, max_ext, page_size=page_size,
                               num_kv_splits=n, mid_o=mid_o, mid_lse=mid_lse)  # fmt: skip
            outs[n, carry] = out
    for n in (1, splits):
        assert rel_err(outs[n, False], ref) < 1e-5, (n, rel_err(outs[n, False], ref))
        assert torch.equal(outs[n, True], outs[n, False]), n


def test_extend_split_head_blocks_and_tiles() -> None:
    """A GQA group wider than the tile (32 q heads on one kv head, 16-row tiles: two head blocks
    per kv head), then the GPU's fp32 tiles (64 rows x 32 keys), with scratch allocated by the
    call and a grid bound above the longest extend."""
    prefix, extend = [40, 0, 7], [3, 9, 1]
    for hq, hkv, d, cfg in (
        (32, 1, 16, None),
        (8, 2, 32, K.KernelConfig(64, 32, 4, 2)),
    ):
        batch, q, k, v = make_batch(
            ForwardMode.EXTEND, prefix, extend, page_size=8, num_q_heads=hq, num_kv_heads=hkv,
            head_dim=d, dtype=torch.float32, seed=hq,
        )  # fmt: skip
        kb, vb, args = extend_kernel_args(batch, q, k, v)
        ref = K.extend_attention_ref(q, kb, vb, torch.empty_like(q), *args, 9, page_size=8)
        out = torch.full_like(q, float("nan"))
        K.extend_attention(q, kb, vb, out, *args, 20, page_size=8, num_kv_splits=3, config=cfg)
        assert not out.isnan().any() and rel_err(out, ref) < 1e-5, rel_err(out, ref)


def test_extend_split_graph_style_replay() -> None:
    """As a CUDA-graph replay would run it: one fixed grid (batch rows, max extend, splits) and
    fixed poisoned scratch, a padded row with no new tokens, block table and lengths rewritten
    in place between launches (other prefixes, other extends up to the bound)."""
    hq, hkv, d, ps, splits, max_ext = 4, 2, 32, 8, 6, 12
    shapes = (([50, 0, 3, 0], [12, 5, 1, 0]), ([2, 90, 0, 0], [7, 12, 12, 0]))
    mid_o, mid_lse = poisoned_scratch(40, hq, 8, d)
    for prefix, extend in shapes:
        batch, q, k, v = make_batch(
            ForwardMode.EXTEND, prefix, extend, page_size=ps, num_q_heads=hq, num_kv_heads=hkv,
            head_dim=d, dtype=torch.float32, seed=sum(prefix), table_pad=4,
        )  # fmt: skip
        kb, vb, args = extend_kernel_args(batch, q, k, v)
        ref = K.extend_attention_ref(q, kb, vb, torch.empty_like(q), *args, max_ext,
                                     page_size=ps)  # fmt: skip
        out = torch.full_like(q, float("nan"))
        K.extend_attention(q, kb, vb, out, *args, max_ext, page_size=ps, num_kv_splits=splits,
                           mid_o=mid_o, mid_lse=mid_lse)  # fmt: skip
        assert not out.isnan().any() and rel_err(out, ref) < 1e-5, rel_err(out, ref)


def test_extend_split_argument_checks() -> None:
    batch, q, k, v = make_batch(
        ForwardMode.EXTEND, [5], [3], page_size=4, num_q_heads=4, num_kv_heads=2, head_dim=16,
        dtype=torch.float32, seed=1,
    )  # fmt: skip
    kb, vb, args = extend_kernel_args(batch, q, k, v)
    out = torch.empty_like(q)
    with pytest.raises(ValueError, match="num_kv_splits"):
        K.extend_attention(q, kb, vb, out, *args, 3, page_size=4, num_kv_splits=0)
    mid_o, mid_lse = K.extend_scratch(3, 4, 2, 16, DEVICE)
    with pytest.raises(ValueError, match="too small"):
        K.extend_attention(q, kb, vb, out, *args, 3, page_size=4, num_kv_splits=3, mid_o=mid_o,
                           mid_lse=mid_lse)  # fmt: skip


def test_extend_split_tiles() -> None:
    f = K.extend_split_tiles
    assert f(8, 64, 128) == (16, 8)  # the whole group, 16 queries
    assert f(8, 1, 128) == (2, 8)  # one query, padded to tl.dot's 16 rows
    assert f(1, 64, 128) == (64, 1)  # no more queries than the extend needs
    assert f(1, 1000, 128) == (128, 1)
    assert f(6, 64, 128) == (16, 8)  # group padded to a power of two
    assert f(32, 64, 16) == (1, 16)  # a group wider than the tile: head blocks
    assert f(4, 64, 64) == (16, 4)
    with pytest.raises(ValueError):
        f(8, 64, 96)


def test_default_extend_split_config_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU tiles of the packed kernel (the interpreter's are fixed): 256 rows once the
    extend has 2048 rows (tokens x group), 128 below; fp32 and head_dim 256 small tiles."""
    monkeypatch.setattr(K, "INTERPRETED", False)
    f, bf16 = K.default_extend_split_config, torch.bfloat16
    tall, short = K.KernelConfig(256, 64, 8, 3), K.KernelConfig(128, 64, 8, 3)
    assert f(128, bf16, 256, 8) == f(128, bf16, 4096, 8) == f(128, bf16, 512, 4) == tall
    assert f(128, bf16, 255, 8) == f(128, bf16, 511, 4) == f(128, bf16, 64, 8) == short
    assert f(128, bf16) == short  # no length given: the short extends' tiles
    assert f(128, torch.float32, 4096, 8) == K.KernelConfig(64, 32, 8, 2)
    assert f(256, bf16, 4096, 8) == K.KernelConfig(64, 32, 8, 2)
    assert f(64, torch.float32, 4096, 8) == K.KernelConfig(64, 32, 4, 2)


def test_packed_one_pass_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    assert K.packed_one_pass(32, 4) and K.packed_one_pass(8, 4) and K.packed_one_pass(32, 1)
    assert not K.packed_one_pass(4, 4)  # MHA: nothing to pack
    assert not K.packed_one_pass(6, 1)  # a group padded to 8 rows would waste a quarter
    monkeypatch.setattr(K, "PACKED_EXTEND", False)
    assert not K.packed_one_pass(32, 4)


@pytest.mark.parametrize(
    ("num_q_heads", "num_kv_heads", "packed"),
    [(8, 1, True), (8, 2, True), (6, 1, False), (2, 2, False)],
)
def test_packed_one_pass_matches_ref(
    num_q_heads: int, num_kv_heads: int, packed: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A one-split extend with default tiles runs the packed kernel at a power-of-two GQA
    group (one launch, query blocks last-first, no stage 2), the per-head kernel otherwise;
    both match the reference, with a grid bound above the longest extend and sequences from
    no prefix to several pages of one."""
    launches: list[bool] = []
    real = K._launch_packed_stage1

    def spy(*args, reverse: bool = False, **kwargs):
        launches.append(reverse)
        return real(*args, reverse=reverse, **kwargs)

    monkeypatch.setattr(K, "_launch_packed_stage1", spy)
    batch, q, k, v = make_batch(
        ForwardMode.EXTEND, SPLIT_PREFIX, SPLIT_EXTEND, page_size=16, num_q_heads=num_q_heads,
        num_kv_heads=num_kv_heads, head_dim=32, dtype=torch.float32, seed=7 + num_q_heads,
    )  # fmt: skip
    kb, vb, args = extend_kernel_args(batch, q, k, v)
    ref = K.extend_attention_ref(q, kb, vb, torch.empty_like(q), *args, 40, page_size=16)
    out = torch.full_like(q, float("nan"))
    K.extend_attention(q, kb, vb, out, *args, 48, page_size=16)
    assert launches == ([True] if packed else [])
    assert not out.isnan().any() and rel_err(out, ref) < 1e-5, rel_err(out, ref)
    # A config given pins the per-head kernel.
    per_head = torch.full_like(q, float("nan"))
    K.extend_attention(q, kb, vb, per_head, *args, 48, page_size=16,
                       config=K.default_extend_config(32, torch.float32, 40))  # fmt: skip
    assert launches == ([True] if packed else [])
    assert rel_err(per_head, out) < 1e-5, rel_err(per_head, out)


def test_choose_extend_kv_splits() -> None:
    f = K.choose_extend_kv_splits
    # Qwen3-30B-A3B (32 q / 4 kv heads), one sequence, 64 new tokens: 32 one-pass programs;
    # split tiles of 16 queries x 8 heads give 4 x 4 = 16 programs a split, 132 // 16 = 8.
    assert f(1, 32, 4, 64, 32768 + 64) == 8
    assert f(1, 32, 4, 64, 81920 + 64) == 8
    assert f(1, 32, 4, 64, 32768, programs_per_sm=2) == 16
    assert f(1, 32, 4, 64, 2048) == 4  # 512 keys a split at least
    assert f(1, 32, 4, 64, 2048, min_split_len=256) == 8
    assert f(1, 32, 4, 64, 1000) == 1  # KV too short to split
    assert f(1, 32, 4, 64, 64) == 1
    # One query tile (up to 16 queries here): 4 programs a split, four waves' worth of them:
    # 528 // 4 = 132 splits, bounded by max_splits, or by 512 keys a split.
    assert f(1, 32, 4, 1, 81920) == f(1, 32, 4, 16, 65536 + 16) == 128
    assert f(1, 32, 4, 1, 32768) == 64
    assert f(1, 32, 4, 1, 81920, single_tile_programs_per_sm=1) == 33
    assert f(1, 32, 4, 1, 32768, max_splits=8) == 8
    assert f(1, 32, 4, 17, 65536) == 16  # two tiles: 8 programs a split, one wave
    assert f(2, 32, 4, 64, 32768) == 4  # 64 one-pass programs; 32 a split
    # 96 one-pass programs; 48 a split fit twice: as many programs, each over half the keys.
    assert f(3, 32, 4, 64, 32768) == 2
    assert f(8, 32, 4, 64, 32768) == 1  # 256 one-pass programs fill 132 SMs
    assert f(1, 32, 4, 8192, 81920) == 1  # a long extend fills the GPU by itself
    # 4 x 32 = 128 one-pass programs; 32 x 4 = 128 a split, so one wave holds one split, but
    # two (two programs an SM) measured faster than one pass: 2, if the keys allow.
    assert f(1, 32, 4, 512, 32768) == f(2, 32, 4, 256, 32768) == 2
    assert f(1, 32, 4, 512, 1000) == 1 and f(1, 32, 4, 512, 32768, max_splits=1) == 1
    assert f(1, 32, 4, 256, 32768) == 2  # 64 one-pass; 16 x 4 = 64 a split
    # 513 new tokens and more: 160+ one-pass programs fill the GPU, and one pass measured
    # faster than 2 / 4 / 8 splits at 1024 and 2048 tokens: 1.
    assert f(1, 32, 4, 513, 81920) == f(1, 32, 4, 1024, 81920) == f(1, 32, 4, 2048, 32768) == 1
    # MHA: one tile of 64 queries per head, 8 programs a split; four waves: 528 // 8 = 66, and
    # 512 keys a split at least: 64. With 129 queries, two tiles and one wave: 132 // 16 = 8.
    assert f(1, 8, 8, 64, 32768) == 64
    assert f(1, 8, 8, 129, 32768) == 8
    assert f(1, 32, 4, 64, 32768, num_sms=264) == 16
    assert f(1, 32, 4, 64, 32768, block_rows=64) == 4  # 8 x 4 = 32 programs a split
    assert f(1, 32, 4, 64, 32768, block_rows=16) == 2  # 32 x 4 = 128 programs a split
    # The 256-row tiles of 256+ new tokens at GQA 8 (32 queries x 8 heads): 256 tokens, 8 x 4 =
    # 32 programs a split, 4 splits; 512 tokens, 64 a split, 2 (both measured best on an H200).
    assert f(1, 32, 4, 256, 32768 + 256, block_rows=256) == 4
    assert f(1, 32, 4, 512, 81920 + 512, block_rows=256) == 2
    assert f(0, 32, 4, 64, 32768) == f(1, 32, 4, 0, 32768) == 1


def test_extend_backend_splits_and_graph_hooks() -> None:
    """The backend picks split-KV for a short extend over a (relatively) long prefix, matches
    the torch backend, and keeps frozen scratch in place for captured extends."""
    backend = TritonAttention(min_extend_split_len=16)
    prefix, extend = [90, 0], [5, 9]
    batch, q, k, v = make_batch(
        ForwardMode.EXTEND, prefix, extend, page_size=4, num_q_heads=8, num_kv_heads=2,
        head_dim=32, dtype=torch.float32, seed=17,
    )  # fmt: skip
    # 16 one-pass programs; interpreter tiles of 4 queries x 4 heads: 2 x 3 x 2 = 12 programs a
    # split, 132 // 12 = 11, but 95 keys // 16 = 5 at most.
    assert backend.extend_splits_for(2, 9, 95, num_q_heads=8, num_kv_heads=2, head_dim=32,
                                     dtype=torch.float32, device=DEVICE) == 5  # fmt: skip
    check_backend(batch, q, k, v, backend)
    assert batch.attn_metadata.extend_kv_splits == 5

    # A captured shape: 14 tokens x 7 splits reserved and frozen; prepare_extend_graph fixes
    # the grid (max extend 16) and the split count.
    backend.reserve_extend_scratch(14, 7, num_q_heads=8, head_dim=32, device=DEVICE)
    scratch = backend._extend_scratch.mid_o.data_ptr()
    backend.prepare_extend_graph(batch, 16, 7)
    out = torch.full_like(q, float("nan"))
    backend.attend(q, LAYER, batch, SCALE, out=out)
    assert backend._extend_scratch.mid_o.data_ptr() == scratch
    assert not out.isnan().any() and rel_err(out, reference(batch, q)) < 1e-4
    with pytest.raises(RuntimeError, match="frozen"):
        backend.prepare_extend_graph(batch, 16, 8)
        backend.attend(q, LAYER, batch, SCALE)
    # An eager step that would want more splits than the frozen scratch holds takes fewer.
    backend.min_extend_split_len = 8  # the heuristic now wants 11
    backend.prepare(batch)
    backend.attend(q, LAYER, batch, SCALE, out=out)
    assert batch.attn_metadata.extend_kv_splits == 7
    assert backend._extend_scratch.mid_o.data_ptr() == scratch
    assert rel_err(out, reference(batch, q)) < 1e-4


def test_packed_one_pass_scratch_in_the_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    """A one-split extend at GQA through the backend: its float32 results go to the split
    scratch when that already holds them (the reserved, frozen scratch of captured extends:
    same address), else to a buffer of the call's own; the output matches the reference
    either way."""
    seen: list[int] = []
    real = K._launch_packed_stage1

    def spy(q, k_buf, v_buf, mid_o, *args, **kwargs):
        seen.append(mid_o.data_ptr())
        return real(q, k_buf, v_buf, mid_o, *args, **kwargs)

    monkeypatch.setattr(K, "_launch_packed_stage1", spy)
    backend = TritonAttention(max_extend_splits=1)  # every extend in one pass
    batch, q, k, v = make_batch(
        ForwardMode.EXTEND, [30, 0], [5, 9], page_size=4, num_q_heads=8, num_kv_heads=2,
        head_dim=32, dtype=torch.float32, seed=31,
    )  # fmt: skip
    backend.reserve_extend_scratch(14, 1, num_q_heads=8, head_dim=32, device=DEVICE)
    scratch = backend._extend_scratch.mid_o.data_ptr()
    check_backend(batch, q, k, v, backend)
    assert seen and set(seen) == {scratch}
    # 14 tokens do not fit a frozen scratch of 10 rows: the call's own buffer, and the
    # scratch stays as it was.
    small = TritonAttention(max_extend_splits=1)
    small.reserve_extend_scratch(10, 1, num_q_heads=8, head_dim=32, device=DEVICE)
    scratch = small._extend_scratch.mid_o.data_ptr()
    seen.clear()
    out = torch.full_like(q, float("nan"))
    small.prepare(batch)
    small.attend(q, LAYER, batch, SCALE, out=out)
    assert seen and scratch not in seen
    assert small._extend_scratch.rows == 10 and small._extend_scratch.mid_o.data_ptr() == scratch
    assert not out.isnan().any() and rel_err(out, reference(batch, q)) < 1e-4


# ------------------------------------------------------------------------ dense prefill path

# Sequences aligned to the dense path's default block are too slow for the interpreter, so the
# CPU tests lower the block to 16; on CPU the dense calls run the float32 reference of
# attention_with_lse, on CUDA (bf16) cuDNN. Pages of 4 and 1 token, so page runs still differ.
DENSE_PREFIX = [0, 32, 128, 16]
DENSE_EXTEND = [16, 64, 16, 48]


@pytest.mark.parametrize("native_gqa", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("page_size", [1, 4])
def test_dense_extend_matches_torch(
    page_size: int, group: int, dtype: torch.dtype, native_gqa: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    from kvtier.kernels import dense_attention

    # Both ways of handling grouped heads: as they are, or repeated / folded.
    monkeypatch.setattr(dense_attention, "NATIVE_GQA", native_gqa)
    batch, q, k, v = make_batch(
        ForwardMode.EXTEND, DENSE_PREFIX, DENSE_EXTEND, page_size=page_size,
        num_q_heads=2 * group, num_kv_heads=2, head_dim=64, dtype=dtype, seed=7 + page_size,
    )  # fmt: skip
    check_backend(batch, q, k, v, TritonAttention(dense_prefill=True, dense_block=16))


@pytest.mark.parametrize("heads", [32, 5])
def test_merge_two_kernel_matches_torch(heads: int) -> None:
    from kvtier.kernels.dense_attention import merge_two

    g = torch.Generator().manual_seed(heads)
    n, d = 6, 32
    o_a, o_b = (torch.randn(n, heads, d, generator=g).to(DEVICE) for _ in range(2))
    # lse as [H, n] transposed (the strided views the dense path passes), far apart and close.
    lse_a = (torch.randn(heads, n, generator=g) * 4).to(DEVICE).t()
    lse_b = (torch.randn(heads, n, generator=g) * 4).to(DEVICE).t()
    ref = merge_two(torch.empty(n, heads, d, device=DEVICE), o_a, lse_a, o_b, lse_b,
                    use_triton=False)  # fmt: skip
    w_a = torch.sigmoid(lse_a - lse_b)[..., None]  # the same weights, computed another way
    torch.testing.assert_close(ref, o_a * w_a + o_b * (1 - w_a), rtol=1e-5, atol=1e-5)
    out = torch.full((n, heads, d), float("nan"), device=DEVICE)
    merge_two(out, o_a, lse_a, o_b, lse_b, use_triton=True)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_dense_prefill_dispatch(monkeypatch: pytest.MonkeyPatch) -> None:
    """The dense path takes an EXTEND batch only when every sequence's new tokens and prefix
    are block-aligned (and it has new tokens)."""
    import kvtier.attention.triton_backend as TB

    calls: list[list[int]] = []
    real = TB.dense_extend_attention

    def spy(*args, **kwargs):
        calls.append(list(args[6]))  # extend_lens
        return real(*args, **kwargs)

    monkeypatch.setattr(TB, "dense_extend_attention", spy)

    def run(prefix: list[int], extend: list[int], backend: TritonAttention) -> None:
        batch, q, k, v = make_batch(
            ForwardMode.EXTEND, prefix, extend, page_size=4, num_q_heads=4, num_kv_heads=2,
            head_dim=32, dtype=torch.float32, seed=3,
        )  # fmt: skip
        check_backend(batch, q, k, v, backend)

    run(DENSE_PREFIX, DENSE_EXTEND, TritonAttention(dense_prefill=True, dense_block=32))
    assert calls == [], "16 new tokens are not a multiple of the block of 32"
    run([0, 8], [16, 16], TritonAttention(dense_prefill=True, dense_block=16))
    assert calls == [], "a prefix of 8 is not a multiple of the block of 16"
    run(DENSE_PREFIX, DENSE_EXTEND, TritonAttention(dense_prefill=True, dense_block=16))
    assert calls == [DENSE_EXTEND, DENSE_EXTEND]  # forward() and the checked attend()
    calls.clear()
    run(DENSE_PREFIX, DENSE_EXTEND, TritonAttention(dense_prefill=False, dense_block=16))
    assert calls == []
    batch, q, _, _ = make_batch(
        ForwardMode.EXTEND, [0], [16], page_size=4, num_q_heads=4, num_kv_heads=2, head_dim=32,
        dtype=torch.float32, seed=3,
    )  # fmt: skip
    # auto: cuDNN only, in bf16/fp16; never for fp32 (tests' dtype) nor on CPU.
    assert TritonAttention(dense_block=16).use_dense_prefill(q, batch) is False
    with pytest.raises(ValueError, match="dense_block must be >= 1; got 0"):
        TritonAttention(dense_block=0)


def test_prebuild_dense_runs_each_chunk_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    """The warm-up's prebuild runs the dense calls of a full chunk after every chunk-multiple
    prefix that fits, on the shapes the real path makes (a gathered [S, Hkv, D] sequence)."""
    from kvtier.kernels import dense_attention as DA

    seen: list[tuple[int, int, int]] = []
    real = DA._parts

    def spy(qs, k_seq, v_seq, prefix, scale):
        assert k_seq.is_contiguous() and k_seq.shape[1:] == (2, 32)
        seen.append((qs.shape[0], k_seq.shape[0], prefix))
        return real(qs, k_seq, v_seq, prefix, scale)

    monkeypatch.setattr(DA, "_parts", spy)
    backend = TritonAttention(dense_prefill=True, dense_block=16)
    args = (4, 2, 32, torch.float32, torch.device(DEVICE))
    assert backend.prebuild_dense(*args, chunk=32, max_len=100) == 3
    assert seen == [(32, 32, 0), (32, 64, 32), (32, 96, 64)]
    seen.clear()
    assert backend.prebuild_dense(*args, chunk=24, max_len=100) == 0  # not block-aligned
    assert TritonAttention(dense_prefill=False).prebuild_dense(*args, 32, 100) == 0
    # auto: only where cuDNN would run (never float32, never on CPU).
    assert TritonAttention(dense_block=16).prebuild_dense(*args, 32, 100) == 0
    assert seen == []


def test_prefill_attention_backend_flag() -> None:
    from kvtier.runner.model_runner import make_attention_backend
    from kvtier.server_args import ServerArgs, ServerArgsError

    assert make_attention_backend("triton", DEVICE, "cudnn").dense_prefill is True
    assert make_attention_backend("triton", DEVICE, "triton").dense_prefill is False
    assert make_attention_backend("triton", DEVICE, "auto").dense_prefill is None
    with pytest.raises(
        ServerArgsError,
        match=re.escape(
            "--prefill-attention-backend must be one of auto, triton, cudnn; got 'flash'"
        ),
    ):
        ServerArgs(model_path="builtin:tiny-qwen3", prefill_attention_backend="flash")


# ------------------------------------------------------------------------------ CUDA only

cuda_only = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")


@cuda_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("page_size", [1, 64])
def test_model_sized_shapes_cuda(page_size: int, dtype: torch.dtype) -> None:
    """Qwen3-30B-A3B geometry (32 q heads, 4 kv heads, head_dim 128), long and ragged."""
    prefix = [0, 1000, 3001, 0, 257]
    extend = [700, 1, 130, 129, 1024]
    batch, q, k, v = make_batch(
        ForwardMode.EXTEND, prefix, extend, page_size=page_size, num_q_heads=32,
        num_kv_heads=4, head_dim=128, dtype=dtype, seed=page_size,
    )  # fmt: skip
    check_backend(batch, q, k, v, TritonAttention())
    seq_lens = [1, 4097, 999, 64, 20000, 3]
    batch, q, k, v = make_batch(
        ForwardMode.DECODE, [s - 1 for s in seq_lens], [1] * len(seq_lens),
        page_size=page_size, num_q_heads=32, num_kv_heads=4, head_dim=128, dtype=dtype,
        seed=page_size + 1,
    )  # fmt: skip
    check_backend(batch, q, k, v, TritonAttention())


@cuda_only
@pytest.mark.parametrize("head_dim", [64, 256])
def test_other_head_dims_cuda(head_dim: int) -> None:
    for mode, prefix, ext in (
        (ForwardMode.EXTEND, [0, 300], [333, 77]),
        (ForwardMode.DECODE, [5000, 12], [1, 1]),
    ):
        batch, q, k, v = make_batch(
            mode, prefix, ext, page_size=16, num_q_heads=16, num_kv_heads=2,
            head_dim=head_dim, dtype=torch.bfloat16, seed=head_dim,
        )  # fmt: skip
        check_backend(batch, q, k, v, TritonAttention())


@cuda_only
def test_decode_cuda_graph_replay() -> None:
    """Capture decode attend once; replay with new q, seq lens and pages in static buffers."""
    hq, hkv, d, ps, bs = 32, 4, 128, 16, 8
    backend = TritonAttention()
    backend.init_cuda_graph_state(bs, hq, hkv, d, max_context_len=8192, device=DEVICE)
    lens_a = [100, 5000, 1, 17, 8000, 64, 333, 2048]
    lens_b = [8100, 3, 77, 4096, 1, 1000, 65, 5]
    batch, q, k, v = make_batch(
        ForwardMode.DECODE, [s - 1 for s in lens_a], [1] * bs, page_size=ps, num_q_heads=hq,
        num_kv_heads=hkv, head_dim=d, dtype=torch.bfloat16, seed=21, table_pad=16,
    )  # fmt: skip
    batch.kv_pool.write(LAYER, batch.out_cache_loc, k, v)
    backend.prepare_graph(batch)
    out = torch.empty_like(q)
    backend.attend(q, LAYER, batch, SCALE, out=out)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        backend.attend(q, LAYER, batch, SCALE, out=out)
    for lens in (lens_a, lens_b):
        # New pages for every row (the pool's random contents stand in for their KV).
        g = torch.Generator().manual_seed(sum(lens))
        perm = (torch.randperm(batch.kv_pool.num_pages - 1, generator=g) + 1).tolist()
        table = torch.zeros(batch.block_table.shape, dtype=torch.int32)
        used = 0
        for b, n in enumerate(lens):
            pages = (n + ps - 1) // ps
            table[b, :pages] = torch.tensor(perm[used : used + pages], dtype=torch.int32)
            used += pages
        batch.block_table.copy_(table)
        batch.seq_lens.copy_(torch.tensor(lens, dtype=torch.int32))
        batch.seq_lens_cpu = lens
        q.copy_(torch.randn(q.shape, generator=g))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert not out.isnan().any()
        assert rel_err(out, reference(batch, q)) < 1e-2


@cuda_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("page_size", [1, 64])
def test_extend_split_model_sized_cuda(page_size: int, dtype: torch.dtype) -> None:
    """Split-KV extend on the Qwen3-30B-A3B geometry: ragged prefixes (one long, one empty) and
    extends (1, 64, not a block multiple), several split counts; then the backend, which must
    pick split-KV for one short extend after a long prefix."""
    prefix, extend = [20000, 0, 3001, 257], [64, 1, 130, 1]
    batch, q, k, v = make_batch(
        ForwardMode.EXTEND, prefix, extend, page_size=page_size, num_q_heads=32,
        num_kv_heads=4, head_dim=128, dtype=dtype, seed=page_size + 7,
    )  # fmt: skip
    kb, vb, args = extend_kernel_args(batch, q, k, v)
    ref = K.extend_attention_ref(q, kb, vb, torch.empty_like(q), *args, 130,
                                 page_size=page_size)  # fmt: skip
    for splits in (2, 8, 32):
        out = torch.full_like(q, float("nan"))
        K.extend_attention(q, kb, vb, out, *args, 130, page_size=page_size, num_kv_splits=splits)
        assert not out.isnan().any() and rel_err(out, ref) < TOL[dtype], (splits, rel_err(out, ref))
    batch, q, k, v = make_batch(
        ForwardMode.EXTEND, [30000], [64], page_size=page_size, num_q_heads=32, num_kv_heads=4,
        head_dim=128, dtype=dtype, seed=page_size + 8,
    )  # fmt: skip
    check_backend(batch, q, k, v, TritonAttention())
    assert batch.attn_metadata.extend_kv_splits > 1


@cuda_only
@pytest.mark.parametrize("page_size", [1, 64])
def test_extend_carry_bitwise_cuda(page_size: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Qwen3-30B-A3B geometry in bf16 (the tiles and pipelines the engine runs): the one-pass
    and split-KV extend kernels give the same bits with the page lookup a step ahead and in
    the step."""
    prefix, extend = [20000, 0, 3001], [64, 700, 130]
    batch, q, k, v = make_batch(
        ForwardMode.EXTEND, prefix, extend, page_size=page_size, num_q_heads=32,
        num_kv_heads=4, head_dim=128, dtype=torch.bfloat16, seed=page_size + 9,
    )  # fmt: skip
    kb, vb, args = extend_kernel_args(batch, q, k, v)
    for splits in (1, 8):
        outs = []
        for carry in (False, True):
            monkeypatch.setattr(K, "CARRY_SLOTS", carry)
            out = torch.full_like(q, float("nan"))
            K.extend_attention(q, kb, vb, out, *args, 700, page_size=page_size,
                               num_kv_splits=splits)  # fmt: skip
            outs.append(out)
        assert not outs[0].isnan().any()
        assert torch.equal(outs[0], outs[1]), (splits, (outs[0] - outs[1]).abs().max().item())


@cuda_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_packed_one_pass_model_sized_cuda(dtype: torch.dtype) -> None:
    """The packed one-pass extend at the Qwen3-30B-A3B geometry with the GPU's tiles (256 rows
    for these lengths): no prefix and long extends (causal blocks visited last-first), ragged
    prefixes, a grid bound above the longest extend; against the reference and the per-head
    kernel."""
    prefix, extend = [0, 9000, 3001], [2048, 700, 513]
    batch, q, k, v = make_batch(
        ForwardMode.EXTEND, prefix, extend, page_size=64, num_q_heads=32, num_kv_heads=4,
        head_dim=128, dtype=dtype, seed=23,
    )  # fmt: skip
    kb, vb, args = extend_kernel_args(batch, q, k, v)
    assert K.default_extend_split_config(128, dtype, 2048, 8).block_m == 256
    ref = K.extend_attention_ref(q, kb, vb, torch.empty_like(q), *args, 2048, page_size=64)
    out = torch.full_like(q, float("nan"))
    K.extend_attention(q, kb, vb, out, *args, 2100, page_size=64)
    assert not out.isnan().any() and rel_err(out, ref) < TOL[dtype], rel_err(out, ref)
    per_head = torch.full_like(q, float("nan"))
    K.extend_attention(q, kb, vb, per_head, *args, 2048, page_size=64,
                       config=K.default_extend_config(128, dtype, 2048))  # fmt: skip
    assert rel_err(per_head, ref) < TOL[dtype], rel_err(per_head, ref)


@cuda_only
def test_extend_split_cuda_graph_replay() -> None:
    """Capture a split-KV extend attend once (shape: 2 sequences, 81 tokens, extends <= 64, the
    split count fixed for a 16K context); replay with other prefixes, extends, pages."""
    hq, hkv, d, ps, max_ext, max_ctx = 32, 4, 128, 64, 64, 16384
    shape_a = ([9000, 300], [20, 61])
    shape_b = ([5000, 0], [64, 17])
    backend = TritonAttention()
    batch, q, k, v = make_batch(
        ForwardMode.EXTEND, *shape_a, page_size=ps, num_q_heads=hq, num_kv_heads=hkv,
        head_dim=d, dtype=torch.bfloat16, seed=31, table_pad=8,
    )  # fmt: skip
    batch.kv_pool.write(LAYER, batch.out_cache_loc, k, v)
    splits = backend.extend_splits_for(
        2, max_ext, max_ctx, num_q_heads=hq, num_kv_heads=hkv, head_dim=d,
        dtype=torch.bfloat16, device=DEVICE,
    )  # fmt: skip
    assert splits > 1
    backend.reserve_extend_scratch(q.shape[0], splits, num_q_heads=hq, head_dim=d, device=DEVICE)
    backend.prepare_extend_graph(batch, max_ext, splits)
    out = torch.empty_like(q)
    backend.attend(q, LAYER, batch, SCALE, out=out)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        backend.attend(q, LAYER, batch, SCALE, out=out)
    kb, vb = batch.kv_pool.k_buffer(LAYER), batch.kv_pool.v_buffer(LAYER)
    for prefix, extend in (shape_a, shape_b):
        lens = [p + e for p, e in zip(prefix, extend)]
        # New pages for every row (the pool's random contents stand in for their KV).
        g = torch.Generator().manual_seed(sum(lens))
        perm = (torch.randperm(batch.kv_pool.num_pages - 1, generator=g) + 1).tolist()
        table = torch.zeros(batch.block_table.shape, dtype=torch.int32)
        used = 0
        for b, n in enumerate(lens):
            pages = (n + ps - 1) // ps
            table[b, :pages] = torch.tensor(perm[used : used + pages], dtype=torch.int32)
            used += pages
        i32 = lambda xs: torch.tensor(xs, dtype=torch.int32)  # noqa: E731
        batch.block_table.copy_(table)
        batch.seq_lens.copy_(i32(lens))
        batch.extend_lens.copy_(i32(extend))
        batch.prefix_lens.copy_(i32(prefix))
        batch.extend_starts.copy_(i32([0, extend[0]]))
        q.copy_(torch.randn(q.shape, generator=g))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        ref = K.extend_attention_ref(
            q, kb, vb, torch.empty_like(q), batch.block_table, batch.seq_lens, batch.extend_lens,
            batch.extend_starts, batch.prefix_lens, SCALE, max_ext, page_size=ps,
        )  # fmt: skip
        assert not out.isnan().any()
        assert rel_err(out, ref) < 1e-2


@cuda_only
@pytest.mark.parametrize("page_size", [1, 64])
def test_dense_extend_model_sized_cuda(page_size: int) -> None:
    """cuDNN over gathered KV, Qwen3-30B-A3B geometry: aligned chunks after long prefixes."""
    prefix = [0, 4096, 8192]
    extend = [4096, 4096, 8192]
    batch, q, k, v = make_batch(
        ForwardMode.EXTEND, prefix, extend, page_size=page_size, num_q_heads=32,
        num_kv_heads=4, head_dim=128, dtype=torch.bfloat16, seed=11,
    )  # fmt: skip
    backend = TritonAttention()
    assert backend.use_dense_prefill(q, batch), "auto should pick cuDNN on this GPU"
    check_backend(batch, q, k, v, backend)


@cuda_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("page_size", [1, 64])
def test_decode_prefetch_bitwise_cuda(
    page_size: int, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Qwen3-30B-A3B geometry: batch 1 at 4K (64 splits of one key block: what the prefetch
    is for) and a ragged batch with an empty row. The prefetch path gives the plain path's
    bits."""
    for seq_lens in ([4096], [1, 4097, 999, 64, 20000, 3, 0]):
        q, kb, vb, table, seq = decode_kernel_inputs(
            seq_lens, page_size=page_size, hq=32, hkv=4, d=128, dtype=dtype,
            seed=page_size + len(seq_lens),
        )  # fmt: skip
        splits = K.choose_num_kv_splits(len(seq_lens), 4, max(seq_lens))
        ref = K.decode_attention_ref(
            q, kb, vb, torch.empty_like(q), table, seq, SCALE, page_size=page_size
        )
        outs = decode_variants(q, kb, vb, table, seq, splits, page_size, monkeypatch)
        base = outs[0][1]
        assert not base.isnan().any() and rel_err(base, ref) < TOL[dtype], rel_err(base, ref)
        for variant, out in outs[1:]:
            assert torch.equal(out, base), (seq_lens, variant, (out - base).abs().max().item())


@cuda_only
def test_decode_after_kv_store_in_a_pdl_graph_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """The prefetch's precondition in use, as in a model's decode step: per layer the fused q/k
    norm + RoPE kernel writes q and the newest key's K/V, and decode attention runs right after
    it. In a CUDA graph with PDL (stage 1 then loads its first key block before it waits), with
    the newest keys' slots poisoned before each replay so that reading them before the wait
    would show, every replay gives the bits of the same chain run eagerly without PDL."""
    from kvtier.kernels import fused

    if torch.cuda.get_device_capability()[0] < 9 or not fused.PDL_ENABLED:
        pytest.skip("needs PDL (sm_90+, KVTIER_PDL not 0)")
    hq, hkv, d, ps, layers = 32, 4, 128, 64, 4
    seq_lens = [4096, 300, 1]
    bs = len(seq_lens)
    g = torch.Generator(device="cuda").manual_seed(5)

    def rnd(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g, device="cuda") * scale).to(torch.bfloat16)

    pages = [(n + ps - 1) // ps for n in seq_lens]
    slots = (sum(pages) + 1) * ps
    perm = torch.randperm(sum(pages), generator=g, device="cuda").to(torch.int32) + 1
    table = torch.zeros(bs, max(pages), dtype=torch.int32, device="cuda")
    used = 0
    for b, n in enumerate(pages):
        table[b, :n] = perm[used : used + n]
        used += n
    seq = torch.tensor(seq_lens, dtype=torch.int32, device="cuda")
    pos = (seq - 1).long()
    loc = table[torch.arange(bs, device="cuda"), pos // ps].long() * ps + pos % ps
    k_caches = [rnd(slots, hkv, d) for _ in range(layers)]
    v_caches = [rnd(slots, hkv, d) for _ in range(layers)]
    qkv = [rnd(bs, (hq + 2 * hkv) * d) for _ in range(layers)]
    qn, kn = 1 + rnd(d, scale=0.1), 1 + rnd(d, scale=0.1)
    inv_freq = 1.0 / (1e6 ** (torch.arange(0, d, 2, device="cuda").float() / d))
    splits = K.choose_num_kv_splits(bs, hkv, max(seq_lens))
    mid_o, mid_lse = K.decode_scratch(bs, hq, splits, d, "cuda")
    outs = [torch.empty(bs, hq, d, dtype=torch.bfloat16, device="cuda") for _ in range(layers)]

    def step() -> None:
        for i in range(layers):
            q = fused.qk_norm_rope_store(
                qkv[i], qn, kn, pos, inv_freq, hq, hkv, d, 1e-6, True, k_caches[i],
                v_caches[i], loc,
            )  # fmt: skip
            K.decode_attention(
                q, k_caches[i], v_caches[i], outs[i], table, seq, SCALE, splits, page_size=ps,
                mid_o=mid_o, mid_lse=mid_lse,
            )  # fmt: skip

    def poison() -> None:
        for kc, vc in zip(k_caches, v_caches):
            kc[loc] = 100.0
            vc[loc] = -100.0

    monkeypatch.setattr(fused, "PDL_ENABLED", False)
    poison()
    step()
    expected = [o.clone() for o in outs]
    monkeypatch.setattr(fused, "PDL_ENABLED", True)
    poison()
    step()  # eager with PDL; compiles the PDL variants outside the capture
    assert all(torch.equal(o, e) for o, e in zip(outs, expected))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for _ in range(3):
        poison()
        for o in outs:
            o.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert all(torch.equal(o, e) for o, e in zip(outs, expected))
