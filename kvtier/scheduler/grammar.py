"""Structured output: a request's ``json_schema``, ``regex`` or ``ebnf`` (SGLang's sampling
parameters; OpenAI's ``response_format`` maps onto ``json_schema``) constrains which tokens it
may sample.

xgrammar (``pip install 'kvtier[structured]'``, the library SGLang and vLLM use) compiles the
constraint against the tokenizer's vocabulary once (compiled grammars are cached by their
text); each request then owns a matcher that follows its tokens. Before sampling, a step's
constrained rows get the matchers' allowed-token bitmasks, filled on the host and applied on the
logits' device as a -inf fill: greedy and sampled requests alike can only produce text the
constraint accepts, and only end (EOS) where it is complete. Logprobs stay those of the raw
logits. JSON is written as ``json.dumps`` writes it (", " and ": " between items, no other
whitespace): with any whitespace allowed, a model can pad with blanks until its token budget
runs out (the tiny test model does). A constrained request's mask depends on its previous
token, so overlap scheduling never launches its next step ahead (as for penalties).

A constraint is parsed when its request is added (an invalid one is refused there, naming the
parameter) and matched against the vocabulary on a compile thread; the request waits for its
matcher apart from the queue, so a slow compile holds up no other request.
"""

from __future__ import annotations

import re
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from kvtier.cache.kv_pool import to_device_async
from kvtier.sampling_params import SamplingParams


class GrammarError(ValueError):
    """A constraint cannot be served; the message names the parameter."""


def _reason(e: Exception) -> str:
    """xgrammar's message without its log prefix ("[12:00:00] /path/file.cc:94: ")."""
    text = str(e).strip()
    first = text.splitlines()[0] if text else type(e).__name__
    return re.sub(r"^\[[^\]]*\]\s*\S+:\d+:\s*", "", first)


def _xgrammar() -> Any:
    try:
        import xgrammar
    except ImportError:
        return None
    return xgrammar


class Grammars:
    """Compiles constraints for one tokenizer and masks logits rows with matchers' bitmasks.
    ``vocab_size`` is the model's (its logits' width, which may exceed the tokenizer's)."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: list[int]) -> None:
        xgr = _xgrammar()
        if xgr is None:
            raise GrammarError(
                "json_schema / regex / ebnf need xgrammar: pip install 'kvtier[structured]'"
            )
        if tokenizer is None:
            raise GrammarError(
                "json_schema / regex / ebnf need a tokenizer (not --skip-tokenizer-init)"
            )
        self._xgr = xgr
        info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=sorted(stop_token_ids)
        )
        self.vocab_size = vocab_size
        self._compiler = xgr.GrammarCompiler(info)
        self._lock = threading.Lock()  # the compiler's cache is shared with async callers
        self._pool: ThreadPoolExecutor | None = None

    def check(self, sp: SamplingParams) -> None:
        """Parse ``sp``'s constraint without the vocabulary (fast): GrammarError naming the
        parameter when it is not valid. What compiles then is matched against the tokens in
        the background (``submit``)."""
        kind, text = sp.constraint()
        grammar = self._xgr.Grammar
        try:
            if kind == "json_schema":
                grammar.from_json_schema(text, any_whitespace=False)
            elif kind == "regex":
                grammar.from_regex(text)
            else:
                grammar.from_ebnf(text)
        except Exception as e:  # xgrammar reports a bad constraint with its own exception types
            raise GrammarError(f"{kind} does not compile: {_reason(e)}") from None

    def matcher(self, sp: SamplingParams) -> Any:
        """A fresh matcher of ``sp``'s constraint; GrammarError naming the parameter when it
        does not compile."""
        kind, text = sp.constraint()
        try:
            with self._lock:
                if kind == "json_schema":
                    compiled = self._compiler.compile_json_schema(text, any_whitespace=False)
                elif kind == "regex":
                    compiled = self._compiler.compile_regex(text)
                else:
                    compiled = self._compiler.compile_grammar(text)
        except Exception as e:  # xgrammar reports a bad constraint with its own exception types
            raise GrammarError(f"{kind} does not compile: {_reason(e)}") from None
        return self._xgr.GrammarMatcher(compiled)

    def submit(self, sp: SamplingParams) -> Future[Any]:
        """``matcher(sp)`` on the compile thread: the engine loop goes on stepping while a
        large schema is matched against the vocabulary (as SGLang compiles grammars)."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="kvtier-grammar")
        return self._pool.submit(self.matcher, sp)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def mask(self, logits: torch.Tensor, rows: list[int], matchers: list[Any]) -> torch.Tensor:
        """``logits`` [B, V] with each of ``rows`` limited to what its matcher allows (a new
        tensor; the others unchanged)."""
        words = (self.vocab_size + 31) // 32
        bitmask = torch.empty(len(rows), words, dtype=torch.int32)
        for j, m in enumerate(matchers):
            m.fill_next_token_bitmask(bitmask, j)
        # The packed words cross to the device (4 bytes a 32 tokens) and unpack there: bit b
        # of word w allows token 32 w + b.
        device = logits.device
        bitmask = to_device_async(bitmask, device)
        index = to_device_async(torch.tensor(rows, dtype=torch.int64), device)
        shifts = torch.arange(32, dtype=torch.int32, device=device)
        allowed = ((bitmask.unsqueeze(-1) >> shifts) & 1).view(len(rows), -1)
        allowed = allowed[:, : logits.shape[-1]].to(torch.bool)
        out = logits.clone()
        out[index] = out[index].masked_fill(~allowed, float("-inf"))
        return out


__all__ = ["GrammarError", "Grammars"]
