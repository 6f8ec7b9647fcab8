"""ScheduleBatch.to_forward_batch: exact token positions, KV slots, lengths and logits rows for
decode and for extends mixing short (plain-integer path) and long (tensor path) requests; and
the detokenizer's fast decode path."""

import random

import pytest
import torch

from kvtier.attention.torch_backend import TorchAttention
from kvtier.cache.kv_pool import KVPool, ReqToPageTable
from kvtier.runner.forward_batch import ForwardMode
from kvtier.sampling_params import SamplingParams
from kvtier.scheduler import batch as batch_mod
from kvtier.scheduler.batch import ScheduleBatch
from kvtier.scheduler.detokenizer import Detokenizer
from kvtier.scheduler.request import Req

PS = 4


def _req(i: int, tokens: list[int], kv_len: int, pages: list[int], table: ReqToPageTable) -> Req:
    r = Req(rid=str(i), input_ids=tokens, sampling=SamplingParams(max_new_tokens=4))
    r.tokens = list(tokens)
    r.kv_len = kv_len
    r.pages = pages
    r.row = i
    table.set_pages(i, 0, pages)
    return r


def _expected(reqs: list[Req], nums: list[int]) -> tuple[list[int], list[int], list[int]]:
    pos, locs, logits = [], [], []
    for r, n in zip(reqs, nums, strict=True):
        for p in range(r.kv_len, r.kv_len + n):
            pos.append(p)
            locs.append(r.pages[p // PS] * PS + p % PS)
        if r.kv_len + n == len(r.tokens):
            logits.append(len(pos) - 1)
    return pos, locs, logits


def test_forward_batch_fields_short_and_long(monkeypatch):
    # A threshold of 8 makes 3 of these 5 requests take the tensor path, in between the others.
    monkeypatch.setattr(batch_mod, "_PY_SLOTS_MAX", 8)
    pool = KVPool(64, PS, 1, 1, 8, torch.float32, "cpu")
    table = ReqToPageTable(8, 16, "cpu")
    rng = random.Random(0)
    perm = rng.sample(range(1, 64), 60)
    spec = [(33, 3, 30), (25, 20, 5), (12, 0, 9), (40, 1, 39), (17, 4, 13)]  # len, kv, new
    reqs, nums = [], []
    for i, (length, kv, n) in enumerate(spec):
        pages = perm[i * 12 : i * 12 + (length + PS - 1) // PS]
        reqs.append(_req(i, [rng.randrange(100) for _ in range(length)], kv, pages, table))
        nums.append(n)
    fb = ScheduleBatch(ForwardMode.EXTEND, reqs, nums).to_forward_batch(
        pool, table, TorchAttention()
    )
    pos, locs, logits = _expected(reqs, nums)
    assert fb.positions.tolist() == pos
    assert fb.out_cache_loc.tolist() == locs
    assert fb.logits_indices.tolist() == logits == [29, 34, 82, 95]  # not the 9-of-12 chunk
    assert fb.input_ids.tolist() == [
        t for r, n in zip(reqs, nums) for t in r.tokens[r.kv_len :][:n]
    ]
    assert fb.seq_lens.dtype == torch.int32
    assert fb.seq_lens.tolist() == fb.seq_lens_cpu == [33, 25, 9, 40, 17]
    assert fb.prefix_lens_cpu == [3, 20, 0, 1, 4] and fb.extend_lens_cpu == nums
    assert fb.extend_starts.tolist() == [0, 30, 35, 44, 83]
    assert fb.block_table[2, :3].tolist() == reqs[2].pages[:3]

    # Decode: one token each, the plain-integer path only.
    for r in reqs:
        r.kv_len = len(r.tokens) - 1
    fb = ScheduleBatch(ForwardMode.DECODE, reqs, [1] * 5).to_forward_batch(
        pool, table, TorchAttention()
    )
    pos, locs, logits = _expected(reqs, [1] * 5)
    assert fb.positions.tolist() == pos == [32, 24, 11, 39, 16]
    assert fb.out_cache_loc.tolist() == locs and fb.logits_indices.tolist() == [0, 1, 2, 3, 4]
    assert fb.extend_lens is None


def test_detokenizer_fast_path_decodes_as_the_tokenizer():
    from kvtier.tokenizer import load_tokenizer

    tok = load_tokenizer("builtin:tiny-qwen3")
    detok = Detokenizer(tok)
    rng = random.Random(1)
    for _ in range(50):
        ids = [rng.randrange(len(tok)) for _ in range(30)]
        for skip in (True, False):
            assert detok._decode(ids, skip) == tok.decode(ids, skip_special_tokens=skip)
    req = Req(rid="a", input_ids=[1], sampling=SamplingParams())
    for _ in range(40):
        req.output_ids.append(rng.randrange(len(tok)))
        detok.update(req)
    req.finish = None
    assert req.output_text == tok.decode(req.output_ids, skip_special_tokens=True)


def test_one_token_extend_as_decode_and_step_ahead():
    pool = KVPool(64, PS, 1, 1, 8, torch.float32, "cpu")
    table = ReqToPageTable(8, 16, "cpu")
    # Prompts of 9 and 6 tokens with all but the last cached: one new token each.
    reqs = [
        _req(0, list(range(10, 19)), 8, [5, 9, 2], table),
        _req(1, list(range(20, 26)), 5, [7, 3], table),
    ]
    sb = ScheduleBatch(ForwardMode.EXTEND, reqs, [1, 1])
    fb = sb.to_forward_batch(pool, table, TorchAttention(), as_decode=True)
    assert fb.mode is ForwardMode.DECODE and fb.extend_lens is None
    assert fb.input_ids.tolist() == [18, 25]
    assert fb.positions.tolist() == [8, 5] and fb.out_cache_loc.tolist() == [2 * PS, 3 * PS + 1]
    assert fb.seq_lens.tolist() == [9, 6] and fb.logits_indices.tolist() == [0, 1]
    with pytest.raises(ValueError, match="one token a request"):
        ScheduleBatch(ForwardMode.EXTEND, reqs, [1, 2]).to_forward_batch(
            pool, table, TorchAttention(), as_decode=True
        )
    # The step after it, scheduled before its tokens are known: one position further, the
    # input ids given on the device.
    ahead = ScheduleBatch(ForwardMode.DECODE, reqs, [1, 1], ahead=1)
    fb = ahead.to_forward_batch(pool, table, TorchAttention(), torch.tensor([77, 88]))
    assert fb.input_ids.tolist() == [77, 88]
    assert fb.positions.tolist() == [9, 6] and fb.out_cache_loc.tolist() == [2 * PS + 1, 3 * PS + 2]
    assert fb.seq_lens.tolist() == [10, 7] and fb.logits_indices.tolist() == [0, 1]
    with pytest.raises(ValueError, match="scheduled ahead"):
        ahead.to_forward_batch(pool, table, TorchAttention())
