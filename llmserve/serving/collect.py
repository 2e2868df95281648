"""A whole answer gathered from its deltas: for answers not streamed, and for stored
streams (kept as a completion once they end)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field

from llmserve.serving.generation import ChoiceDelta, TokenLogprob
from llmserve.serving.tool_calls import ToolCallDelta


@dataclass
class CollectedChoice:
    text: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    tool_calls: list[dict] = field(default_factory=list)  # OpenAI's, assembled
    reasoning: list[str] = field(default_factory=list)

    def add_calls(self, deltas: list[ToolCallDelta]) -> None:
        for d in deltas:
            if d.id is not None:
                self.tool_calls.append({"id": d.id, "type": "function",
                                        "function": {"name": d.name, "arguments": d.arguments}})
            else:
                self.tool_calls[-1]["function"]["arguments"] += d.arguments


def collect_batch(choices: list[CollectedChoice], batch: list[ChoiceDelta]) -> None:
    for d in batch:
        c = choices[d.index]
        c.text.append(d.text)
        if d.reasoning:
            c.reasoning.append(d.reasoning)
        c.logprobs.extend(d.logprobs)
        if d.tool_calls:
            c.add_calls(d.tool_calls)
        if d.finish_reason:
            c.finish_reason = d.finish_reason


async def collect(deltas: AsyncIterator[list[ChoiceDelta]], n: int) -> list[CollectedChoice]:
    choices = [CollectedChoice() for _ in range(n)]
    async with aclosing(deltas) as it:
        async for batch in it:
            collect_batch(choices, batch)
    return choices
