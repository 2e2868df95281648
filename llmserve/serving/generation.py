"""One request through the engine: token ids -> whole-character text deltas, stop strings,
logprobs, finish reasons and usage. Every engine streams through this same code."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Literal

from llmserve.engines.base import Engine, EngineError, FinishReason, SamplingParams, TokenOutput
from llmserve.errors import EngineFailure, InvalidRequest, QueueTimeout
from llmserve.serving.availability import engine_failure
from llmserve.serving.detokenizer import IncrementalDetokenizer, token_text
from llmserve.serving.metrics import ModelMetrics, NoStats, RequestStats
from llmserve.serving.reasoning import ReasoningParser
from llmserve.serving.scheduler import Reservation
from llmserve.serving.stops import StopMatcher
from llmserve.serving.tool_calls import OutputParser, ToolCallDelta


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    token: str
    bytes: bytes
    logprob: float
    top: tuple[tuple[str, bytes, float], ...] = ()


@dataclass(slots=True)
class ChoiceDelta:
    index: int
    text: str
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: FinishReason | Literal["tool_calls"] | None = None
    tool_calls: list[ToolCallDelta] = field(default_factory=list)
    reasoning: str = ""  # a thinking model's reasoning, apart from `text`


@dataclass(slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int | None = None  # counted where the model reasons

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class _Choice:
    __slots__ = ("index", "detok", "stops", "pending", "done", "tokens", "want_logprobs",
                 "parser", "reasoning")

    def __init__(
        self, index: int, stops: list[str], want_logprobs: bool, parser: OutputParser | None,
        reasoning: ReasoningParser | None,
    ) -> None:
        self.index = index
        self.detok = IncrementalDetokenizer()
        self.stops = StopMatcher(stops)
        self.pending: list[TokenLogprob] = []
        self.done = False
        self.tokens = 0
        self.want_logprobs = want_logprobs
        self.parser = parser
        self.reasoning = reasoning


class Generation:
    """Runs one prompt with n choices and yields, per engine step, the choices' deltas.

    `index_offset` numbers the choices of several prompts in one completions request.
    With a `reservation` (one sequence slot per choice), generation first waits for its
    turn; `close` gives the reservation back if generation never ran. With `metrics`, it
    reports its queue time, tokens, latencies and outcome to them (see serving/metrics.py).
    """

    def __init__(
        self,
        engine: Engine,
        prompt: list[int],
        params: list[SamplingParams],
        *,
        stop: Sequence[str] = (),
        index_offset: int = 0,
        reservation: Reservation | None = None,
        request_id: str | None = None,
        metrics: ModelMetrics | None = None,
        parser: Callable[[], OutputParser] | None = None,
        calls_finish: Literal["tool_calls", "stop"] = "tool_calls",
        reasoning: Callable[[], ReasoningParser] | None = None,
    ) -> None:
        self._engine = engine
        self._prompt = prompt
        self._params = params
        self._offset = index_offset
        self._reservation = reservation
        self._request_id = request_id
        self._choices = [
            _Choice(i, list(stop), p.logprobs is not None, parser() if parser else None,
                    reasoning() if reasoning else None)
            for i, p in enumerate(params)
        ]
        self._calls_finish = calls_finish
        self.usage = Usage(prompt_tokens=len(prompt),
                           reasoning_tokens=0 if reasoning is not None else None)
        self._stats: RequestStats | NoStats = NoStats()
        if metrics is not None:
            self._stats = metrics.request(len(prompt), len(params), index_offset)

    async def deltas(self) -> AsyncIterator[list[ChoiceDelta]]:
        try:
            if self._reservation is not None:
                await self._reservation.wait()
            self._stats.granted()
            async with aclosing(self._run()) as it:
                async for batch in it:
                    yield batch
        except QueueTimeout:
            self._stats.end("abort")  # the server gave up waiting for a slot
            raise
        except Exception:
            self._stats.end("error")
            raise
        finally:
            self.close()  # cancelled, or the consumer stopped reading: abort

    def close(self) -> None:
        """Give back the slots (or the place in line); safe to call more than once. Choices
        not finished by now count as aborted."""
        self._stats.end("abort")
        if self._reservation is not None:
            self._reservation.release()

    async def _run(self) -> AsyncIterator[list[ChoiceDelta]]:
        try:
            stream = self._engine.generate(self._prompt, self._params, request_id=self._request_id)
        except EngineError as exc:
            raise engine_failure(exc) from exc
        except ValueError as exc:  # what this engine cannot do (vllm: a grammar): the request's
            raise InvalidRequest(str(exc)) from exc
        live = len(self._choices)
        async with aclosing(stream.__aiter__()) as steps:
            try:
                async for outputs in steps:
                    batch = []
                    tokens = self.usage.completion_tokens
                    for out in outputs:
                        choice = self._choices[out.index]
                        if choice.done:
                            continue  # sampled in the step after a stop string ended it
                        delta = self._advance(choice, out)
                        if choice.done:
                            live -= 1
                            if out.finish_reason is None:
                                stream.cancel(out.index)
                        if delta is not None:
                            batch.append(delta)
                    self._stats.step(self.usage.completion_tokens - tokens, batch)
                    if batch:
                        yield batch
                    if live == 0:
                        return
            except EngineError as exc:
                raise engine_failure(exc) from exc
        if live:
            raise EngineFailure("the engine ended the request before it finished")

    def _advance(self, choice: _Choice, out: TokenOutput) -> ChoiceDelta | None:
        choice.tokens += 1
        self.usage.completion_tokens += 1
        data = b"" if out.end_of_generation else self._engine.token_bytes(out.token_id)
        text = choice.detok.feed(data) if data else ""
        if choice.want_logprobs and out.logprob is not None:
            choice.pending.append(self._logprob(data, out))
        finish = out.finish_reason
        if finish is not None:
            text += choice.detok.flush()
        result = choice.stops.feed(text)
        text = result.text
        if result.stopped:
            finish = "stop"
        elif finish is not None:
            text += choice.stops.flush()
        if finish is not None:
            choice.done = True
        thought = ""
        if choice.reasoning is not None:  # the reasoning first: tools are in the answer
            thinking = choice.reasoning.reasoning
            thought, text = choice.reasoning.feed(text)
            if finish is not None:
                more_thought, more_text = choice.reasoning.flush()
                thought, text = thought + more_thought, text + more_text
            if thinking or choice.reasoning.reasoning:
                self.usage.reasoning_tokens = (self.usage.reasoning_tokens or 0) + 1
        calls: list[ToolCallDelta] = []
        if choice.parser is not None:
            text, calls = choice.parser.feed(text)
            if finish is not None:
                text += choice.parser.flush()
            if finish == "stop" and choice.parser.called:
                finish = self._calls_finish
        if not text and not calls and not thought and finish is None:
            return None  # held back: part of a character, a stop string, a tag, tool syntax
        logprobs: list[TokenLogprob] = []
        if choice.pending and (text or calls or thought or not result.stopped):
            logprobs, choice.pending = choice.pending, []
        return ChoiceDelta(choice.index + self._offset, text, logprobs, finish, calls, thought)

    def _logprob(self, data: bytes, out: TokenOutput) -> TokenLogprob:
        top = tuple(
            (token_text(b := self._engine.token_bytes(t)), b, lp) for t, lp in out.top_logprobs or ()
        )
        return TokenLogprob(token_text(data), data, out.logprob, top)


async def merge(generations: list[Generation]) -> AsyncIterator[list[ChoiceDelta]]:
    """The deltas of several generations (one per prompt) as one stream, as they come."""
    if len(generations) == 1:
        async with aclosing(generations[0].deltas()) as it:
            async for batch in it:
                yield batch
        return
    queue: asyncio.Queue[list[ChoiceDelta] | BaseException | None] = asyncio.Queue()

    async def pump(gen: Generation) -> None:
        try:
            async with aclosing(gen.deltas()) as it:
                async for batch in it:
                    queue.put_nowait(batch)
        except Exception as exc:  # noqa: BLE001 - handed to the consumer
            queue.put_nowait(exc)
        finally:
            queue.put_nowait(None)

    tasks = [asyncio.create_task(pump(g)) for g in generations]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
