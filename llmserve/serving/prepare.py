"""Requests -> what an engine runs: prompt tokens and sampling params, checked against the
model. The one home of templating, tokenizing and context checks, for every route.

Templating and tokenizing run on a worker thread, after a length check that needs neither:
a prompt far too long for the context is refused at once, and a huge one costs its own
request, not every stream the event loop is serving.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import anyio.to_thread

from llmserve.engines.base import Engine, SamplingParams
from llmserve.errors import ContextLengthExceeded, InvalidRequest
from llmserve.serving import constraints
from llmserve.serving.chat_template import ChatTemplate, TemplateError
from llmserve.serving.reasoning import ReasoningFormat, ReasoningParser
from llmserve.serving.sampling import SamplingRequest, build_params
from llmserve.serving.tool_calls import (
    OutputParser,
    OutputPlan,
    OutputRequest,
    ToolFormat,
    parallel_calls,
    plan_output,
)

# Special tokens are no token's bytes (their text is parsed from the prompt): a floor for
# their text's length, so the length check never refuses a prompt that could fit.
_SPECIAL_TEXT_FLOOR = 64

# The template variables that the request's fields and the model set: no
# chat_template_kwargs in their place.
_TEMPLATE_VARIABLES = frozenset({"messages", "tools", "add_generation_prompt",
                                 "continue_final_message", "bos_token", "eos_token"})


@dataclass(frozen=True, slots=True)
class PreparedPrompt:
    tokens: list[int]
    params: list[SamplingParams]  # one per choice


@dataclass(frozen=True, slots=True)
class Prepared:
    prompts: list[PreparedPrompt]
    n: int  # choices per prompt
    stop: list[str]
    # Tool calls: each choice's output parser, and the finish_reason once it called.
    parser: Callable[[], OutputParser] | None = None
    calls_finish: Literal["tool_calls", "stop"] = "tool_calls"
    # A thinking model: each choice's reasoning splitter (serving/reasoning.py).
    reasoning: Callable[[], ReasoningParser] | None = None


class Preparer:
    """One model's prompt rules: its template, its tokenizer, its context."""

    def __init__(
        self, engine: Engine, template: ChatTemplate, tool_format: ToolFormat = "generic",
        reasoning: ReasoningFormat | None = None,
    ) -> None:
        self._engine = engine
        self._template = template
        self._tool_format = tool_format
        self._reasoning = reasoning
        # No token stands for more bytes than this, so a text of k characters (at least k
        # bytes) is at least k / this many tokens.
        self._max_token_bytes = max(
            _SPECIAL_TEXT_FLOOR, len(engine.bos_token), len(engine.eos_token),
            *(len(engine.token_bytes(t)) for t in range(engine.vocab_size)),
        )

    async def chat(
        self,
        messages: list[dict[str, Any]],
        sampling: SamplingRequest,
        stop: list[str],
        output: OutputRequest | None = None,
        template_kwargs: dict[str, Any] | None = None,
        reasoning_effort: str | None = None,
        effort_param: str = "reasoning_effort",
    ) -> Prepared:
        """`output`: the tools and response_format that shape the answer (see tool_calls);
        `template_kwargs`: more variables for the template (chat_template_kwargs);
        `reasoning_effort`: for a template that reads it, refused where none does (naming
        `effort_param`, the request's field)."""
        self._check_n(sampling)
        template_kwargs = self._template_kwargs(template_kwargs)
        if reasoning_effort is not None:
            if not self._template.reads("reasoning_effort"):
                raise InvalidRequest(
                    f"{effort_param} is not supported by this model: its chat template does "
                    "not read reasoning_effort.", param=effort_param)
            template_kwargs.setdefault("reasoning_effort", reasoning_effort)
        chars = sum(len(m["content"]) for m in messages if isinstance(m.get("content"), str))
        self._check_length(self._least_tokens(chars), "messages")
        plan, text, tokens = await anyio.to_thread.run_sync(functools.partial(
            self._chat_tokens, messages, output or OutputRequest(), extra=template_kwargs))
        grammar, reasoning = plan.grammar, None
        if self._reasoning is not None:
            fmt = self._reasoning
            opened = fmt.opened_in(text)
            reasoning = functools.partial(ReasoningParser, fmt, opened=opened)
            if grammar is not None and not fmt.closed_in(text):
                grammar = constraints.after_reasoning(grammar, fmt, opened=opened)
        sampling = dataclasses.replace(sampling, grammar=grammar)
        return dataclasses.replace(self._prepared([tokens], sampling, stop), parser=plan.parser,
                                   calls_finish=plan.calls_finish, reasoning=reasoning)

    async def completion(
        self, prompts: list[str | list[int]], sampling: SamplingRequest, stop: list[str]
    ) -> Prepared:
        self._check_n(sampling)
        for p in prompts:
            least = self._least_tokens(len(p)) if isinstance(p, str) else len(p)
            self._check_length(least, "prompt")
        tokens = await anyio.to_thread.run_sync(self._completion_tokens, prompts)
        return self._prepared(tokens, sampling, stop)

    # -- tokens alone (/tokenize, /detokenize) ------------------------------------------------

    async def chat_tokens(
        self,
        messages: list[dict[str, Any]],
        output: OutputRequest | None = None,
        *,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        add_special_tokens: bool = False,
        template_kwargs: dict[str, Any] | None = None,
    ) -> list[int]:
        """The prompt tokens of `messages`, by the very path of `chat`: with the defaults,
        exactly the prompt a chat completion of them reads (its usage.prompt_tokens).
        `add_special_tokens`: the model's BOS on top of what the template writes;
        `template_kwargs`: more variables for the template."""
        _, _, tokens = await anyio.to_thread.run_sync(functools.partial(
            self._chat_tokens, messages, output or OutputRequest(),
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            add_bos=add_special_tokens and self._engine.add_bos,
            extra=self._template_kwargs(template_kwargs),
        ))
        return tokens

    async def text_tokens(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """The tokens of a raw prompt; with `add_special_tokens`, as a completion reads it."""
        engine = self._engine
        return await anyio.to_thread.run_sync(functools.partial(
            engine.tokenize, text, add_bos=add_special_tokens and engine.add_bos))

    async def detokenize(self, ids: list[int], param: str = "tokens") -> str:
        self._check_ids(ids, param)
        return await anyio.to_thread.run_sync(self._engine.detokenize, ids)

    async def token_strs(self, ids: list[int]) -> list[str]:
        return await anyio.to_thread.run_sync(self._engine.token_strs, ids)

    def prompt_text(self, tokens: list[int]) -> str:
        """A prompt's text, for `echo`."""
        return b"".join(self._engine.token_bytes(t) for t in tokens).decode("utf-8", "replace")

    def parallel_calls(self, requested: bool | None) -> bool:
        """Whether an answer may hold several tool calls, `requested` or not."""
        return parallel_calls(requested, self._tool_format)

    # -- checks before any work -------------------------------------------------------------

    @staticmethod
    def _template_kwargs(kwargs: dict[str, Any] | None) -> dict[str, Any]:
        kwargs = dict(kwargs or {})
        taken = sorted(_TEMPLATE_VARIABLES.intersection(kwargs))
        if taken:
            raise InvalidRequest(
                f"chat_template_kwargs cannot set {', '.join(taken)}: the request's own fields "
                "and the model decide them.", param="chat_template_kwargs")
        return kwargs

    def _check_n(self, sampling: SamplingRequest) -> None:
        limit = self._engine.max_sequences
        if sampling.n > limit:
            raise InvalidRequest(
                f"n={sampling.n} is more than the {limit} sequences this server decodes "
                "together (--max-sequences).",
                param="n",
            )

    def _least_tokens(self, chars: int) -> int:
        return math.ceil(chars / self._max_token_bytes)

    def _check_length(self, least: int, param: str) -> None:
        """Refuse, before tokenizing it, a prompt of at least `least` tokens that cannot fit
        even without an answer (what fits with `max_tokens` is checked once tokenized): the
        work saved is bounded by the context."""
        context = self._engine.context_length
        if least >= context:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {context} tokens. However, your "
                f"{param} alone would be at least {least} tokens. Please reduce the {param}.",
                param=param,
            )

    # -- on a worker thread -------------------------------------------------------------------

    def _chat_tokens(
        self, messages: list[dict[str, Any]], output: OutputRequest, *,
        add_generation_prompt: bool = True, continue_final_message: bool = False,
        add_bos: bool = False, extra: dict[str, Any] | None = None,
    ) -> tuple[OutputPlan, str, list[int]]:
        plan = plan_output(messages, output, self._tool_format)
        variables = dict(extra or {})
        if plan.template_tools:
            variables["tools"] = plan.template_tools
        try:
            text = self._template.render(
                plan.messages, add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message, **variables)
        except TemplateError as exc:
            raise InvalidRequest(str(exc), param="messages") from None
        return plan, text, self._engine.tokenize(text, add_bos=add_bos)

    def _check_ids(self, ids: list[int], param: str) -> None:
        vocab = self._engine.vocab_size
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidRequest(f"Token id {bad} is outside the vocabulary.", param=param)

    def _completion_tokens(self, prompts: list[str | list[int]]) -> list[list[int]]:
        engine = self._engine
        out = []
        for i, p in enumerate(prompts):
            if isinstance(p, str):
                tokens = engine.tokenize(p, add_bos=engine.add_bos)
            else:
                self._check_ids(p, "prompt")
                tokens = list(p)
            if not tokens:
                raise InvalidRequest(f"Prompt {i} is empty.", param="prompt")
            out.append(tokens)
        return out

    def _prepared(
        self, prompts: list[list[int]], sampling: SamplingRequest, stop: list[str]
    ) -> Prepared:
        engine = self._engine
        return Prepared(
            prompts=[
                PreparedPrompt(tokens, build_params(
                    sampling, prompt_tokens=len(tokens), context_length=engine.context_length,
                    vocab_size=engine.vocab_size,
                ))
                for tokens in prompts
            ],
            n=sampling.n,
            stop=stop,
        )
