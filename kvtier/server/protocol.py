"""Request bodies of the HTTP API (pydantic). Unknown fields are refused, naming the field, so a
misspelt parameter is never silently ignored.

OpenAI parameters this engine does not implement are accepted only at their neutral values
(``echo=false``, ``suffix`` unset, ``best_of=1``) so that clients that always send them work."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, WrapValidator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _one_of(description: str) -> WrapValidator:
    """Replace pydantic's one-error-per-union-member report by one sentence."""

    def check(value: Any, handler: Any) -> Any:
        try:
            return handler(value)
        except ValidationError:
            shown = repr(value)
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            raise ValueError(f"must be {description}; got {shown}") from None

    return WrapValidator(check)


class StreamOptions(_Strict):
    include_usage: bool = False


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class FunctionCall(_Strict):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class MessageToolCall(_Strict):
    """A call an earlier assistant turn made (sent back with the conversation)."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall
    index: int | None = None  # present when a client rebuilt the call from stream deltas


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Annotated[
        str | list[TextPart] | None,
        _one_of('a string or a list of {"type": "text", "text": ...} parts (text only)'),
    ] = None
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = None  # assistant
    tool_call_id: str | None = None  # tool

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class JSONSchemaFormat(_Strict):
    name: str | None = None
    description: str | None = None
    # "schema" would shadow a BaseModel attribute: the field takes it as its alias.
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class OpenAISamplingFields(_Strict):
    """Fields shared by chat and text completions."""

    model: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: Annotated[str | list[str] | None, _one_of("a string or a list of strings")] = None
    seed: int | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    # SGLang / vLLM extensions
    top_k: int | None = None
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    rid: str | None = None
    # Structured output: OpenAI's response_format, SGLang's regex / ebnf, vLLM's guided_*.
    response_format: ResponseFormat | None = None
    regex: str | None = None
    ebnf: str | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    def structured_output_fields(self) -> list[str]:
        """The structured-output fields the request sets."""
        names = ("response_format", "regex", "ebnf", "guided_json", "guided_regex")
        names += ("guided_choice", "guided_grammar")
        return [n for n in names if getattr(self, n) is not None]


class FunctionDefinition(_Strict):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON Schema object
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(OpenAISamplingFields):
    messages: list[ChatMessage]
    tools: list[Tool] | None = None
    tool_choice: Annotated[
        Literal["none", "auto", "required"] | NamedToolChoice | None,
        _one_of('"none", "auto", "required" or {"type": "function", "function": {"name": ...}}'),
    ] = None
    parallel_tool_calls: bool = True
    # SGLang / vLLM: variables of the chat template (e.g. {"enable_thinking": false}), and
    # whether a reasoning model's thinking goes to reasoning_content (--reasoning-parser).
    chat_template_kwargs: dict[str, Any] | None = None
    separate_reasoning: bool = True
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    # OpenAI's reasoning_effort reaches the chat template as a variable of that name (as vLLM
    # passes it; a template without it ignores it).
    reasoning_effort: str | None = None
    # OpenAI fields with nothing to do on this server, accepted so that clients that send them
    # work: storage and tagging, the service tier, a cache-routing key (prefix caching is
    # automatic), an end-user id, a verbosity hint.
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    verbosity: str | None = None
    # OpenAI fields this server does not implement: a 400 names them (not "unknown field").
    audio: Any = None
    modalities: list[str] | None = None
    prediction: Any = None
    web_search_options: Any = None
    functions: Any = None
    function_call: Any = None

    def unsupported_fields(self) -> dict[str, bool]:
        """OpenAI's fields that the request sets and this server cannot honour."""
        return {
            "audio": self.audio is not None,
            "modalities other than ['text']": self.modalities not in (None, ["text"]),
            "prediction": self.prediction is not None,
            "web_search_options": self.web_search_options is not None,
            "functions (deprecated; use tools)": self.functions is not None,
            "function_call (deprecated; use tool_choice)": self.function_call is not None,
        }


class CompletionRequest(OpenAISamplingFields):
    prompt: Annotated[
        str | list[str] | list[int] | list[list[int]],
        _one_of("a string, a list with one string, or a list of token ids"),
    ]
    max_tokens: int | None = 16
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None
    best_of: int | None = None


class GenerateRequest(_Strict):
    """SGLang's native ``/generate``: one prompt or a batch, as text or token ids."""

    text: Annotated[str | list[str] | None, _one_of("a string or a list of strings")] = None
    input_ids: Annotated[
        list[int] | list[list[int]] | None,
        _one_of("a list of token ids or a list of such lists"),
    ] = None
    sampling_params: Annotated[
        dict[str, Any] | list[dict[str, Any]] | None, _one_of("an object or a list of objects")
    ] = None
    stream: bool = False
    rid: Annotated[str | list[str] | None, _one_of("a string or a list of strings")] = None
    return_logprob: bool = False
    top_logprobs_num: int = 0
    logprob_start_len: int = -1
    return_text_in_logprobs: bool = False


class ResponsesRequest(_Strict):
    """OpenAI's Responses API request (``responses_api``: what each field does there)."""

    model: str | None = None
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stream: bool = False
    text: dict[str, Any] | None = None
    reasoning: dict[str, Any] | None = None
    # Accepted, no effect here (nothing is stored; tags; the tier; a cache-routing key: prefix
    # caching is automatic; what to include beyond the defaults; truncation: a prompt over the
    # context is refused, never cut).
    store: bool | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    include: list[str] | None = None
    truncation: str | None = None
    stream_options: dict[str, Any] | None = None
    prompt_cache_retention: str | None = None
    # Refused by name (need stored state or are not implemented).
    previous_response_id: str | None = None
    conversation: Any = None
    background: bool | None = None
    max_tool_calls: int | None = None
    top_logprobs: int | None = None
    prompt: Any = None  # a stored prompt template


class TokenizeRequest(_Strict):
    """vLLM's ``/tokenize``: a text ``prompt``, or chat ``messages`` (with ``tools``) rendered
    as ``/v1/chat/completions`` renders them, so that ``count`` is its prompt_tokens."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    tools: list[Tool] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool = True
    # None: True for a prompt (as the tokenizer's encode), False for messages (the template
    # writes the special tokens), as vLLM.
    add_special_tokens: bool | None = None
    return_token_strs: bool = False


class DetokenizeRequest(_Strict):
    """vLLM's ``/detokenize``: token ids back to text (special tokens included)."""

    model: str | None = None
    tokens: list[int]


class AbortRequest(_Strict):
    """SGLang's ``/abort_request``: the id of a request in flight (``rid`` at submission)."""

    rid: str


class FlushCacheRequest(_Strict):
    tier: Literal["all", "device"] | None = Field(
        default=None,
        description="all (default): drop every cached prefix; device: drop only GPU copies "
        "that have an L2 copy",
    )
