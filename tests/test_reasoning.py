"""Reasoning parsers (--reasoning-parser): thinking and answer apart, whole and streamed split
anywhere, through the chat stream's events and the finished message."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi")

from kvtier import server_args
from kvtier.scheduler.request import ReqOutput
from kvtier.server import chat, openai_api, reasoning_parser
from kvtier.server.errors import APIError
from kvtier.server.reasoning_parser import ReasoningParser, split
from kvtier.server.serving import Frontend, ModelInfo

CASES = [
    # (text, mode, reasoning, content)
    ("<think>\nLet me see.\n</think>\n\nIt is 4.", "qwen3", "Let me see.", "It is 4."),
    ("It is 4.", "qwen3", None, "It is 4."),
    ("  It is <b>4</b>.", "qwen3", None, "  It is <b>4</b>."),
    ("<think>\nstill thinking when cut", "qwen3", "still thinking when cut", ""),
    ("<thi", "qwen3", None, "<thi"),
    ("Let me see.\n</think>\n\nIt is 4.", "qwen3-thinking", "Let me see.", "It is 4."),
    ("Let me see, a \n b", "qwen3-thinking", "Let me see, a \n b", ""),
    ("<think></think>4", "qwen3", "", "4"),
]


@pytest.mark.parametrize(("text", "mode", "reasoning", "content"), CASES)
def test_split(text, mode, reasoning, content):
    assert split(text, mode) == (reasoning, content)


@pytest.mark.parametrize(("text", "mode", "reasoning", "content"), CASES)
def test_any_split_of_a_stream_gives_the_whole(text, mode, reasoning, content):
    for i in range(len(text) + 1):
        for j in range(i, len(text) + 1, 3):
            parser = ReasoningParser(mode)
            got_r, got_c = "", ""
            for piece in (text[:i], text[i:j], text[j:]):
                r, c = parser.feed(piece)
                got_r, got_c = got_r + r, got_c + c
            r, c = parser.finish()
            assert (got_r + r, got_c + c) == (reasoning or "", content), (i, j)


def test_modes_are_the_flag_choices():
    assert reasoning_parser.MODES == server_args.REASONING_PARSERS
    with pytest.raises(ValueError, match="reasoning parser must be one of qwen3, qwen3-thinking"):
        ReasoningParser("deepseek")


class _Tok:
    def decode(self, ids, skip_special_tokens=False):
        return f"<{ids[0]}>"


def test_stream_events_reasoning_then_answer_then_call():
    fe = Frontend(None, _Tok(), None, ModelInfo("m", "m", 100, 100))
    chunks = openai_api._ChatChunks("chatcmpl-x", "m", False, fe, False, 1, 1)
    chunks.reasoning = [ReasoningParser("qwen3")]
    chunks.parsers = [chat.ToolPlan([], None, None).parser()]
    pieces = ["<think>\nHm", "m.\n</think>\n\nOk.", '<tool_call>{"name": "f", "arguments": {}}']
    pieces.append("</tool_call>")
    events = []
    for k, piece in enumerate(pieces):
        meta = {"finish_reason": {"type": "stop"}} if k == len(pieces) - 1 else {}
        events += chunks.on_output(0, ReqOutput("r", [1], piece, k == len(pieces) - 1, meta), 0)
    deltas = [e["choices"][0]["delta"] for e in events]
    assert deltas[0] == {"role": "assistant", "reasoning_content": "Hm"}
    assert deltas[1] == {"reasoning_content": "m."}
    assert deltas[2] == {"content": "Ok."}
    assert deltas[3]["tool_calls"][0]["function"] == {"name": "f", "arguments": "{}"}
    assert deltas[4] == {} and events[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_finished_message_with_reasoning():
    text = "<think>\nHmm.\n</think>\n\nIt is 4."
    message, reason = chat.chat_message(text, "stop", None, "qwen3")
    assert message == {"role": "assistant", "content": "It is 4.", "reasoning_content": "Hmm."}
    assert reason == "stop"
    # Without thinking: no reasoning_content field.
    message, _ = chat.chat_message("It is 4.", "stop", None, "qwen3")
    assert message == {"role": "assistant", "content": "It is 4."}
    # Not parsing: the text as written.
    message, _ = chat.chat_message(text, "stop", None, None)
    assert message == {"role": "assistant", "content": text}


def test_chat_template_kwargs_reach_the_template():
    from kvtier.models.builtin import builtin_dir
    from kvtier.tokenizer import load_tokenizer

    tok = load_tokenizer(builtin_dir("builtin:tiny-qwen3"))
    tok.chat_template = (
        "{%- for m in messages %}{{ m.content }}{%- endfor %}"
        "{%- if enable_thinking is defined and not enable_thinking %}[no think]{%- endif %}"
    )
    fe = Frontend(None, tok, None, ModelInfo("m", "m", 100, 100))
    msgs = [{"role": "user", "content": "hi"}]
    assert tok.decode(fe.encode_chat(msgs, None, {"enable_thinking": False})) == "hi[no think]"
    assert tok.decode(fe.encode_chat(msgs, None, {"enable_thinking": True})) == "hi"
    with pytest.raises(APIError, match=r"^chat_template_kwargs may not set messages, tools$"):
        fe.encode_chat(msgs, None, {"tools": [], "messages": []})
