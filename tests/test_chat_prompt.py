"""The chat-prompt tokenizer cache (kvtier/chat_prompt.py): the same ids as the
tokenizer's for the whole text, whatever the text, with the stretches a conversation repeats
served from the cache; off where the tokenizer's splitting cannot be relied on."""

from __future__ import annotations

import random
import threading

import pytest

pytest.importorskip("transformers")

from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from kvtier.chat_prompt import SegmentEncoder
from kvtier.tokenizer import load_tokenizer

TOK = load_tokenizer("builtin:tiny-qwen3")
SPECIALS = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]
WORDS = ["def", "return", " x", "\n", "\n\n", "  ", "\t", "é", "你好", "😀", "a<b", "<|im", "|>"]


def whole(tok, text):
    return list(tok.encode(text, add_special_tokens=False))


def _random_text(rng, n):
    return "".join(rng.choice(WORDS + SPECIALS) for _ in range(n))


def test_any_text_gives_the_tokenizers_ids():
    enc = SegmentEncoder(TOK, min_chars=4)
    assert enc.enabled
    rng = random.Random(0)
    for _ in range(300):
        text = _random_text(rng, rng.randint(0, 40))
        assert enc.encode(text) == whole(TOK, text)
        assert enc.encode(text) == whole(TOK, text)  # again, from the cache
    assert enc.hits > 0


def test_a_conversation_takes_its_repeated_messages_from_the_cache():
    enc = SegmentEncoder(TOK)
    rng = random.Random(1)
    msgs = [{"role": "system", "content": " ".join(rng.choice(WORDS) for _ in range(3000))}]
    for _ in range(4):
        msgs.append({"role": "user", "content": " ".join(rng.choice(WORDS) for _ in range(300))})
        text = TOK.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        misses = enc.misses
        assert enc.encode(text) == whole(TOK, text)
        # Only the two new messages are tokenized (the system prompt and the first user message
        # in turn 0; then the previous answer and the new question); the rest is cached.
        assert enc.misses - misses == 2
        answer = "".join(rng.choice(WORDS) for _ in range(300))
        msgs.append({"role": "assistant", "content": answer})
    assert enc.hits >= 6


def test_the_cache_stays_within_its_size():
    enc = SegmentEncoder(TOK, min_chars=8, max_chars=200)
    rng = random.Random(2)
    for _ in range(50):
        text = _random_text(rng, 60)
        assert enc.encode(text) == whole(TOK, text)
        assert enc._chars <= 200 and enc._chars == sum(len(k) for k in enc._cache)


def test_safe_from_several_threads():
    enc = SegmentEncoder(TOK, min_chars=4, max_chars=5000)
    rng = random.Random(3)
    texts = [_random_text(rng, 50) for _ in range(40)]
    want = [whole(TOK, t) for t in texts]
    errors = []

    def work(seed):
        r = random.Random(seed)
        for _ in range(200):
            i = r.randrange(len(texts))
            if enc.encode(texts[i]) != want[i]:
                errors.append(i)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def _word_tokenizer(added, pre_tokenizer=None, bos=False):
    vocab = {"[UNK]": 0, "a": 1, "b": 2, "▁a": 3, "▁b": 4, "▁": 5}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizer or pre_tokenizers.Whitespace()
    tok.add_special_tokens(added)
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
        )
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def test_text_prompts_with_the_tokenizers_special_tokens():
    # add_special_tokens=True: what the tokenizer's post-processor frames a text with (none
    # for the builtin ChatML tokenizer, a BOS here) around the piecewise ids.
    rng = random.Random(5)
    enc = SegmentEncoder(TOK, min_chars=4)
    for _ in range(50):
        text = _random_text(rng, 30)
        assert enc.encode(text, add_special_tokens=True) == list(TOK.encode(text))
    tok = _word_tokenizer([AddedToken("<s>"), AddedToken("</s>")], bos=True)
    enc = SegmentEncoder(tok, min_chars=1)
    assert enc.enabled and enc._frame == ([tok.convert_tokens_to_ids("<s>")], [])
    for _ in range(50):
        text = "".join(rng.choice(["a", "b", " ", "<s>", "</s>"]) for _ in range(12))
        assert enc.encode(text, add_special_tokens=True) == list(tok.encode(text))
        assert enc.encode(text) == whole(tok, text)


def test_off_where_an_added_token_strips_its_neighbours():
    # lstrip: the token takes the spaces before it, which a split of our own would not.
    tok = _word_tokenizer([AddedToken("<s>", lstrip=True), AddedToken("</s>")])
    enc = SegmentEncoder(tok)
    assert not enc.enabled
    for text in ("a <s> b", "<s></s>a"):
        assert enc.encode(text) == whole(tok, text)


def test_off_where_the_probe_differs():
    # Metaspace prepends "▁" to the first stretch only: stretches encoded alone would differ.
    meta = pre_tokenizers.Metaspace(prepend_scheme="first")
    tok = _word_tokenizer([AddedToken("<s>"), AddedToken("</s>")], meta)
    assert whole(tok, "a<s>b") == [3, 6, 2]  # "▁a", "<s>", "b": no "▁" after the token
    enc = SegmentEncoder(tok)
    assert not enc.enabled
    for text in ("a<s>b", "<s>a b</s>b"):
        assert enc.encode(text) == whole(tok, text)
    # With "always" every stretch is prefixed alike: the split is reliable.
    meta = pre_tokenizers.Metaspace(prepend_scheme="always")
    tok = _word_tokenizer([AddedToken("<s>"), AddedToken("</s>")], meta)
    enc = SegmentEncoder(tok, min_chars=1)
    assert enc.enabled
    rng = random.Random(4)
    for _ in range(100):
        text = "".join(rng.choice(["a", "b", " ", "<s>", "</s>"]) for _ in range(12))
        assert enc.encode(text) == whole(tok, text)


def test_no_backend_means_whole_texts():
    class Plain:
        def encode(self, text, add_special_tokens=False):
            return [len(text)]

    enc = SegmentEncoder(Plain())
    assert not enc.enabled and enc.encode("abc") == [3]
