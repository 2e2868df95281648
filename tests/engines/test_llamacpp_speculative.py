"""Prompt-lookup speculation on the llama.cpp engine never changes what is generated: every
token, logprob and finish reason is the same with it on as off, greedy or seeded, up to
max_tokens or the context's end, under a grammar, with n > 1 (where it stays off until a
sequence is alone); and on input-grounded work drafts are actually accepted."""

from __future__ import annotations

import asyncio

import pytest
from llguidance import LLMatcher

from llmserve.engines.base import SamplingParams, TokenOutput
from llmserve.engines.llamacpp import LlamaCppEngine
from llmserve.models import bundled_model_path

PARAGRAPH = (
    "The old lighthouse stood at the edge of the cliff for more than a century, guiding ships "
    "through the narrow strait. Its keeper, a quiet man named Elias, climbed the spiral stairs "
    "every evening to light the lamp, and every morning he wrote the weather in a worn leather "
    "book."
)
REPEAT = f"Repeat this text exactly: {PARAGRAPH}"
FREE = "Write a short story about a dragon who learns to cook."
RECORD = {"name": "Elias Marsh", "city": "Port Avery", "job": "lighthouse keeper", "age": 61}
RECORD_SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "city": {"type": "string"},
                   "job": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "city", "job", "age"],
    "additionalProperties": False,
}
RECORD_GRAMMAR = LLMatcher.grammar_from_json_schema(RECORD_SCHEMA)
RECORD_PROMPT = ('Repeat this JSON exactly: {"name": "Elias Marsh", "city": "Port Avery", '
                 '"job": "lighthouse keeper", "age": 61}')


def chat(engine: LlamaCppEngine, text: str) -> list[int]:
    return engine.tokenize(
        f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n", add_bos=False
    )


def greedy(max_tokens: int = 96, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, **kw)


def seeded(seed: int, max_tokens: int = 96, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.8, seed=seed, **kw)


async def outputs(engine, prompt, params) -> list[list[TokenOutput]]:
    out: list[list[TokenOutput]] = [[] for _ in params]
    async for step in engine.generate(prompt, params):
        for t in step:
            out[t.index].append(t)
    return out


def _engine(speculative: str, context_length: int, adaptive: bool = False) -> LlamaCppEngine:
    # Not adaptive unless asked: drafting whenever a guess exists puts every path through
    # verification, whatever this machine's step costs.
    return LlamaCppEngine(bundled_model_path(), context_length=context_length, max_sequences=4,
                          threads=2, speculative=speculative, speculative_tokens=6,
                          speculative_adaptive=adaptive)


@pytest.fixture(scope="module")
def engines():
    pair = {s: _engine(s, 512) for s in ("off", "ngram")}
    yield pair
    for e in pair.values():
        e.close()


def run_on(engine: LlamaCppEngine, fn):
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


def compare(engines, text: str, params: list[SamplingParams]) -> tuple[list, int]:
    """What `params` generate for `text` with speculation off and on (asserted equal), and
    how many drafted tokens the speculating engine accepted meanwhile."""
    on = engines["ngram"]
    accepted = on.spec_decode_stats().accepted_tokens

    async def fn(e):
        return await outputs(e, chat(e, text), params)

    off_out, on_out = run_on(engines["off"], fn), run_on(on, fn)
    assert on_out == off_out
    assert engines["off"].spec_decode_stats() is None
    return on_out, on.spec_decode_stats().accepted_tokens - accepted


def test_greedy_repeat_accepts_drafts_and_changes_nothing(engines):
    drafts = engines["ngram"].spec_decode_stats().drafts
    (out,), accepted = compare(engines, REPEAT, [greedy(logprobs=3)])
    assert len(out) > 40 and out[-1].finish_reason is not None
    assert engines["ngram"].spec_decode_stats().drafts > drafts
    assert accepted > 10, accepted


@pytest.mark.parametrize("seed", [1, 7])
def test_seeded_sampling_is_unchanged(engines, seed):
    compare(engines, REPEAT, [seeded(seed, logprobs=2)])
    compare(engines, FREE, [seeded(seed)])


def test_free_generation_greedy_is_unchanged(engines):
    compare(engines, FREE, [greedy(128)])


@pytest.mark.parametrize("max_tokens", [1, 2, 17, 30])
def test_max_tokens_inside_a_draft(engines, max_tokens):
    (out,), _ = compare(engines, REPEAT, [greedy(max_tokens)])
    assert len(out) == max_tokens and out[-1].finish_reason == "length"


def test_context_end_inside_a_draft():
    pair = {s: _engine(s, 160) for s in ("off", "ngram")}
    try:
        (out,), _ = compare(pair, REPEAT, [greedy(400, ignore_eos=True)])
        assert out[-1].finish_reason == "length" and len(out) < 400
    finally:
        for e in pair.values():
            e.close()


def test_grammar_greedy_and_seeded_are_unchanged(engines):
    (out,), accepted = compare(engines, RECORD_PROMPT, [greedy(logprobs=2, grammar=RECORD_GRAMMAR)])
    assert out[-1].finish_reason == "stop"
    for seed in (3, 4):
        compare(engines, RECORD_PROMPT, [seeded(seed, grammar=RECORD_GRAMMAR)])


def test_n_choices_are_unchanged(engines):
    # not alone while both run: no drafts then; the one left may draft
    compare(engines, REPEAT, [greedy(40), greedy(80), seeded(5, 60)])


def test_a_sequence_joined_by_another_is_unchanged(engines):
    async def fn(e):
        first = asyncio.ensure_future(outputs(e, chat(e, REPEAT), [greedy()]))
        await asyncio.sleep(0.3)  # drafting alone by now; then not alone
        second = await outputs(e, chat(e, FREE), [seeded(9, 40)])
        return await first, second

    assert run_on(engines["ngram"], fn) == run_on(engines["off"], fn)


def test_adaptive_drafting_is_unchanged_and_measured_its_costs():
    # both fresh: a prompt found cached is read again from its last token alone, and that
    # row's logits differ in their last bits from a whole prompt's
    adaptive, off = _engine("ngram", 512, adaptive=True), _engine("off", 512)
    try:
        ratios = adaptive._policy.cost_ratio
        assert len(ratios) == 7 and ratios[0] == 1.0
        assert all(b >= a for a, b in zip(ratios, ratios[1:]))  # never cheaper with more tokens
        pair = {"off": off, "ngram": adaptive}
        compare(pair, REPEAT, [greedy(logprobs=2)])
        compare(pair, FREE, [seeded(2)])
        compare(pair, RECORD_PROMPT, [greedy(grammar=RECORD_GRAMMAR)])
    finally:
        adaptive.close()
        off.close()
