"""Prompt-lookup speculation on the transformers engine never changes what is generated:
every token and finish reason is the same with it on as off, greedy or seeded, with
penalties, up to max_tokens or the context's end, under a grammar, with n > 1 (where it
stays off until a sequence is alone); and on input-grounded work drafts are actually
accepted. On the bundled SmolLM2 as a Hugging Face directory (tests/conftest.py).

Logprobs are the same to float32 rounding, not to the bit: a drafted token's logits come from
a pass over several tokens, whose matrix products round differently, as a sequence's do when
others share its step (about 1e-6 here, either way)."""

from __future__ import annotations

import asyncio
from itertools import chain

import pytest

pytest.importorskip("torch", reason="the hf extra (torch, transformers) is not installed")
pytest.importorskip("transformers", reason="the hf extra (torch, transformers) is not installed")

from speculation_cases import (FREE, RECORD_PROMPT, REPEAT, chat, greedy, outputs,
                               record_grammar, run_on, seeded)
from speculation_cases import compare as compare_outputs

from llmserve.engines.base import TokenOutput
from llmserve.engines.transformers import TransformersEngine

RECORD_GRAMMAR = record_grammar()


def _engine(speculative: str, context_length: int) -> TransformersEngine:
    from conftest import hf_model_dir

    return TransformersEngine(hf_model_dir(), context_length=context_length, max_sequences=4,
                              threads=2, speculative=speculative, speculative_tokens=6)


@pytest.fixture(scope="module")
def engines():
    pair = {s: _engine(s, 512) for s in ("off", "ngram")}
    yield pair
    for e in pair.values():
        e.close()


def assert_same(got, want) -> None:
    """Equal outputs: tokens, top token ids and finish reasons exactly, logprobs to 1e-4."""
    assert [[_exact(t) for t in seq] for seq in got] == [[_exact(t) for t in seq] for seq in want]
    for a, b in zip(chain(*got), chain(*want), strict=True):
        if b.logprob is not None:
            assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
            assert [v for _, v in a.top_logprobs] == pytest.approx(
                [v for _, v in b.top_logprobs], abs=1e-4)


def _exact(t: TokenOutput) -> tuple:
    top = None if t.top_logprobs is None else [i for i, _ in t.top_logprobs]
    return (t.index, t.token_id, t.logprob is None, top, t.end_of_generation, t.finish_reason)


def compare(engines, text: str, params) -> tuple[list, int]:
    return compare_outputs(engines, text, params, assert_same)


def test_greedy_repeat_accepts_drafts_and_changes_nothing(engines):
    drafts = engines["ngram"].spec_decode_stats().drafts
    (out,), accepted = compare(engines, REPEAT, [greedy(logprobs=3)])
    # copied to the end: the end-of-turn token, drafted from the prompt's, ends it
    assert len(out) > 40 and out[-1].finish_reason == "stop" and out[-1].end_of_generation
    assert engines["ngram"].spec_decode_stats().drafts > drafts
    assert accepted > 20, accepted


@pytest.mark.parametrize("seed", [1, 7])
def test_seeded_sampling_is_unchanged(engines, seed):
    _, accepted = compare(engines, REPEAT, [seeded(seed, logprobs=2)])
    assert accepted > 0
    compare(engines, FREE, [seeded(seed)])


def test_penalties_and_bias_are_unchanged(engines):
    # counted token by token, drafted or not
    compare(engines, REPEAT, [greedy(repetition_penalty=1.1, frequency_penalty=0.2,
                                     presence_penalty=0.1, logit_bias={13: -2.0})])
    compare(engines, REPEAT, [seeded(2, frequency_penalty=0.3)])


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
    (out,), accepted = compare(engines, RECORD_PROMPT,
                               [greedy(logprobs=2, grammar=RECORD_GRAMMAR)])
    assert out[-1].finish_reason == "stop"
    assert accepted > 0
    for seed in (3, 4):
        compare(engines, RECORD_PROMPT, [seeded(seed, grammar=RECORD_GRAMMAR)])


def test_n_choices_are_unchanged(engines):
    # not alone while several run: no drafts then; the one left drafts, in slot 2 (its cache
    # gathered, not read in place as slot 0's)
    (_, _, last), accepted = compare(engines, REPEAT, [seeded(5, 20), greedy(40), greedy(96)])
    assert len(last) > 45 and accepted > 0


def test_a_sequence_joined_by_another_is_unchanged(engines):
    async def fn(e):
        first = asyncio.ensure_future(outputs(e, chat(e, REPEAT), [greedy()]))
        await asyncio.sleep(1.0)  # drafting alone by now; then not alone
        second = await outputs(e, chat(e, FREE), [seeded(9, 40)])
        return await first, second

    on_first, on_second = run_on(engines["ngram"], fn)
    off_first, off_second = run_on(engines["off"], fn)
    assert_same(on_first, off_first)
    assert_same(on_second, off_second)
