"""The llama.cpp engine on the bundled model, without HTTP: batching must not change what a
greedy sequence generates, whatever else shares its steps or its slot's cached prefix."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest

from llmserve.engines.base import SamplingParams
from llmserve.engines.cpu import weight_repack_enabled
from llmserve.engines.llamacpp import LlamaCppEngine
from llmserve.models import bundled_model_path


def chat(engine: LlamaCppEngine, text: str) -> list[int]:
    return engine.tokenize(
        f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n", add_bos=False
    )


def greedy(max_tokens: int = 24, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, **kw)


async def tokens(engine, prompt, params) -> list[list[int]]:
    out: list[list[int]] = [[] for _ in params]
    async for step in engine.generate(prompt, params):
        for t in step:
            out[t.index].append(t.token_id)
    return out


@pytest.fixture
def run():
    """Run `fn(engine)` on a fresh engine with the given shape, inside one event loop."""

    def _run(fn, *, max_sequences=4, context_length=512, prefill_chunk=256):
        async def main():
            engine = LlamaCppEngine(
                bundled_model_path(), context_length=context_length,
                max_sequences=max_sequences, threads=2, prefill_chunk=prefill_chunk,
            )
            await engine.start()
            try:
                return await fn(engine)
            finally:
                await engine.stop()

        return asyncio.run(main())

    return _run


def test_batched_sequences_equal_each_alone(run):
    questions = ["Write a haiku about the sea.", "What is 2+2?", "Name three colors.",
                 "Describe a cat."]

    async def fn(e):
        alone = [(await tokens(e, chat(e, q), [greedy()]))[0] for q in questions]
        together = await asyncio.gather(*(tokens(e, chat(e, q), [greedy()]) for q in questions))
        return alone, [t[0] for t in together]

    alone, together = run(fn)
    assert together == alone


def test_n_choices_share_the_prompt_and_match_n_equal_1(run):
    async def fn(e):
        p = chat(e, "Tell me a fact about owls.")
        return (await tokens(e, p, [greedy()]))[0], await tokens(e, p, [greedy()] * 3)

    one, three = run(fn)
    assert three == [one, one, one]


def test_reused_prefix_gives_the_same_tokens_as_a_fresh_slot(run):
    async def fn(e):
        a, b = chat(e, "What is the capital of France?"), chat(e, "What is the capital of Spain?")
        first_b = (await tokens(e, b, [greedy()]))[0]
        await tokens(e, a, [greedy()])  # the slot now holds a's prompt and answer
        again_b = (await tokens(e, b, [greedy()]))[0]
        same_a = [(await tokens(e, a, [greedy()]))[0] for _ in range(2)]
        return first_b, again_b, same_a

    first_b, again_b, same_a = run(fn, max_sequences=1)
    assert again_b == first_b
    assert same_a[0] == same_a[1]


def test_a_slot_whose_cache_differs_from_its_note_is_trimmed_or_read_again(run):
    """Whatever let the engine's note of a slot and llama.cpp's cache drift apart, the next
    prompt in that slot gets its answer (llama.cpp would refuse the batch otherwise)."""
    import llama_cpp as lc

    async def fn(e):
        p = chat(e, "What is the capital of France?")
        first = (await tokens(e, p, [greedy()]))[0]
        # The cache holds more than noted: the note says 5 tokens.
        del e._slot_tokens[0][5:]
        more = (await tokens(e, p, [greedy()]))[0]
        # The cache holds less than noted: all but 5 cells dropped behind the engine's back.
        lc.llama_memory_seq_rm(e._mem, 0, 5, -1)
        less = (await tokens(e, p, [greedy()]))[0]
        return first, more, less

    first, more, less = run(fn, max_sequences=1)
    assert more == first
    assert less == first


def test_one_client_after_another_each_keeps_its_cache(run):
    """Conversations taken in turn at one stream each stay cached for their next turn: a new
    prompt goes to an empty slot, not over the one just released."""
    async def fn(e):
        a, b = chat(e, "What is the capital of France?"), chat(e, "Name a large river.")
        await tokens(e, a, [greedy(8)])
        await tokens(e, b, [greedy(8)])
        return [list(t) for t in e._slot_tokens], a, b

    cached, a, b = run(fn)
    assert any(t[: len(a)] == a for t in cached)
    assert any(t[: len(b)] == b for t in cached)


def test_reused_slots_decode_in_seq_id_order(run, monkeypatch):
    """Prompts that find their cached slots in another order than they arrive still reach
    llama.cpp in ascending seq id order, and their running ids are consecutive: with a KV
    stream per sequence, llama.cpp decodes a batch in one pass only over consecutive seq ids
    in batch order, and splits it at every break (a 40% slower step after reuse)."""
    import llama_cpp as lc

    orders: list[list[int]] = []
    decode = lc.llama_decode

    def recording(ctx, batch):
        orders.append([batch.seq_id[i][0] for i in range(batch.n_tokens)])
        return decode(ctx, batch)

    questions = ["Name a river.", "Name a mountain in Europe.", "Name a city in Asia.",
                 "Name a sea."]

    async def fn(e):
        first = await asyncio.gather(*(tokens(e, chat(e, q), [greedy(8)]) for q in questions))
        monkeypatch.setattr(lc, "llama_decode", recording)
        again = await asyncio.gather(*(tokens(e, chat(e, q), [greedy(8)])
                                       for q in reversed(questions)))
        return first, again[::-1]

    first, again = run(fn)
    assert again == first
    full = [o for o in orders if len(set(o)) == len(questions)]
    assert full, orders  # the four decoded together
    for order in full:
        ids = list(dict.fromkeys(order))
        assert ids == sorted(ids) == list(range(ids[0], ids[0] + len(ids))), order


def test_cached_prefix_is_copied_next_to_the_running_sequence(run, monkeypatch):
    """A prompt whose cache lies in a slot away from the running sequences is copied next to
    them (one pass per step) and answers exactly as it did from a fresh slot."""
    import llama_cpp as lc

    long = ("Here is a list of things to pack for a week of hiking in the mountains in autumn: "
            "boots, socks, a warm jacket, a rain shell, gloves, a hat, a map, a compass. "
            "What did I forget?")
    questions = ["Name a river.", "Name a mountain.", "Name a city.", long]
    orders: list[list[int]] = []
    decode = lc.llama_decode

    def recording(ctx, batch):
        orders.append([batch.seq_id[i][0] for i in range(batch.n_tokens)])
        return decode(ctx, batch)

    copies: list[tuple[int, int]] = []
    copy = lc.llama_memory_seq_cp

    def recording_copy(mem, src, dst, p0, p1):
        copies.append((src, dst))
        return copy(mem, src, dst, p0, p1)

    async def fn(e):
        first = await asyncio.gather(*(tokens(e, chat(e, q), [greedy(8)]) for q in questions))
        monkeypatch.setattr(lc, "llama_memory_seq_cp", recording_copy)
        prompt = chat(e, long)
        assert e._slot_tokens[3][: len(prompt)] == prompt  # its cache, away from slot 0
        monkeypatch.setattr(lc, "llama_decode", recording)
        busy = asyncio.create_task(tokens(e, chat(e, "Count to fifty."), [greedy(60)]))
        while not e._seqs:
            await asyncio.sleep(0.01)
        again = await tokens(e, prompt, [greedy(8)])
        await busy
        return first[3], again

    first, again = run(fn)
    assert again == first
    assert copies == [(3, 1)]
    together = [o for o in orders if len(set(o)) == 2]
    assert together and all(set(o) == {0, 1} for o in together), orders


def test_long_prompt_is_read_in_pieces_while_others_keep_decoding(run):
    text = "Summarize: " + "The quick brown fox jumps over the lazy dog. " * 30

    async def read_alone(e):
        return (await tokens(e, chat(e, text), [greedy(8)]))[0]

    async def fn(e):
        long_prompt = chat(e, text)
        assert len(long_prompt) > 4 * 64
        # A stream already running when the long prompt arrives must keep getting a token
        # every step while the prompt is read 64 tokens at a time.
        runner = e.generate(chat(e, "Count to one hundred."), [greedy(200, ignore_eos=True)])
        it = runner.__aiter__()
        await it.__anext__()
        first_token = asyncio.Event()

        async def read() -> list[int]:
            out = []
            async for step in e.generate(long_prompt, [greedy(8)]):
                first_token.set()
                out.extend(t.token_id for t in step)
            return out

        reader = asyncio.create_task(read())
        steps_while_reading = 0
        while not first_token.is_set():
            await it.__anext__()
            steps_while_reading += 1
        runner.cancel()
        return [await reader], len(long_prompt), steps_while_reading

    # Alone on an engine of its own: this one's cache must not hold the long prompt.
    alone = run(read_alone, prefill_chunk=64)
    chunked, n_prompt, steps = run(fn, prefill_chunk=64)
    assert chunked[0] == alone
    assert steps >= n_prompt // 64  # one runner token per 64-token piece of prompt


def test_a_burst_of_prompts_is_read_a_piece_each_per_step_while_others_decode(run):
    texts = [f"Summarize note {i}: " + "The quick brown fox jumps over the lazy dog. " * 6
             for i in range(4)]

    async def fn(e):
        prompts = [chat(e, t) for t in texts]
        assert all(len(p) > 2 * 32 for p in prompts)
        runner = e.generate(chat(e, "Count to one hundred."), [greedy(200, ignore_eos=True)])
        it = runner.__aiter__()
        await it.__anext__()
        firsts: list[asyncio.Event] = []

        async def read(prompt: list[int]) -> list[int]:
            first = asyncio.Event()
            firsts.append(first)
            out = []
            async for step in e.generate(prompt, [greedy(4)]):
                first.set()
                out.extend(t.token_id for t in step)
            return out

        readers = [asyncio.create_task(read(p)) for p in prompts]
        await asyncio.sleep(0)  # all four are submitted together
        for _ in range(runner.queue.qsize()):  # steps taken before they came
            await it.__anext__()
        steps_while_reading = 0
        while len(firsts) < len(prompts) or not all(f.is_set() for f in firsts):
            await it.__anext__()
            steps_while_reading += 1
        runner.cancel()
        return [await r for r in readers], max(len(p) for p in prompts), steps_while_reading

    async def each_alone(e):
        return [(await tokens(e, chat(e, t), [greedy(4)]))[0] for t in texts]

    alone = run(each_alone, max_sequences=5, prefill_chunk=32)
    together, longest, steps = run(fn, max_sequences=5, prefill_chunk=32)
    assert together == alone
    # 32 tokens a step for each prompt waiting, read in order: about as many steps as the
    # longest needs (one more as the last share shrinks, and up to two under way as they
    # came: the decode thread may take them in two steps), not four prompts' worth of
    # 32-token pieces (11 here).
    assert steps <= -(-longest // 32) + 3, (steps, longest)


def test_a_suspended_engine_keeps_its_model_and_cache_and_serves_again(run):
    from llmserve.engines.base import EngineError

    async def fn(e):
        p = chat(e, "What is the capital of France?")
        before = (await tokens(e, p, [greedy()]))[0]
        decoder = e._thread
        await e.suspend()
        assert e.health().state == "stopped" and not decoder.is_alive()
        with pytest.raises(EngineError, match="not started"):
            e.generate(p, [greedy()])
        cached = list(e._slot_tokens[0])
        await e.start()
        assert e._thread is not decoder  # a thread of its own: the old one (its pool) is gone
        after = (await tokens(e, p, [greedy()]))[0]
        return before, after, cached

    before, after, cached = run(fn, max_sequences=1)
    assert after == before
    assert cached  # the prompt and answer stayed in the slot's cache


def test_max_tokens_and_end_of_generation(run):
    async def fn(e):
        p = chat(e, "Say yes.")
        outs = []
        async for step in e.generate(p, [greedy(200)]):
            outs.extend(step)
        capped = []
        async for step in e.generate(p, [greedy(3, ignore_eos=True)]):
            capped.extend(step)
        return outs, capped, e

    outs, capped, e = run(fn)
    assert outs[-1].finish_reason == "stop" and outs[-1].end_of_generation
    assert outs[-1].token_id in e.end_tokens
    assert all(o.finish_reason is None for o in outs[:-1])
    assert len(capped) == 3 and capped[-1].finish_reason == "length"


def test_cancel_frees_the_slot_for_the_next_request(run):
    async def fn(e):
        p = chat(e, "Write a long story.")
        stream = e.generate(p, [greedy(400, ignore_eos=True)])
        it = stream.__aiter__()
        await it.__anext__()
        stream.cancel()
        rest = [step async for step in it]  # ends: the engine drops the cancelled sequence
        nxt = await asyncio.wait_for(tokens(e, p, [greedy(4)]), timeout=30)
        return rest, nxt

    rest, nxt = run(fn, max_sequences=1)
    assert sum(len(s) for s in rest) < 5  # at most a step already under way
    assert len(nxt[0]) == 4


def test_logprobs_are_a_distribution(run):
    async def fn(e):
        outs = []
        async for step in e.generate(chat(e, "Hi"), [greedy(5, logprobs=4)]):
            outs.extend(step)
        return outs

    for o in run(fn):
        assert o.logprob is not None and o.logprob <= 0
        assert len(o.top_logprobs) == 4
        lps = [lp for _, lp in o.top_logprobs]
        assert lps == sorted(lps, reverse=True)
        assert o.top_logprobs[0][0] == o.token_id  # greedy picks the most likely token


def test_seeded_sampling_is_reproducible_and_seeds_differ(run):
    def sampled(seed):
        return SamplingParams(max_tokens=20, temperature=1.0, seed=seed)

    async def fn(e):
        p = chat(e, "Invent a name for a dragon.")
        return [(await tokens(e, p, [sampled(s)]))[0] for s in (1, 1, 2, 3)]

    a, b, c, d = run(fn)
    assert a == b
    assert not (a == c == d)


def test_repetition_penalty_counts_the_prompt_presence_penalty_does_not(run):
    async def fn(e):
        prompt = e.tokenize("The cat sat on the mat. The cat sat on the", add_bos=False)

        async def first(**kw):
            return (await tokens(e, prompt, [greedy(1, **kw)]))[0][0]

        return prompt, await first(), await first(presence_penalty=2.0), await first(
            repetition_penalty=3.0
        )

    prompt, plain, presence, repetition = run(fn)
    assert plain in prompt  # " mat" again: a token of the prompt
    assert presence == plain  # nothing generated yet, so nothing to penalise
    assert repetition != plain


_DECODE_SCRIPT = """
import asyncio, json, sys
from llmserve.engines.base import SamplingParams
from llmserve.engines.llamacpp import LlamaCppEngine
from llmserve.models import bundled_model_path

async def main():
    e = LlamaCppEngine(bundled_model_path(), context_length=256, max_sequences=2, threads=2,
                       weight_repack=sys.argv[1] == "on")
    await e.start()
    prompt = e.tokenize("<|im_start|>user\\nName a fruit.<|im_end|>\\n<|im_start|>assistant\\n",
                        add_bos=False)
    out = []
    async for step in e.generate(prompt, [SamplingParams(max_tokens=12, temperature=0.0)] * 2):
        out.extend((t.index, t.token_id) for t in step)
    await e.stop()
    print(json.dumps(out))

asyncio.run(main())
"""


def _decode(repack: str) -> subprocess.CompletedProcess:
    # A child process: on CPUs where llama.cpp's repack crashes, it takes only the child.
    return subprocess.run([sys.executable, "-c", _DECODE_SCRIPT, repack],
                          capture_output=True, text=True, timeout=300)


def test_decoding_with_weight_repack_on_and_off():
    off = _decode("off")
    assert off.returncode == 0, off.stderr
    reference = json.loads(off.stdout)
    assert len(reference) == 24
    on = _decode("on")
    if weight_repack_enabled("auto"):
        assert on.returncode == 0, on.stderr
        assert json.loads(on.stdout) == reference
    else:
        # A CPU where auto turns repacking off (AMX): llama.cpp 0.3.36 crashes there. If a
        # fixed llama.cpp decodes instead, it must decode the same tokens.
        assert on.returncode < 0 or json.loads(on.stdout) == reference, on.stderr


TOKENIZE_TEXTS = ["Hello, world!", "你好，世界 大海", "emoji 😀🎉👨‍👩‍👧", "  two spaces\n\ttab",
                  "<|im_start|>user\nHi<|im_end|>\n"]


def test_detokenize_and_token_strs_of_the_vocabulary():
    """Text back from ids, special tokens written out; each id's string as the vocabulary
    writes it. The engine and the vocabulary alone (the server process's) agree."""
    from llmserve.engines.llamacpp import LlamaCppVocab

    vocab = LlamaCppVocab(bundled_model_path())
    engine = LlamaCppEngine(bundled_model_path(), context_length=256, max_sequences=1, threads=2)
    try:
        for text in TOKENIZE_TEXTS:
            ids = vocab.tokenize(text, add_bos=False)
            assert vocab.detokenize(ids) == engine.detokenize(ids) == text
            assert vocab.token_strs(ids) == engine.token_strs(ids)
        assert vocab.token_strs(vocab.tokenize("Hello world", add_bos=False)) == ["Hello", "Ġworld"]
        assert vocab.token_strs(vocab.tokenize("<|im_end|>", add_bos=False)) == ["<|im_end|>"]
        # a character cut in two is replaced, never an error
        first, _ = vocab.tokenize("你", add_bos=False)  # two bytes, then the third
        assert vocab.detokenize([first]) == "\ufffd"
        assert vocab.detokenize([]) == ""
    finally:
        engine.close()


def test_detokenize_and_token_strs_equal_the_hf_tokenizer_s():
    """The same model through llama.cpp's vocabulary and through its Hugging Face tokenizer
    (the directory the tests convert the GGUF to): the same strings, the same text."""
    pytest.importorskip("transformers", reason="the hf extra is not installed")
    from conftest import hf_model_dir

    from llmserve.engines.hf_loading import HFTokenizer
    from llmserve.engines.llamacpp import LlamaCppVocab

    vocab, hf = LlamaCppVocab(bundled_model_path()), HFTokenizer(hf_model_dir())
    for text in TOKENIZE_TEXTS:
        ids = vocab.tokenize(text, add_bos=False)
        assert hf.tokenize(text, add_bos=False) == ids
        assert hf.token_strs(ids) == vocab.token_strs(ids)
        assert hf.detokenize(ids) == vocab.detokenize(ids) == text
