"""The OpenAI requests we accept, as pydantic models.

Unknown fields are refused the way OpenAI refuses them ("Unrecognized request argument
supplied"), and OpenAI fields we do not implement yet are refused by name: a client never
gets a 200 that silently ignored what it asked for.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from llmserve.errors import InvalidRequest, UnsupportedParameter
from llmserve.serving.sampling import SamplingRequest
from llmserve.serving.tool_calls import OutputRequest, Tool, ToolChoice

# Bounds on what a client sends, each at least as generous as OpenAI's own (README lists
# them). Text length is bounded by the context (serving.prepare) and the body size.
MAX_MESSAGES = 4096  # OpenAI: 2048
MAX_CONTENT_PARTS = 4096
MAX_STOP = 16  # OpenAI: 4
MAX_STOP_CHARS = 1000
MAX_LOGIT_BIAS = 262_144  # OpenAI: 300; ours: a whole vocabulary (Gemma's is 256k)
MAX_PROMPTS = 2048  # prompts of one completions request
MAX_EMBEDDING_INPUTS = 2048  # OpenAI: 2048
MAX_N = 128  # OpenAI: 128
MAX_TOP_LOGPROBS = 20  # OpenAI: 20 (chat), 5 (completions)
MAX_METADATA = 16  # OpenAI: 16 pairs, keys of 64 characters, values of 512
MAX_NAME_CHARS = 256  # model, user, and other identifiers
MAX_TOOLS = 128  # OpenAI: 128 (also the calls of one assistant message)
# service_tier values that ask for no particular processing (flex, scale, priority do).
SERVICE_TIERS = ("auto", "default")

Name = Annotated[str, Field(max_length=MAX_NAME_CHARS)]
StopString = Annotated[str, Field(max_length=MAX_STOP_CHARS)]
Metadata = Annotated[
    dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]],
    Field(max_length=MAX_METADATA),
]


class _Request(BaseModel):
    # No float field takes NaN or an infinity, sent as a number or as a string ("NaN", "inf"):
    # a 400 naming the field ("Input should be a finite number"), never a value for an engine.
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    # OpenAI fields we know but do not serve yet: refused by name when set, unless to a value
    # that asks for nothing beyond what is served (`harmless_values`, OpenAI's defaults).
    unsupported_fields: ClassVar[tuple[str, ...]] = ()
    harmless_values: ClassVar[dict[str, tuple[Any, ...]]] = {}

    @model_validator(mode="after")
    def _refuse_unknown(self) -> _Request:
        for name, value in (self.model_extra or {}).items():
            if name in self.unsupported_fields:
                harmless = self.harmless_values.get(name, ())
                if value is not None and value not in harmless:
                    raise UnsupportedParameter(
                        f"'{name}' is not supported by this server yet"
                        + (f" (accepted: {', '.join(map(repr, harmless))})." if harmless else "."),
                        param=name,
                    )
            else:
                raise InvalidRequest(f"Unrecognized request argument supplied: {name}", param=name)
        return self


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool | None = None
    include_obfuscation: bool | None = None  # accepted; we never obfuscate


class _SamplingFields(_Request):
    """The sampling fields every generating request takes (chat, completions, responses)."""

    # Float ranges as serving.sampling.FLOAT_RANGES has them (checked again there).
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    seed: int | None = None
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    # Extensions, as vLLM and llama.cpp's server accept them.
    top_k: Annotated[int, Field(ge=-1)] | None = None
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    repetition_penalty: Annotated[float, Field(ge=0.01, le=10.0)] | None = None
    ignore_eos: bool | None = None

    def sampling_request(
        self, *, n: int, max_tokens: int | None, logprobs: int | None,
        logit_bias: dict[int, float],
    ) -> SamplingRequest:
        # As sent: build_params turns a tiny temperature, or top_p 0, into greedy decoding.
        return SamplingRequest(
            n=n,
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=max(self.top_k or 0, 0),
            min_p=self.min_p or 0.0,
            seed=self.seed,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=self.repetition_penalty or 1.0,
            logit_bias=logit_bias,
            logprobs=logprobs,
            ignore_eos=bool(self.ignore_eos),
        )


class _Sampling(_SamplingFields):
    model: Name
    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1  # null: 1, as the spec's default
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP)] | None = None
    logit_bias: Annotated[
        dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]], Field(max_length=MAX_LOGIT_BIAS)
    ] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: Name | None = None

    @field_validator("n", mode="before")
    @classmethod
    def _default_n(cls, value: Any) -> Any:
        return 1 if value is None else value

    @model_validator(mode="after")
    def _check_stream_options(self) -> _Sampling:
        if self.stream_options is not None and not self.stream:
            raise InvalidRequest(
                "stream_options is only allowed when stream is true.", param="stream_options"
            )
        return self

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def sampling(self, *, max_tokens: int | None, logprobs: int | None) -> SamplingRequest:
        bias: dict[int, float] = {}
        for key, value in (self.logit_bias or {}).items():
            try:
                bias[int(key)] = value
            except ValueError:
                raise InvalidRequest(
                    f"logit_bias keys must be token ids, got {key!r}", param="logit_bias"
                ) from None
        return self.sampling_request(n=self.n, max_tokens=max_tokens, logprobs=logprobs,
                                     logit_bias=bias)


# -- chat -----------------------------------------------------------------------------------


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class CalledFunction(BaseModel):
    name: str
    arguments: str


class ToolCall(BaseModel):
    id: str
    type: Literal["function"]
    function: CalledFunction


class ChatMessage(BaseModel):
    # Extra message fields (name, ...) pass through to the chat template.
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | Annotated[list[dict[str, Any]], Field(max_length=MAX_CONTENT_PARTS)] | None = None
    tool_calls: Annotated[list[ToolCall], Field(max_length=MAX_TOOLS)] | None = None
    tool_call_id: str | None = None

    def text(self, where: str) -> str | None:
        if self.content is None or isinstance(self.content, str):
            return self.content
        parts = []
        for i, part in enumerate(self.content):
            kind = part.get("type")
            if kind not in ("text", "refusal"):
                raise UnsupportedParameter(
                    f"Content parts of type {kind!r} are not supported; this model reads text only.",
                    param=f"{where}.content.{i}.type",
                )
            value = part.get(kind)
            if not isinstance(value, str):
                raise InvalidRequest(
                    f"A {kind} content part needs a string '{kind}' field.",
                    param=f"{where}.content.{i}.{kind}",
                )
            parts.append(value)
        return "".join(parts)


FunctionName = Annotated[str, Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: FunctionName
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    def tool(self) -> Tool:
        parameters = self.parameters if self.parameters is not None else {"type": "object"}
        return Tool(self.name, self.description, parameters, bool(self.strict))


def check_tool_names(names: list[str], named_choice: str | None) -> None:
    """Each function declared once; a named tool_choice names one of them."""
    if len(set(names)) < len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise InvalidRequest(f"Function '{dup}' is declared twice.", param="tools")
    if named_choice is not None and named_choice not in names:
        raise InvalidRequest(
            f"tool_choice names function '{named_choice}', which is not among the tools.",
            param="tool_choice",
        )


class FunctionTool(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: FunctionDefinition


class FunctionRef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: FunctionRef


class TextFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]


class JsonObjectFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["json_object"]


class JsonSchemaSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: FunctionName
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["json_schema"]
    json_schema: JsonSchemaSpec


ResponseFormat = Annotated[
    TextFormat | JsonObjectFormat | JsonSchemaFormat, Field(discriminator="type")
]


class _ToolFields(_Request):
    """The tools of a chat request, which shape its prompt (and its answer)."""

    tools: Annotated[list[FunctionTool], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None

    @model_validator(mode="after")
    def _check_tools(self) -> _ToolFields:
        names = [t.function.name for t in self.tools or ()]
        if self.tool_choice is not None and not names:
            raise InvalidRequest(
                "tool_choice is only allowed when tools are specified.", param="tool_choice"
            )
        named = self.tool_choice if isinstance(self.tool_choice, NamedToolChoice) else None
        check_tool_names(names, named.function.name if named else None)
        return self

    def tool_list(self) -> list[Tool]:
        return [t.function.tool() for t in self.tools or ()]

    def choice(self) -> ToolChoice:
        if isinstance(self.tool_choice, NamedToolChoice):
            return ToolChoice("named", self.tool_choice.function.name)
        return ToolChoice(self.tool_choice or "auto")

    def output_request(self) -> OutputRequest:
        return OutputRequest(tools=self.tool_list(), choice=self.choice(),
                             parallel=self.parallel_tool_calls)


def template_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Messages as the chat template reads them."""
    out = []
    for i, m in enumerate(messages):
        msg = {**(m.model_extra or {}), "role": m.role, "content": m.text(f"messages.{i}")}
        if m.tool_calls:
            msg["tool_calls"] = [c.model_dump() for c in m.tool_calls]
        if m.tool_call_id is not None:
            msg["tool_call_id"] = m.tool_call_id
        if m.role == "developer":  # templates know "system"; OpenAI's newer name for it
            msg["role"] = "system"
        if msg["content"] is None:
            msg["content"] = ""
        out.append(msg)
    return out


ReasoningEffort = Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"]


class ChatCompletionRequest(_Sampling, _ToolFields):
    unsupported_fields: ClassVar[tuple[str, ...]] = (
        "functions", "function_call", "modalities", "audio", "prediction",
        "web_search_options", "verbosity", "suffix", "service_tier", "moderation",
    )
    harmless_values: ClassVar[dict[str, tuple[Any, ...]]] = {
        "modalities": (["text"],), "verbosity": ("medium",), "service_tier": SERVICE_TIERS,
    }

    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)]
    response_format: ResponseFormat | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    store: bool | None = None  # kept, listed and resumable (routes/stored_chat.py)
    metadata: Metadata | None = None
    # Reach the chat template: vLLM's extension (e.g. {"enable_thinking": false}), and
    # OpenAI's effort for the templates that read it (refused by name elsewhere).
    chat_template_kwargs: dict[str, Any] | None = None
    reasoning_effort: ReasoningEffort | None = None
    # Accepted and harmless: they change nothing about the text.
    prompt_cache_key: Name | None = None
    prompt_cache_retention: Name | None = None
    safety_identifier: Annotated[str, Field(max_length=64)] | None = None

    @model_validator(mode="after")
    def _check_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequest(
                "top_logprobs requires logprobs to be true.", param="top_logprobs"
            )
        return self

    def output_request(self) -> OutputRequest:
        fmt = self.response_format
        return dataclasses.replace(
            super().output_request(),
            response_format=fmt.model_dump(by_alias=True) if fmt is not None else None,
        )

    def template_messages(self) -> list[dict[str, Any]]:
        return template_messages(self.messages)

    def to_sampling(self) -> SamplingRequest:
        max_tokens = self.max_completion_tokens or self.max_tokens
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self.sampling(max_tokens=max_tokens, logprobs=logprobs)


# -- text completions -----------------------------------------------------------------------

Prompt = (
    str
    | Annotated[list[str], Field(max_length=MAX_PROMPTS)]
    | list[int]
    | Annotated[list[list[int]], Field(max_length=MAX_PROMPTS)]
)


class CompletionRequest(_Sampling):
    unsupported_fields: ClassVar[tuple[str, ...]] = ("suffix",)

    prompt: Prompt
    max_tokens: Annotated[int, Field(ge=1)] | None = 16  # OpenAI's default for completions
    echo: bool | None = None
    logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    best_of: Annotated[int, Field(ge=1)] | None = None

    @model_validator(mode="after")
    def _check_best_of(self) -> CompletionRequest:
        if self.best_of is not None and self.best_of != self.n:
            raise UnsupportedParameter(
                "best_of different from n is not supported.", param="best_of"
            )
        if self.echo and self.logprobs is not None:
            raise UnsupportedParameter(
                "echo together with logprobs (prompt logprobs) is not supported yet.",
                param="echo",
            )
        return self

    def prompts(self) -> list[str | list[int]]:
        return _texts_or_token_lists(self.prompt, "prompt")

    def to_sampling(self) -> SamplingRequest:
        return self.sampling(max_tokens=self.max_tokens, logprobs=self.logprobs)


# -- embeddings -----------------------------------------------------------------------------


class EmbeddingRequest(_Request):
    model: Name
    input: (
        str
        | Annotated[list[str], Field(max_length=MAX_EMBEDDING_INPUTS)]
        | list[int]
        | Annotated[list[list[int]], Field(max_length=MAX_EMBEDDING_INPUTS)]
    )
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, Field(ge=1)] | None = None
    user: Name | None = None

    def inputs(self) -> list[str | list[int]]:
        return _texts_or_token_lists(self.input, "input")


def _texts_or_token_lists(
    value: str | list[str] | list[int] | list[list[int]], param: str
) -> list[str | list[int]]:
    """OpenAI's four shapes of `prompt`/`input` as a list of texts or token lists."""
    if isinstance(value, str):
        return [value]
    if not value:
        raise InvalidRequest(f"{param} must not be empty.", param=param)
    if all(isinstance(x, int) for x in value):
        return [list(value)]  # type: ignore[arg-type]
    return list(value)  # type: ignore[arg-type]


# -- tokenize, detokenize (vLLM's) ----------------------------------------------------------


class TokenizeRequest(_ToolFields):
    """POST /tokenize: vLLM's two shapes in one model, a `prompt` or chat `messages`
    (rendered with the model's template as a chat completion renders them)."""

    # vLLM's that we do not serve: a template sent by the client (vLLM too refuses it unless
    # told to trust it), and multimodal inputs.
    unsupported_fields: ClassVar[tuple[str, ...]] = (
        "chat_template", "mm_processor_kwargs", "media_io_kwargs",
    )
    _CHAT_ONLY: ClassVar[tuple[str, ...]] = (
        "add_generation_prompt", "continue_final_message", "chat_template_kwargs", "tools",
        "tool_choice", "parallel_tool_calls",
    )

    model: Name
    prompt: str | None = None
    messages: Annotated[
        list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)] | None = None
    # None: vLLM's defaults, true for a prompt (BOS as a completion adds it), false for
    # messages (the template writes what it wants)
    add_special_tokens: bool | None = None
    return_token_strs: bool | None = None
    add_generation_prompt: bool | None = None  # None: true, unless continue_final_message
    continue_final_message: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _check_shape(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise InvalidRequest("Send either 'prompt' or 'messages', not both or neither.",
                                 param="prompt" if self.prompt is not None else "messages")
        if self.prompt is not None:
            given = next((f for f in self._CHAT_ONLY if getattr(self, f) is not None), None)
            if given is not None:
                raise InvalidRequest(f"'{given}' goes with 'messages', not 'prompt'.", param=given)
        if self.continue_final_message and self.add_generation_prompt:
            raise InvalidRequest(
                "continue_final_message and add_generation_prompt cannot both be true.",
                param="continue_final_message",
            )
        return self

    @property
    def chat(self) -> bool:
        return self.messages is not None

    @property
    def special_tokens(self) -> bool:
        if self.add_special_tokens is not None:
            return self.add_special_tokens
        return not self.chat

    @property
    def generation_prompt(self) -> bool:
        if self.add_generation_prompt is not None:
            return self.add_generation_prompt
        return not self.continue_final_message

    def template_messages(self) -> list[dict[str, Any]]:
        return template_messages(self.messages or [])


class DetokenizeRequest(_Request):
    """POST /detokenize (vLLM's)."""

    model: Name
    tokens: list[int]


# -- rerank and score (vLLM's, Jina's and Cohere's shapes) ---------------------------------

MAX_SCORE_TEXTS = 2048  # documents of a rerank, texts on either side of a score


class TextDocument(BaseModel):
    """A document sent as Cohere's `{"text": ...}` object rather than a string."""

    model_config = ConfigDict(extra="forbid")
    text: str


class _ScoreFields(_Request):
    # vLLM's own extensions: refused by name unless asking for nothing more than served.
    unsupported_fields: ClassVar[tuple[str, ...]] = (
        "truncate_prompt_tokens", "priority", "use_activation", "mm_processor_kwargs",
    )
    harmless_values: ClassVar[dict[str, tuple[Any, ...]]] = {
        "priority": (0,), "use_activation": (True,),
    }

    model: Name


class RerankRequest(_ScoreFields):
    query: str
    documents: Annotated[list[str | TextDocument], Field(max_length=MAX_SCORE_TEXTS)]
    top_n: Annotated[int, Field(ge=0)] | None = None  # None or 0: every document
    return_documents: bool = True

    def texts(self) -> list[str]:
        return [d if isinstance(d, str) else d.text for d in self.documents]


class ScoreRequest(_ScoreFields):
    text_1: str | Annotated[list[str], Field(max_length=MAX_SCORE_TEXTS)]
    text_2: str | Annotated[list[str], Field(max_length=MAX_SCORE_TEXTS)]

    def sides(self) -> tuple[list[str], list[str]]:
        return tuple([t] if isinstance(t, str) else list(t)  # type: ignore[return-value]
                     for t in (self.text_1, self.text_2))


# -- LoRA adapters while serving (vLLM's) --------------------------------------------------


class LoadLoraAdapterRequest(_Request):
    """POST /v1/load_lora_adapter: vLLM's fields; `base_model` and `scale` are ours."""

    unsupported_fields: ClassVar[tuple[str, ...]] = ("load_inplace",)
    harmless_values: ClassVar[dict[str, tuple[Any, ...]]] = {"load_inplace": (False,)}

    lora_name: Annotated[str, Field(min_length=1, max_length=MAX_NAME_CHARS)]
    lora_path: Annotated[str, Field(min_length=1, max_length=4096)]
    base_model: Name | None = None  # which chat model it adapts (needed with several)
    scale: Annotated[float, Field(ge=0.0, le=100.0)] = 1.0


class UnloadLoraAdapterRequest(_Request):
    """POST /v1/unload_lora_adapter: vLLM's fields (its integer id has no meaning here)."""

    lora_name: Annotated[str, Field(min_length=1, max_length=MAX_NAME_CHARS)]
    lora_int_id: int | None = None
