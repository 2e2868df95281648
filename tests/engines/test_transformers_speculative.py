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

from llguidance import LLMatcher

from llmserve.engines.base import SamplingParams, TokenOutput
from llmserve.engines.transformers import TransformersEngine

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
RECORD_GRAMMAR = LLMatcher.grammar_from_json_schema(RECORD_SCHEMA)
RECORD_PROMPT = ('Repeat this JSON exactly: {"name": "Elias Marsh", "city": "Port Avery", '
                 '"job": "lighthouse keeper", "age": 61}')


def chat(engine: TransformersEngine, text: str) -> list[int]:
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


def run_on(engine: TransformersEngine, fn):
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
    assert_same(on_out, off_out)
    assert engines["off"].spec_decode_stats() is None
    return on_out, on.spec_decode_stats().accepted_tokens - accepted


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
