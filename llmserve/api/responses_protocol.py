"""The Responses API request (`POST /v1/responses`) as a pydantic model.

As for chat, unknown fields are refused by name and OpenAI fields we do not serve are
refused when set. Input items are checked and normalised in `serving.responses`, which
knows what the template can take.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from llmserve.api.protocol import (
    MAX_MESSAGES,
    MAX_TOOLS,
    SERVICE_TIERS,
    FunctionDefinition,
    FunctionName,
    JsonObjectFormat,
    Metadata,
    Name,
    ReasoningEffort,
    TextFormat,
    _SamplingFields,
    check_tool_names,
)
from llmserve.errors import InvalidRequest, UnsupportedParameter
from llmserve.serving.sampling import SamplingRequest
from llmserve.serving.tool_calls import OutputRequest, Tool, ToolChoice


class ResponseFunctionTool(FunctionDefinition):
    """A function tool as the Responses API writes it: flat, not under `function`."""

    type: Literal["function"]


class ResponseReasoning(BaseModel):
    """`reasoning`: the effort reaches a chat template that reads `reasoning_effort` (refused
    where none does); a summary is accepted, but the reasoning comes whole, as
    `reasoning_text` content, never summarised."""

    model_config = ConfigDict(extra="forbid")
    effort: ReasoningEffort | None = None
    summary: Literal["auto", "concise", "detailed"] | None = None
    generate_summary: Literal["auto", "concise", "detailed"] | None = None  # summary's old name


class ResponseNamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    name: str


class TextFormatJsonSchema(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    type: Literal["json_schema"]
    name: FunctionName
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


ResponseTextFormat = Annotated[
    TextFormat | JsonObjectFormat | TextFormatJsonSchema, Field(discriminator="type")
]


class ResponseText(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format: ResponseTextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None

    @field_validator("verbosity")
    @classmethod
    def _one_verbosity(cls, value: str | None) -> str | None:
        # Medium is OpenAI's default, and the only way this server answers.
        if value not in (None, "medium"):
            raise UnsupportedParameter(
                "'text.verbosity' is not supported by this server yet (accepted: 'medium').",
                param="text.verbosity",
            )
        return value


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_obfuscation: bool | None = None  # accepted; we never obfuscate


class CreateResponseRequest(_SamplingFields):
    unsupported_fields: ClassVar[tuple[str, ...]] = (
        "conversation", "prompt", "max_tool_calls", "top_logprobs", "context_management",
        "service_tier",
    )
    harmless_values: ClassVar[dict[str, tuple[Any, ...]]] = {"service_tier": SERVICE_TIERS}

    model: Name
    input: str | Annotated[list[dict[str, Any]], Field(max_length=MAX_MESSAGES)]
    instructions: str | None = None
    max_output_tokens: Annotated[int, Field(ge=1)] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    tools: Annotated[list[dict[str, Any]], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: Literal["none", "auto", "required"] | ResponseNamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    text: ResponseText | None = None
    metadata: Metadata | None = None
    store: bool | None = None
    previous_response_id: Name | None = None
    background: bool | None = None
    include: list[str] | None = None
    reasoning: ResponseReasoning | None = None
    truncation: Literal["disabled", "auto"] | None = None
    # Accepted and harmless: they change nothing about the text.
    user: Name | None = None
    prompt_cache_key: Name | None = None
    prompt_cache_retention: Name | None = None
    safety_identifier: Annotated[str, Field(max_length=64)] | None = None
    _tools: list[Tool] = PrivateAttr(default_factory=list)  # `tools`, checked once

    @model_validator(mode="after")
    def _check(self) -> CreateResponseRequest:
        if self.stream_options is not None and not self.stream:
            raise InvalidRequest(
                "stream_options is only allowed when stream is true.", param="stream_options"
            )
        if self.include:
            raise UnsupportedParameter(
                f"include {self.include[0]!r} is not supported by this server.", param="include"
            )
        if self.truncation == "auto":
            raise UnsupportedParameter(
                "truncation 'auto' is not supported; inputs that do not fit are refused.",
                param="truncation",
            )
        if self.background and self.store is False:
            raise InvalidRequest("background responses must be stored: store cannot be false.",
                                 param="background")
        self._tools = self._function_tools()
        names = [t.name for t in self._tools]
        if self.tool_choice == "required" and not names:
            raise InvalidRequest("tool_choice 'required' needs tools.", param="tool_choice")
        named = self.tool_choice if isinstance(self.tool_choice, ResponseNamedToolChoice) else None
        check_tool_names(names, named.name if named else None)
        return self

    @property
    def stored(self) -> bool:
        return self.store is not False  # OpenAI's default: stored

    def _function_tools(self) -> list[Tool]:
        tools = []
        for i, raw in enumerate(self.tools or ()):
            if raw.get("type") != "function":
                raise UnsupportedParameter(
                    f"Tools of type {raw.get('type')!r} are not supported; only function tools.",
                    param=f"tools.{i}.type",
                )
            try:
                tools.append(ResponseFunctionTool.model_validate(raw).tool())
            except ValueError as exc:
                raise InvalidRequest(f"Invalid function tool: {exc}", param=f"tools.{i}") from None
        return tools

    def output_request(self) -> OutputRequest:
        if isinstance(self.tool_choice, ResponseNamedToolChoice):
            choice = ToolChoice("named", self.tool_choice.name)
        else:
            choice = ToolChoice(self.tool_choice or "auto")
        fmt = self.text.format if self.text is not None else None
        response_format: dict[str, Any] | None = None
        if isinstance(fmt, TextFormatJsonSchema):  # as chat's response_format has it
            response_format = {"type": "json_schema", "json_schema": {
                "name": fmt.name, "schema": fmt.schema_, "strict": fmt.strict}}
        elif fmt is not None:
            response_format = {"type": fmt.type}
        return OutputRequest(tools=self._tools, choice=choice,
                             parallel=self.parallel_tool_calls,
                             response_format=response_format)

    def to_sampling(self) -> SamplingRequest:
        return self.sampling_request(n=1, max_tokens=self.max_output_tokens, logprobs=None,
                                     logit_bias={})

    def echo_fields(self, parallel_tool_calls: bool) -> dict[str, Any]:
        """What a Response object repeats of its request (`parallel_tool_calls`: what the
        request's model makes of the field, which may be left out)."""
        fmt = self.text.format if self.text is not None and self.text.format else None
        return {
            "instructions": self.instructions,
            "max_output_tokens": self.max_output_tokens,
            "metadata": self.metadata or {},
            "parallel_tool_calls": parallel_tool_calls,
            "previous_response_id": self.previous_response_id,
            "temperature": 1.0 if self.temperature is None else self.temperature,
            "top_p": 1.0 if self.top_p is None else self.top_p,
            "tool_choice": (self.tool_choice.model_dump() if isinstance(
                self.tool_choice, ResponseNamedToolChoice) else self.tool_choice or "auto"),
            "tools": [
                {"type": "function", "name": t.name, "description": t.description,
                 "parameters": t.parameters, "strict": t.strict}
                for t in self._tools
            ],
            "text": {"format": fmt.model_dump(by_alias=True, exclude_none=True)
                     if fmt is not None else {"type": "text"}},
            "truncation": "disabled",
            "store": self.stored,
            "background": bool(self.background),
            "reasoning": ({"effort": self.reasoning.effort,
                           "summary": self.reasoning.summary or self.reasoning.generate_summary}
                          if self.reasoning is not None else None),
            "service_tier": "default",
            **({"user": self.user} if self.user is not None else {}),
        }
