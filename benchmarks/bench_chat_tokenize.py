"""Host time to tokenize a coding agent's growing conversation, each turn: the whole rendered
prompt through the tokenizer, against ``SegmentEncoder`` (the server's chat path: the messages
a conversation repeats come from its cache). Checks that both give the same ids. CPU only.

    python benchmarks/bench_chat_tokenize.py --system-words 20000 --turns 8
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvtier.chat_prompt import SegmentEncoder
from kvtier.tokenizer import load_tokenizer

# Code-like words: a program's names and punctuation, newlines, indentation.
CODE_WORDS = "def return class import self value cache layer if else for in range len print"
PUNCTUATION = "xyz=+():,.[]{}"
WORDS = [*CODE_WORDS.split(), *PUNCTUATION, "\n", "\n\n", "    "]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokenizer", default="builtin:tiny-qwen3")
    ap.add_argument("--system-words", type=int, default=20000)
    ap.add_argument("--turn-words", type=int, default=400)
    ap.add_argument("--turns", type=int, default=8)
    args = ap.parse_args()
    tok = load_tokenizer(args.tokenizer)
    enc = SegmentEncoder(tok)
    print(f"tokenizer {args.tokenizer}; piecewise encoding enabled: {enc.enabled}")
    rng = random.Random(0)

    def words(n: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(n))

    msgs = [{"role": "system", "content": words(args.system_words)}]
    rows = []
    for turn in range(args.turns):
        msgs.append({"role": "user", "content": words(args.turn_words)})
        text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        t0 = time.perf_counter()
        want = list(tok.encode(text, add_special_tokens=False))
        t1 = time.perf_counter()
        got = enc.encode(text)
        t2 = time.perf_counter()
        if got != want:
            sys.exit(f"turn {turn}: the ids differ")
        rows.append((len(want), (t1 - t0) * 1e3, (t2 - t1) * 1e3))
        print(f"turn {turn}: {len(want)} tokens, whole {rows[-1][1]:.1f} ms, "
              f"piecewise {rows[-1][2]:.1f} ms", flush=True)  # fmt: skip
        msgs.append({"role": "assistant", "content": words(args.turn_words)})
    later = rows[1:]
    print(
        f"turns 1-{len(rows) - 1}: median whole {statistics.median(r[1] for r in later):.1f} ms, "
        f"piecewise {statistics.median(r[2] for r in later):.1f} ms (same ids every turn)"
    )


if __name__ == "__main__":
    main()
