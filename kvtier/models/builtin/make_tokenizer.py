"""Train the byte-level BPE tokenizer of ``builtin:tiny-qwen3`` (run once; the output is kept).

    .venv/bin/python kvtier/models/builtin/make_tokenizer.py

Writes tokenizer.json and tokenizer_config.json next to this file and updates the vocabulary
size and end tokens in the config.json there. The training text is written
below (plain English and some Python), so the result depends on nothing outside this script;
byte-level BPE can still encode any text, only less compactly. The vocabulary is small on
purpose: the builtin model exists for tests and demos, and its random weights make gibberish
whatever the tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

VOCAB_SIZE = 2000
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# ChatML, the format Qwen models are trained on: every message is framed by <|im_start|>role
# and <|im_end|>; the generation prompt opens an assistant turn.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

PROSE = """
A serving engine keeps the keys and values of every token it has seen, so that the next token
of a conversation does not have to look at the whole prompt again. That memory is called the
KV cache. It grows with every request and every turn, and on a busy machine it is the first
thing to run out. When the cache is full the engine must choose: throw old entries away and
compute them again later, or move them somewhere slower but larger.

The simplest larger place is the host memory of the machine. It is cheap and there is a lot of
it, but the link between the accelerator and the host is narrow compared with the memory on
the card itself. Moving a long prefix back over that link can take longer than the user is
willing to wait for the first word of the answer. A faster tier changes the trade: if the copy
back is much quicker than computing the prefix again, the engine should keep everything it can.

Coding agents are the workload that makes this matter. An agent sends the same long context
again and again: the repository summary, the instructions, the files it has opened, the tool
results so far. Each new request differs from the last one only at the end. If the cache still
holds the shared beginning, the request starts almost at once. If it does not, the engine reads
tens of thousands of tokens again before it can say anything at all.

The tree of prefixes records which sequences of tokens are cached and where their pages live.
A node may hold pages on the accelerator, a copy in the lower tier, or both. When memory is
tight the engine evicts the least recently used leaves first. A node that has a copy below only
loses its pages on the card; it stays in the tree and can be brought back later. A node without
a copy is deleted, and its tokens must be computed again if anyone asks for them.

Loading a prefix back happens layer by layer. The first layer of the model can start as soon as
its own pages have arrived, while the copies for the later layers are still on the way. With a
fast enough link the load hides almost entirely behind the computation of the new tokens.

Tests run on an ordinary computer without any accelerator. The same code paths work there with
plain tensors in host memory, which makes it possible to check every page id, every free list
and every lock count in a few seconds. The fast kernels are checked against these reference
paths on a real device.

Good morning! How are you today? I would like to ask a question about the weather, the news,
and a recipe for bread. Please explain it simply, step by step, and give one short example.
Thank you very much for your help. The quick brown fox jumps over the lazy dog. She sells sea
shells by the sea shore. One, two, three, four, five, six, seven, eight, nine, ten. Monday,
Tuesday, Wednesday, Thursday, Friday, Saturday and Sunday. January, February, March, April,
May, June, July, August, September, October, November, December.

The user asked for a summary of the meeting. The assistant listed the decisions, the open
questions and the people responsible for each next step. Then the user asked for a shorter
version, and the assistant wrote three sentences. Later the system reminded the assistant to
be concise, to be honest about what it does not know, and to say when an answer might be out
of date.

Memory, bandwidth, latency and throughput are the words that come up in every discussion of
performance. Bandwidth is how many bytes move per second once a transfer is running. Latency
is how long the first byte takes. Throughput is how much useful work is finished per second
when many requests share the machine. A design that improves one of them often hurts another,
and measuring all of them in the same run is the only honest way to compare two designs.
"""

CODE = '''
import math
from dataclasses import dataclass, field


@dataclass
class Request:
    """One generation request, tracked by how far each of its cursors has moved."""

    request_id: str
    prompt_ids: list[int]
    max_new_tokens: int = 16
    output_ids: list[int] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def is_finished(self, eos_ids: set[int]) -> bool:
        if len(self.output_ids) >= self.max_new_tokens:
            return True
        return bool(self.output_ids) and self.output_ids[-1] in eos_ids


class PageAllocator:
    def __init__(self, num_pages: int) -> None:
        self.free = list(range(num_pages - 1, 0, -1))

    def alloc(self, n: int) -> list[int] | None:
        if n > len(self.free):
            return None
        pages = self.free[-n:]
        del self.free[-n:]
        return pages[::-1]

    def release(self, pages: list[int]) -> None:
        self.free.extend(reversed(pages))


def softmax(values: list[float]) -> list[float]:
    top = max(values)
    exps = [math.exp(v - top) for v in values]
    total = sum(exps)
    return [e / total for e in exps]


def greedy(logits: list[float]) -> int:
    best, best_index = float("-inf"), -1
    for index, value in enumerate(logits):
        if value > best:
            best, best_index = value, index
    return best_index


def chunks(items: list[int], size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


def main() -> None:
    request = Request("r0", [1, 2, 3, 4], max_new_tokens=4)
    allocator = PageAllocator(num_pages=8)
    pages = allocator.alloc(2)
    print(f"request {request.request_id} holds pages {pages}")
    for step in range(request.max_new_tokens):
        logits = [math.sin(step + i) for i in range(10)]
        token = greedy(softmax(logits))
        request.output_ids.append(token)
        if request.is_finished({0}):
            break
    allocator.release(pages or [])
    print("done:", request.output_ids)


if __name__ == "__main__":
    main()
'''

SHELL_AND_DATA = """
$ python -m kvtier.launch_server --model builtin:tiny-qwen3 --page-size 64 --port 30000
$ curl http://127.0.0.1:30000/v1/chat/completions -H "Content-Type: application/json" \\
    -d '{"model": "tiny", "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 8}'
{"id": "chatcmpl-1", "object": "chat.completion", "choices": [{"index": 0, "message":
{"role": "assistant", "content": "Hi there."}, "finish_reason": "stop"}]}
git status; git diff --stat; pip install -e .; pytest -q tests/; ruff check .
for i in 1 2 3; do echo "run $i"; done
SELECT name, count(*) FROM requests WHERE status = 'done' GROUP BY name ORDER BY 2 DESC;
<html><head><title>Status</title></head><body><p>OK</p></body></html>
0 1 2 3 4 5 6 7 8 9 10 16 32 64 128 256 512 1024 2048 4096 8192 65536 0.5 1e-6 3.14159
"""


def main() -> None:
    out_dir = Path(__file__).resolve().parent
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # The script's own source is code text too, and it is fixed once the script is.
    corpus = [PROSE, CODE, SHELL_AND_DATA, Path(__file__).read_text()]
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": 32768,
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    # Keep the model's config in step: its vocabulary is exactly the tokenizer's, and it stops
    # on either end token.
    model_config_path = out_dir / "config.json"
    model_config = json.loads(model_config_path.read_text())
    model_config["vocab_size"] = tokenizer.get_vocab_size()
    model_config["eos_token_id"] = [
        tokenizer.token_to_id("<|im_end|>"),
        tokenizer.token_to_id("<|endoftext|>"),
    ]
    model_config_path.write_text(json.dumps(model_config, indent=2) + "\n")
    print(f"vocab size {tokenizer.get_vocab_size()} written to {out_dir}")


if __name__ == "__main__":
    main()
