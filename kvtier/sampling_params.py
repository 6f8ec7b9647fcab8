"""Per-request sampling and stopping parameters (SGLang's names and defaults)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any


class SamplingParamsError(ValueError):
    """A sampling parameter is invalid; the message names it."""


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1: no top-k filtering
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    seed: int | None = None  # per-request sampling seed: same seed, same tokens
    skip_special_tokens: bool = True
    no_stop_trim: bool = False  # keep the matched stop string in the output text
    # Penalties on the logits before sampling (greedy too), as SGLang / vLLM apply them:
    # frequency subtracts f x (times the token was generated), presence p once a token was
    # generated, repetition divides positive logits of tokens in the prompt or output by r
    # (multiplies negative ones). min_p drops tokens less likely than min_p x the likeliest
    # (sampling only); min_new_tokens holds back EOS and stop_token_ids until that many.
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_p: float = 0.0
    min_new_tokens: int = 0
    # Added to the logits of these token ids before sampling (OpenAI's logit_bias; keys may
    # come as strings of ids), each in [-100, 100].
    logit_bias: dict[int, float] | None = None
    # Structured output (at most one; see kvtier.scheduler.grammar): a JSON schema (text, or an
    # object), a regular expression, or an EBNF grammar (xgrammar's dialect of GBNF) the
    # output must match.
    json_schema: str | None = None
    regex: str | None = None
    ebnf: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.json_schema, dict):
            self.json_schema = json.dumps(self.json_schema)
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        elif self.stop is None:
            self.stop = []
        if self.stop_token_ids is None:
            self.stop_token_ids = []
        if isinstance(self.logit_bias, dict):
            try:
                self.logit_bias = {int(k): v for k, v in self.logit_bias.items()}
            except (TypeError, ValueError):
                raise SamplingParamsError(
                    f"logit_bias keys must be token ids; got {list(self.logit_bias)!r}"
                ) from None
        self.validate()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    def constraint(self) -> tuple[str, str]:
        """(parameter name, text) of the request's structured-output constraint."""
        for name in ("json_schema", "regex", "ebnf"):
            value = getattr(self, name)
            if value is not None:
                return name, value
        raise ValueError("no constraint")

    @property
    def constrained(self) -> bool:
        return self.json_schema is not None or self.regex is not None or self.ebnf is not None

    @property
    def penalized(self) -> bool:
        """Whether sampling must see the request's tokens (a penalty or min_new_tokens)."""
        return bool(
            self.frequency_penalty
            or self.presence_penalty
            or self.repetition_penalty != 1.0
            or self.min_new_tokens
        )

    def validate(self) -> None:
        def number(name: str, kinds: tuple[type, ...]) -> Any:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, kinds):
                raise SamplingParamsError(f"{name} must be a number; got {v!r}")
            return v

        if number("max_new_tokens", (int,)) < 0:
            raise SamplingParamsError(f"max_new_tokens must be >= 0; got {self.max_new_tokens}")
        if not 0.0 <= number("temperature", (int, float)) <= 100.0:
            raise SamplingParamsError(f"temperature must be in [0, 100]; got {self.temperature}")
        if not 0.0 < number("top_p", (int, float)) <= 1.0:
            raise SamplingParamsError(f"top_p must be in (0, 1]; got {self.top_p}")
        top_k = number("top_k", (int,))
        if top_k == 0 or top_k < -1:
            raise SamplingParamsError(f"top_k must be -1 (off) or >= 1; got {top_k}")
        if not isinstance(self.stop, list) or not all(isinstance(s, str) and s for s in self.stop):
            raise SamplingParamsError(
                f"stop must be a non-empty string or list of them; got {self.stop!r}"
            )
        if not isinstance(self.stop_token_ids, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.stop_token_ids
        ):
            raise SamplingParamsError(
                f"stop_token_ids must be a list of token ids; got {self.stop_token_ids!r}"
            )
        for name in ("frequency_penalty", "presence_penalty"):
            if not -2.0 <= number(name, (int, float)) <= 2.0:
                raise SamplingParamsError(f"{name} must be in [-2, 2]; got {getattr(self, name)}")
        if not 0.0 < number("repetition_penalty", (int, float)) <= 2.0:
            raise SamplingParamsError(
                f"repetition_penalty must be in (0, 2]; got {self.repetition_penalty}"
            )
        if not 0.0 <= number("min_p", (int, float)) <= 1.0:
            raise SamplingParamsError(f"min_p must be in [0, 1]; got {self.min_p}")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                raise SamplingParamsError(
                    f"logit_bias must map token ids to numbers; got {self.logit_bias!r}"
                )
            for token, bias in self.logit_bias.items():
                if token < 0:
                    raise SamplingParamsError(f"logit_bias token id {token} is negative")
                if (
                    isinstance(bias, bool)
                    or not isinstance(bias, (int, float))
                    or not (-100.0 <= bias <= 100.0)
                ):
                    raise SamplingParamsError(
                        f"logit_bias values must be numbers in [-100, 100]; got {bias!r} for "
                        f"token {token}"
                    )
        min_new = number("min_new_tokens", (int,))
        if not 0 <= min_new <= self.max_new_tokens:
            raise SamplingParamsError(
                f"min_new_tokens must be in [0, max_new_tokens={self.max_new_tokens}]; "
                f"got {min_new}"
            )
        given = [n for n in ("json_schema", "regex", "ebnf") if getattr(self, n) is not None]
        if len(given) > 1:
            raise SamplingParamsError(f"give at most one of json_schema, regex, ebnf; got {given}")
        for name in given:
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise SamplingParamsError(f"{name} must be a non-empty string")
        if given and self.min_new_tokens:
            raise SamplingParamsError(
                f"min_new_tokens cannot be combined with {given[0]} (the grammar decides where "
                "the output may end)"
            )
        if self.json_schema is not None:
            try:
                json.loads(self.json_schema)
            except json.JSONDecodeError as e:
                raise SamplingParamsError(f"json_schema is not valid JSON: {e}") from None
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int)
        ):
            raise SamplingParamsError(f"seed must be an integer; got {self.seed!r}")

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> SamplingParams:
        """Build from a request's dict; an unknown key is an error naming it."""
        if d is None:
            return cls()
        if isinstance(d, SamplingParams):
            return d
        if not isinstance(d, dict):
            raise SamplingParamsError(f"sampling_params must be an object; got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise SamplingParamsError(f"unknown sampling parameter(s): {', '.join(unknown)}")
        try:
            return cls(**d)
        except TypeError as e:  # pragma: no cover - a wrong type that reached the constructor
            raise SamplingParamsError(str(e)) from e

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# The most alternatives a request may ask logprobs of at each position (OpenAI's limit).
MAX_TOP_LOGPROBS = 20


def check_logprob_args(return_logprob: Any, top_logprobs_num: Any) -> None:
    """SamplingParamsError naming the argument unless ``return_logprob`` is a bool and
    ``top_logprobs_num`` an int in [0, MAX_TOP_LOGPROBS], nonzero only with return_logprob."""
    if not isinstance(return_logprob, bool):
        raise SamplingParamsError(f"return_logprob must be true or false; got {return_logprob!r}")
    if (
        isinstance(top_logprobs_num, bool)
        or not isinstance(top_logprobs_num, int)
        or not 0 <= top_logprobs_num <= MAX_TOP_LOGPROBS
    ):
        raise SamplingParamsError(
            f"top_logprobs_num must be an integer in [0, {MAX_TOP_LOGPROBS}]; "
            f"got {top_logprobs_num!r}"
        )
    if top_logprobs_num and not return_logprob:
        raise SamplingParamsError("top_logprobs_num needs return_logprob")
