"""What every speculation test asks of its engine: texts to copy (drafts accepted) and to make
up (drafts mostly rejected), a grammar-bound copy, and a comparison of an engine's outputs with
speculation off and on (`from speculation_cases import ...`)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from llmserve.engines.base import SamplingParams, TokenOutput

PARAGRAPH = (
    "The old lighthouse stood at the edge of the cliff for more than a century, guiding ships "
    "through the narrow strait. Its keeper, a quiet man named Elias, climbed the spiral stairs "
    "every evening to light the lamp, and every morning he wrote the weather in a worn leather "
    "book."
)
REPEAT = f"Repeat this text exactly: {PARAGRAPH}"
FREE = "Write a short story about a dragon who learns to cook."
RECORD_SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "city": {"type": "string"},
                   "job": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "city", "job", "age"],
    "additionalProperties": False,
}
RECORD_PROMPT = ('Repeat this JSON exactly: {"name": "Elias Marsh", "city": "Port Avery", '
                 '"job": "lighthouse keeper", "age": 61}')


def record_grammar() -> str:
    from llguidance import LLMatcher

    return LLMatcher.grammar_from_json_schema(RECORD_SCHEMA)


def greedy(max_tokens: int = 96, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, **kw)


def seeded(seed: int, max_tokens: int = 96, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.8, seed=seed, **kw)


def chat(engine, text: str) -> list[int]:
    """The bundled model's chat prompt for one user message."""
    return engine.tokenize(
        f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n", add_bos=False
    )


async def outputs(engine, prompt, params) -> list[list[TokenOutput]]:
    out: list[list[TokenOutput]] = [[] for _ in params]
    async for step in engine.generate(prompt, params):
        for t in step:
            out[t.index].append(t)
    return out


def run_on(engine, fn):
    """`await fn(engine)` in a fresh event loop with the decode thread started for it."""

    async def main():
        await engine.start()
        try:
            return await fn(engine)
        finally:
            engine.shutdown()
            await asyncio.to_thread(engine._thread.join)
            engine._thread = None

    return asyncio.run(main())


def _assert_equal(got, want) -> None:
    assert got == want


def compare(engines, text: str, params: list[SamplingParams],
            assert_same: Callable[[list, list], None] = _assert_equal) -> tuple[list, int]:
    """What `params` generate for `text` with speculation off and on (asserted the same), and
    how many drafted tokens the speculating engine accepted meanwhile."""
    on = engines["ngram"]
    accepted = on.spec_decode_stats().accepted_tokens

    async def fn(e):
        return await outputs(e, chat(e, text), params)

    off_out, on_out = run_on(engines["off"], fn), run_on(on, fn)
    assert_same(on_out, off_out)
    assert engines["off"].spec_decode_stats() is None
    return on_out, on.spec_decode_stats().accepted_tokens - accepted
