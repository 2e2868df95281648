"""Prompt-lookup speculation on the llama.cpp engine never changes what is generated: every
token, logprob and finish reason is the same with it on as off, greedy or seeded, up to
max_tokens or the context's end, under a grammar, with n > 1 (where it stays off until a
sequence is alone); and on input-grounded work drafts are actually accepted."""

from __future__ import annotations

import asyncio

import pytest
from speculation_cases import (FREE, RECORD_PROMPT, REPEAT, chat, compare, greedy, outputs,
                               record_grammar, run_on, seeded)

from llmserve.engines.base import TokenOutput
from llmserve.engines.llamacpp import LlamaCppEngine
from llmserve.models import bundled_model_path

RECORD_GRAMMAR = record_grammar()

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


def test_a_sequence_joined_by_another_is_unchanged():
    # Fresh engines, so both read each prompt in the same shapes: the module's pair has served
    # other requests, whose sequences end in another order with drafts, so each engine's
    # least recently used slot, and with it what is cached, may differ (tests/greedy.py).
    async def fn(e):
        seen: list[TokenOutput] = []
        going = asyncio.Event()

        async def first() -> list[list[TokenOutput]]:
            async for step in e.generate(chat(e, REPEAT), [greedy()]):
                seen.extend(step)
                if len(seen) >= 8:
                    going.set()  # drafting alone by now
            return [seen]

        task = asyncio.ensure_future(first())
        await going.wait()
        second = await outputs(e, chat(e, FREE), [seeded(9, 40)])
        assert not task.done(), "the second ran alone, not beside the first"
        return await task, second

    pair = {s: _engine(s, 512) for s in ("off", "ngram")}
    try:
        assert run_on(pair["ngram"], fn) == run_on(pair["off"], fn)
    finally:
        for e in pair.values():
            e.close()


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
