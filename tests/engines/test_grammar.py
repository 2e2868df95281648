"""Constrained decoding (llguidance) in both engines, on real models: every token a
constrained sequence samples obeys its grammar, the sequence stops ("stop") when its grammar
is complete, and the sequences that share its steps are not touched."""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time

import jsonschema
import pytest
from llguidance import LLMatcher

from llmserve.engines.base import SamplingParams
from llmserve.engines.grammar import GrammarError
from llmserve.engines.llamacpp import LlamaCppEngine
from llmserve.engines.stepping import QueueStream
from llmserve.models import bundled_model_path

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}
PERSON_GRAMMAR = LLMatcher.grammar_from_json_schema(PERSON)
# No free whitespace: a model with random weights could otherwise pad forever.
PERSON_COMPACT = LLMatcher.grammar_from_json_schema(
    PERSON, overrides={"whitespace_flexible": False}
)
YES_NO = LLMatcher.grammar_from_lark('start: "yes" | "no"')
PERSON_PROMPT = "Give me a JSON object describing a person called Alice who is 30."


def chat(engine, text: str) -> list[int]:
    return engine.tokenize(
        f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n", add_bos=False
    )


def greedy(max_tokens: int = 48, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, **kw)


async def outputs(engine, prompt, params) -> list[list]:
    out: list[list] = [[] for _ in params]
    async for step in engine.generate(prompt, params):
        for t in step:
            out[t.index].append(t)
    return out


def text(engine, outs) -> str:
    return b"".join(
        b"" if o.end_of_generation else engine.token_bytes(o.token_id) for o in outs
    ).decode()


def ids(outs) -> list[int]:
    return [o.token_id for o in outs]


def assert_person(engine, outs) -> dict:
    assert outs[-1].finish_reason == "stop", text(engine, outs)
    assert all(o.finish_reason is None for o in outs[:-1])
    value = json.loads(text(engine, outs))
    jsonschema.validate(value, PERSON)
    return value


def engine_runner(engine):
    """`run(fn)`: `await fn(engine)` in a fresh event loop, with the decode thread started
    for it and stopped after (the engine itself is kept)."""

    def run(fn):
        async def main():
            await engine.start()
            try:
                return await fn(engine)
            finally:
                engine.shutdown()
                await asyncio.to_thread(engine._thread.join)
                engine._thread = None

        return asyncio.run(main())

    return run


# -- llama.cpp --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama():
    engine = LlamaCppEngine(bundled_model_path(), context_length=512, max_sequences=4, threads=2)
    yield engine
    engine.close()


@pytest.fixture
def run(llama):
    return engine_runner(llama)


def test_json_schema_output_parses_and_validates(run, llama):
    async def fn(e):
        return (await outputs(e, chat(e, PERSON_PROMPT), [greedy(grammar=PERSON_GRAMMAR)]))[0]

    outs = run(fn)
    assert assert_person(llama, outs) == {"name": "Alice", "age": 30}
    assert not outs[-1].end_of_generation  # complete at "}": no EOS needed


def test_unconstrained_neighbour_is_untouched(run):
    """A constrained and an unconstrained sequence in one batch: each gives what it gives
    alone, and the constrained one differs from what the model says unconstrained."""

    async def fn(e):
        free_q, json_q = chat(e, "Name three colors."), chat(e, PERSON_PROMPT)
        free = (await outputs(e, free_q, [greedy()]))[0]
        bound = (await outputs(e, json_q, [greedy(grammar=PERSON_GRAMMAR)]))[0]
        unbound = (await outputs(e, json_q, [greedy()]))[0]
        both = await asyncio.gather(
            outputs(e, free_q, [greedy()]),
            outputs(e, json_q, [greedy(grammar=PERSON_GRAMMAR)]),
        )
        return free, bound, unbound, [b[0] for b in both]

    free, bound, unbound, (free2, bound2) = run(fn)
    assert ids(free2) == ids(free)
    assert ids(bound2) == ids(bound)
    assert ids(unbound) != ids(bound)


def test_n_choices_share_one_grammar(run, llama):
    def sampled(seed):
        return SamplingParams(max_tokens=48, temperature=1.0, seed=seed, grammar=PERSON_GRAMMAR)

    async def fn(e):
        p = chat(e, PERSON_PROMPT)
        one = (await outputs(e, p, [greedy(grammar=PERSON_GRAMMAR)]))[0]
        three = await outputs(e, p, [greedy(grammar=PERSON_GRAMMAR)] * 3)
        # A constrained and an unconstrained choice of one prompt share its logits row.
        mixed = await outputs(e, p, [greedy(grammar=PERSON_GRAMMAR), greedy()])
        alone = (await outputs(e, p, [greedy()]))[0]
        drawn = await outputs(e, p, [sampled(1), sampled(2), sampled(3)])
        return one, three, mixed, alone, drawn

    one, three, mixed, alone, drawn = run(fn)
    assert [ids(t) for t in three] == [ids(one)] * 3
    assert ids(mixed[0]) == ids(one) and ids(mixed[1]) == ids(alone)
    for outs in drawn:
        assert_person(llama, outs)


def test_a_complete_grammar_stops_and_eos_waits_for_it(run, llama):
    word = LLMatcher.grammar_from_lark("start: /[A-Za-z]+/")

    async def fn(e):
        yes = (await outputs(e, chat(e, "Is the sky blue?"), [greedy(grammar=YES_NO)]))[0]
        # A word may go on: the model ends it with EOS, allowed once the grammar accepts.
        one_word = (await outputs(e, chat(e, "Is the sky blue? Answer in one word."),
                                  [greedy(grammar=word)]))[0]
        capped = (await outputs(e, chat(e, PERSON_PROMPT), [greedy(4, grammar=PERSON_GRAMMAR)]))[0]
        return yes, one_word, capped

    yes, one_word, capped = run(fn)
    assert text(llama, yes) in ("yes", "no") and yes[-1].finish_reason == "stop"
    assert not yes[-1].end_of_generation
    assert one_word[-1].end_of_generation and one_word[-1].finish_reason == "stop"
    assert one_word[-1].token_id in llama.end_tokens
    assert text(llama, one_word).isalpha()
    assert len(capped) == 4 and capped[-1].finish_reason == "length"  # max_tokens still rules


def test_end_tokens_are_allowed_only_where_the_grammar_accepts(llama):
    from llmserve.engines.grammar import allowed

    grammars = llama._grammars
    (m,) = grammars.matchers([greedy(grammar=LLMatcher.grammar_from_lark("start: /[a-z]+/"))])
    ends = sorted(llama.end_tokens)
    before = allowed(grammars.fill([m]), llama.vocab_size)[0]
    assert not before[ends].any()
    assert before[llama.tokenize("hello", add_bos=False)[0]]
    for t in llama.tokenize("hello", add_bos=False):
        assert m.consume_token(t)
    after = allowed(grammars.fill([m]), llama.vocab_size)[0]
    assert after[ends].all()
    im_start = llama.tokenize("<|im_start|>", add_bos=False)
    assert len(im_start) == 1 and not after[im_start[0]]  # special tokens are never text


def test_logprobs_are_of_the_masked_distribution(run, llama):
    async def fn(e):
        return (await outputs(e, chat(e, "Is the sky blue?"),
                              [greedy(logprobs=20, grammar=YES_NO)]))[0]

    first = run(fn)[0]
    # Only pieces of "yes" and "no" are allowed, and they share all the mass.
    assert 2 <= len(first.top_logprobs) < 20
    assert first.top_logprobs[0] == (first.token_id, pytest.approx(first.logprob))
    assert sum(math.exp(lp) for _, lp in first.top_logprobs) == pytest.approx(1.0, abs=1e-4)
    for t, _ in first.top_logprobs:
        piece = llama.token_bytes(t)
        assert b"yes".startswith(piece) or b"no".startswith(piece)


def test_forced_tokens_come_without_sampling(run, llama):
    """Alone in the batch, the tokens a grammar forces come out at once, unsampled, and are
    decoded together. Beside other sequences they are sampled one a step (a batch in which
    one sequence has more tokens than the others costs llama.cpp several passes): the same
    text either way, and the neighbour's text unchanged."""
    prefix = "The answer to life, the universe and everything is "
    forced = LLMatcher.grammar_from_lark(f'start: "{prefix}" /[0-9]+/')

    async def steps_of(e, p, params):
        steps = []
        async for step in e.generate(p, params):
            steps.append(step)
        return steps

    async def fn(e):
        p, q = chat(e, "What is the answer to everything?"), chat(e, "Name three colors.")
        free = (await outputs(e, q, [greedy()]))[0]
        alone = await steps_of(e, p, [greedy(40, logprobs=2, grammar=forced)])
        together, beside = await asyncio.gather(
            outputs(e, q, [greedy()]), steps_of(e, p, [greedy(40, logprobs=2, grammar=forced)])
        )
        capped = (await outputs(e, p, [greedy(3, grammar=forced)]))[0]
        return free, alone, together[0], beside, capped

    free, alone, together, beside, capped = run(fn)
    outs = [o for step in alone for o in step]
    said = text(llama, outs)
    assert said.startswith(prefix) and said[len(prefix):].isdigit(), said
    # The first step: one sampled token, then the rest of the prefix, forced, at once.
    assert len(alone[0]) >= 5
    for o in alone[0][1:]:
        assert o.logprob == 0.0 and o.top_logprobs == ((o.token_id, 0.0),)
    assert len(alone) < len(outs)
    # Beside another sequence: one token a step, the same tokens.
    assert all(len(step) == 1 for step in beside)
    assert ids([o for step in beside for o in step]) == ids(outs)
    assert ids(together) == ids(free)
    assert len(capped) == 3 and capped[-1].finish_reason == "length"


def test_cancel_mid_way_frees_the_slot(run):
    endless = LLMatcher.grammar_from_lark('start: /[a-z ]+/')

    async def fn(e):
        p = chat(e, "Write a long story.")
        params = [greedy(400, ignore_eos=True, grammar=endless)] * 4
        stream = e.generate(p, params)
        it = stream.__aiter__()
        await it.__anext__()
        stream.cancel()
        rest = [step async for step in it]
        nxt = await asyncio.wait_for(outputs(e, p, [greedy(4, grammar=endless)] * 4), timeout=60)
        return rest, nxt

    rest, nxt = run(fn)
    assert sum(len(s) for s in rest) < 10  # at most a step already under way
    assert [len(o) for o in nxt] == [4] * 4


def test_invalid_grammar_is_refused_at_submit(run):
    bad = LLMatcher.grammar_from_lark("start: undefined_rule")

    async def fn(e):
        with pytest.raises(GrammarError, match="invalid grammar"):
            e.generate(chat(e, "hi"), [greedy(grammar=bad)])
        with pytest.raises(ValueError):
            e.generate(chat(e, "hi"), [greedy(), greedy(grammar="not a grammar {")])
        return (await outputs(e, chat(e, "Is the sky blue?"), [greedy(grammar=YES_NO)]))[0]

    assert run(fn)[-1].finish_reason == "stop"  # the engine goes on


def test_a_grammar_compiles_off_the_submitting_thread_and_a_cancel_still_reaches_it(
    run, llama, monkeypatch
):
    """In a child process the pipe reader submits with `compile_later`: it must go on taking
    cancels and pings while a grammar compiles (here held until released), the decode loop
    too, and a cancel that comes meanwhile ends the request before its first token."""
    gate = threading.Event()
    compile_grammars = llama._grammars.matchers

    def held(params):
        gate.wait(60)
        return compile_grammars(params)

    monkeypatch.setattr(llama._grammars, "matchers", held)

    async def fn(e):
        loop = asyncio.get_running_loop()
        key = "held-grammar"
        stream = e._streams[key] = QueueStream(key, e.cancel)
        t0 = time.monotonic()
        await asyncio.to_thread(e.submit, key, chat(e, PERSON_PROMPT),
                                [greedy(grammar=PERSON_GRAMMAR)] * 2, compile_later=True)
        submitted = time.monotonic() - t0
        answered = asyncio.Event()
        e.between_steps(lambda: loop.call_soon_threadsafe(answered.set))
        await asyncio.wait_for(answered.wait(), timeout=10)  # the decode loop goes on
        e.cancel(key)
        gate.set()
        steps = await asyncio.wait_for(_collect(stream), timeout=60)
        # and the engine serves the next one, grammar and all
        after = (await outputs(e, chat(e, "Is the sky blue?"), [greedy(grammar=YES_NO)]))[0]
        return submitted, steps, after

    try:
        submitted, steps, after = run(fn)
    finally:
        gate.set()
    assert submitted < 5  # not waiting for the compile (held 60 s)
    assert steps == []  # cancelled before its first token
    assert after[-1].finish_reason == "stop"


async def _collect(stream) -> list:
    return [step async for step in stream]


def test_child_process_engine_carries_the_grammar():
    from llmserve.engines.process import EngineProcess
    from llmserve.engines.spec import EngineSpec

    spec = EngineSpec("llamacpp", bundled_model_path(),
                      {"context_length": 512, "max_sequences": 2, "threads": 2})

    async def main():
        engine = EngineProcess(spec, name="grammar-test")
        await engine.start()
        try:
            outs = (await outputs(engine, chat(engine, PERSON_PROMPT),
                                  [greedy(grammar=PERSON_GRAMMAR)]))[0]
            bad = LLMatcher.grammar_from_lark("start: undefined_rule")
            with pytest.raises(Exception, match="invalid grammar"):
                await outputs(engine, chat(engine, "hi"), [greedy(grammar=bad)])
            return engine, outs
        finally:
            await engine.stop()

    engine, outs = asyncio.run(main())
    assert_person(engine, outs)


def test_as_lark_keeps_what_each_grammar_allows(llama):
    """The Lark form (what vLLM takes) of a JSON-schema grammar accepts what the original
    does, in the same compact style; a Lark grammar stays as it is."""
    from llmserve.engines.grammar import as_lark
    from llmserve.serving import constraints

    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"],
              "additionalProperties": False}
    original = constraints.json_schema(schema, strict=True, param="x")
    lark = as_lark(original)
    assert lark.startswith("start: %json ")

    def accepts(grammar: str, text: str) -> bool:
        (m,) = llama._grammars.matchers([greedy(grammar=grammar)])
        return m.consume_tokens(llama.tokenize(text, add_bos=False)) and m.is_accepting()

    for text, valid in (('{"a": 1}', True), ('{"a":1}', False), ('{"a": "x"}', False),
                        ('{"a": 1, "b": 2}', False)):
        assert accepts(original, text) is valid and accepts(lark, text) is valid, text
    source = '%llguidance {}\nstart: "yes" | "no"'
    assert as_lark(constraints.lark(source, param="x")) == source
    with pytest.raises(GrammarError):
        as_lark('{"grammars": []}')
