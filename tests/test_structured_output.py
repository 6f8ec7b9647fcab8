"""Structured output (json_schema / regex / ebnf through xgrammar): the mask is exactly the
tokens the grammar allows, outputs match their constraint and end where it is complete,
constrained and free requests share batches (with and without overlap scheduling), errors name
the parameter, nothing leaks."""

from __future__ import annotations

import json
import re

import pytest

pytest.importorskip("xgrammar")

from engine_utils import make_engine

from kvtier.models.builtin import builtin_dir
from kvtier.sampling_params import SamplingParams, SamplingParamsError
from kvtier.scheduler import grammar
from kvtier.scheduler.scheduler import RequestError
from kvtier.tokenizer import load_tokenizer

SCHEMA = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}, "color": {"enum": ["red", "green"]}},
    "required": ["ok", "color"],
    "additionalProperties": False,
}
REGEX = r"(yes|no), [0-9]{3}"


@pytest.fixture(scope="module")
def engine():
    with make_engine() as e:
        yield e


def test_mask_allows_exactly_the_tokens_the_grammar_can_start_with():
    import torch

    tok = load_tokenizer(builtin_dir("builtin:tiny-qwen3"))
    vocab = len(tok)
    g = grammar.Grammars(tok, vocab, [tok.convert_tokens_to_ids("<|im_end|>")])
    m = g.matcher(SamplingParams(regex="ab|ac"))
    logits = torch.zeros(2, vocab)
    out = g.mask(logits, [1], [m])
    assert torch.equal(out[0], logits[0]) and torch.equal(logits, torch.zeros(2, vocab))
    allowed = set(torch.nonzero(out[1] == 0).flatten().tolist())
    want = set()
    for t in range(vocab):
        text = tok.decode([t])
        if text and any(w.startswith(text) for w in ("ab", "ac")) and t not in tok.all_special_ids:
            want.add(t)
    assert allowed == want and len(want) >= 2
    assert torch.isinf(out[1][sorted(set(range(vocab)) - want)]).all()


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_json_schema_output_parses_and_ends(engine, temperature):
    sp = {"temperature": temperature, "seed": 5, "max_new_tokens": 64, "json_schema": SCHEMA}
    out = engine.generate(prompt="Answer in JSON:", sampling_params=sp)
    value = json.loads(out["text"])
    assert set(value) == {"ok", "color"}
    assert isinstance(value["ok"], bool) and value["color"] in ("red", "green")
    # Written as json.dumps writes it; it ended itself (an end token), not by length.
    assert out["text"] == json.dumps(value)
    assert out["meta_info"]["finish_reason"]["type"] == "stop"
    again = engine.generate(prompt="Answer in JSON:", sampling_params=sp)
    assert again["output_ids"] == out["output_ids"]
    engine.check_integrity()


def test_regex_and_ebnf(engine):
    for seed in range(3):
        sp = {"temperature": 1.0, "seed": seed, "max_new_tokens": 32, "regex": REGEX}
        out = engine.generate(prompt="Say yes or no:", sampling_params=sp)
        assert re.fullmatch(REGEX, out["text"]), out["text"]
        assert out["meta_info"]["finish_reason"]["type"] == "stop"
    ebnf = 'root ::= ("yes" | "no") " " digit digit\ndigit ::= [0-9]'
    out = engine.generate(prompt="x", sampling_params={"temperature": 0, "ebnf": ebnf})
    assert re.fullmatch(r"(yes|no) [0-9]{2}", out["text"]), out["text"]
    assert out["meta_info"]["finish_reason"]["type"] == "stop"
    # The budget ends it first: the text so far is a prefix the grammar accepts.
    sp = {"temperature": 0, "max_new_tokens": 3, "regex": "[a-z]{20}"}
    out = engine.generate(prompt="x", sampling_params=sp)
    assert out["meta_info"]["finish_reason"]["type"] == "length"
    assert re.fullmatch(r"[a-z]+", out["text"]) and len(out["output_ids"]) == 3


@pytest.mark.parametrize("overlap", [True, False])
def test_constrained_and_free_requests_share_batches(overlap):
    prompts = ["Answer in JSON:", "A free one", "Say yes or no:"]
    params = [
        {"temperature": 0, "max_new_tokens": 64, "json_schema": SCHEMA},
        {"temperature": 0, "max_new_tokens": 12, "ignore_eos": True},
        {"temperature": 0, "max_new_tokens": 32, "regex": REGEX},
    ]
    with make_engine(disable_overlap_schedule=not overlap) as e:
        alone = [e.generate(prompt=p, sampling_params=s) for p, s in zip(prompts, params)]
        together = e.generate(prompt=prompts, sampling_params=params)
        assert [o["output_ids"] for o in together] == [o["output_ids"] for o in alone]
        json.loads(together[0]["text"])
        assert re.fullmatch(REGEX, together[2]["text"])
        e.check_integrity()
    with make_engine() as plain:
        free = plain.generate(prompt=prompts[1], sampling_params=params[1])
    assert free["output_ids"] == alone[1]["output_ids"]


def test_retraction_keeps_the_grammar_state():
    # 6 requests x 70 tokens do not fit in 160 slots: decode retracts and recomputes; each
    # matcher keeps following its request's tokens, so outputs equal those of a pool that fits
    # them, and stay digits (the token limit ends them inside the pattern).
    sp = {"temperature": 0, "max_new_tokens": 40, "regex": "[0-9]{300}"}
    prompts = [[10 + 7 * i + j for j in range(30)] for i in range(6)]
    with make_engine() as e:
        want = [e.generate(input_ids=p, sampling_params=sp)["output_ids"] for p in prompts]
    with make_engine(max_total_tokens=160, page_size=4) as e:
        got = e.generate(input_ids=prompts, sampling_params=sp)
        assert [g["output_ids"] for g in got] == want
        assert all(re.fullmatch("[0-9]+", g["text"]) for g in got)
        assert all(len(g["output_ids"]) == 40 for g in got)
        assert e.get_stats()["retractions"] > 0
        e.check_integrity()


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"regex": "(unclosed"}, "regex does not compile: "),
        ({"ebnf": "root ::= undefined_rule"}, "ebnf does not compile: "),
    ],
)
def test_constraints_that_do_not_compile_are_request_errors(engine, params, message):
    with pytest.raises(RequestError, match="^" + re.escape(message)):
        engine.generate(prompt="x", sampling_params={"max_new_tokens": 4, **params})
    engine.check_integrity()
    assert engine.generate(prompt="x", sampling_params={"max_new_tokens": 2})["output_ids"]


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"json_schema": "{not json"}, "json_schema is not valid JSON: "),
        ({"regex": "a", "ebnf": 'root ::= "a"'}, "give at most one of json_schema, regex, ebnf; "
         "got ['regex', 'ebnf']"),
        ({"regex": ""}, "regex must be a non-empty string"),
        ({"regex": "a", "min_new_tokens": 2}, "min_new_tokens cannot be combined with regex "
         "(the grammar decides where the output may end)"),
    ],
)  # fmt: skip
def test_bad_constraint_parameters(params, message):
    with pytest.raises(SamplingParamsError, match="^" + re.escape(message)):
        SamplingParams.from_dict(params)


def test_json_schema_as_an_object_is_taken_as_its_text():
    assert SamplingParams(json_schema=SCHEMA).json_schema == json.dumps(SCHEMA)
    assert SamplingParams(regex="a").constraint() == ("regex", "a")
    assert not SamplingParams().constrained


def test_without_xgrammar_or_a_tokenizer_the_error_says_why(monkeypatch):
    with make_engine(skip_tokenizer_init=True) as e, pytest.raises(RequestError, match="tokenizer"):
        e.generate(input_ids=[5, 6], sampling_params={"regex": "a"})
    monkeypatch.setattr(grammar, "_xgrammar", lambda: None)
    with make_engine() as e:
        with pytest.raises(RequestError, match=re.escape("pip install 'kvtier[structured]'")):
            e.generate(prompt="x", sampling_params={"regex": "a"})
        e.check_integrity()


def test_compile_runs_beside_the_loop(engine, monkeypatch):
    """A constraint is matched against the vocabulary on the compile thread: while it compiles
    its request waits apart and others run to the end; then it runs; an abort or a failure in
    the thread ends it with the reason; nothing is held."""
    import threading

    from kvtier.sampling_params import SamplingParams
    from kvtier.scheduler.request import Req

    sched = engine.scheduler
    sched._grammars_for_requests()  # built before the patch below
    release = threading.Event()
    real = grammar.Grammars.matcher

    def slow(self, sp):
        release.wait(10)
        if sp.regex == "fail":
            raise grammar.GrammarError("regex does not compile: failed in the thread")
        return real(self, sp)

    monkeypatch.setattr(grammar.Grammars, "matcher", slow)
    free = SamplingParams(max_new_tokens=4, temperature=0, ignore_eos=True)
    for rid, sp in (
        ("slow", SamplingParams(max_new_tokens=32, temperature=0, regex=REGEX)),
        ("gone", SamplingParams(max_new_tokens=8, regex="[a-z]+")),
        ("fail", SamplingParams(max_new_tokens=8, regex="fail")),
        ("free", free),
    ):
        sched.add_request(Req(rid=rid, input_ids=[11, 12, 13], sampling=sp))
    assert sched.stats()["num_waiting"] == 4
    assert sched.abort_request("gone")
    done = {}
    while "free" not in done:
        done.update({o.rid: o for o in sched.step() if o.finished})
    assert set(done) == {"gone", "free"} and len(sched._compiling) == 2
    assert done["gone"].meta_info["finish_reason"] == {"type": "abort", "message": "aborted"}
    assert not sched.flush_cache()  # refused while requests wait for their grammar
    sched.check_integrity()
    release.set()
    while sched.has_work():
        done.update({o.rid: o for o in sched.step() if o.finished})
    assert done["fail"].meta_info["finish_reason"] == {
        "type": "abort",
        "message": "regex does not compile: failed in the thread",
    }
    # The slow one ran once its matcher was ready, to the end of its pattern.
    assert re.fullmatch(REGEX, done["slow"].new_text), done["slow"].new_text
    assert done["slow"].meta_info["finish_reason"]["type"] == "stop"
    sched.check_integrity()
