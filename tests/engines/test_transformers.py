"""The transformers engine on real (tiny, random) weights built here, and on the bundled
SmolLM2 GGUF: batching must not change what a greedy sequence generates, whoever joins or
leaves the batch while it runs. Nothing is downloaded."""

from __future__ import annotations

import asyncio
import json
import math
import random
import time

import pytest

torch = pytest.importorskip("torch", reason="the hf extra (torch, transformers) is not installed")
pytest.importorskip("transformers", reason="the hf extra (torch, transformers) is not installed")
tokenizers = pytest.importorskip("tokenizers")

from llguidance import LLMatcher  # noqa: E402

from llmserve.engines.base import SamplingParams  # noqa: E402
from llmserve.engines.transformers import TransformersEngine  # noqa: E402
from test_grammar import (  # noqa: E402 - one schema, one way to read it
    PERSON_COMPACT,
    PERSON_GRAMMAR,
    assert_person,
)
from test_grammar import text as decoded  # noqa: E402 - beside locals named text

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<s>"]
MAX_POSITIONS = 256
MIXED_TEXT = "The sea 大海 is blue 🌊, 你好世界! 👍🏽 ok 🦄 龘"  # the last two are not in the corpus


def _corpus() -> list[str]:
    rng = random.Random(0)
    en = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "cat", "sea", "sky", "river", "mountain", "tree", "green", "blue", "red", "light", "night", "day", "code", "model", "token", "stream", "server", "batch", "write", "say", "name", "three", "colors"]
    zh = ["你好", "世界", "今天", "天气", "很好", "我们", "学习", "语言", "模型", "中文", "测试", "大海"]
    emoji = ["🙂", "🚀", "🌊", "🐱", "❤️", "👍🏽", "🎉"]
    lines = []
    for i in range(400):
        words = [rng.choice(en) for _ in range(rng.randint(3, 10))]
        if i % 3 == 0:
            words.insert(rng.randint(0, len(words)), "".join(rng.sample(zh, 2)))
        if i % 5 == 0:
            words.append(rng.choice(emoji))
        lines.append(" ".join(words) + ("." if i % 2 else "!"))
    return lines


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory):
    """A 2-layer Llama with random weights and a byte-level BPE ChatML tokenizer, saved the way
    a Hugging Face checkpoint is: config, safetensors, tokenizer files."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("tiny-llama")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(_corpus(), trainers.BpeTrainer(
        vocab_size=512, special_tokens=SPECIALS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    ))
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="<|im_end|>",
        pad_token="<|endoftext|>", chat_template=CHATML,
    )
    hf_tok.save_pretrained(path)
    config = LlamaConfig(
        vocab_size=len(hf_tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_POSITIONS,
        bos_token_id=bos, eos_token_id=tok.token_to_id("<|endoftext|>"),
        initializer_range=0.2, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def chat(engine: TransformersEngine, text: str) -> list[int]:
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


async def outputs(engine, prompt, params) -> list:
    outs = []
    async for step in engine.generate(prompt, params):
        outs.extend(step)
    return outs


def plain_greedy(model, prompt: list[int], n: int) -> list[int]:
    """The reference: `n` greedy tokens after `prompt` by plain forwards over the whole text,
    no cache."""
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.fixture
def run(tiny_model):
    """Run `fn(engine)` on a fresh engine over the tiny model, inside one event loop."""

    def _run(fn, *, max_sequences=4, context_length=None, **kw):
        async def main():
            engine = TransformersEngine(
                tiny_model, context_length=context_length, max_sequences=max_sequences,
                threads=2, **kw,
            )
            forward = engine._forward
            engine.batch_rows = []  # rows of every decode forward: proof that rows share steps

            def spy(ids, positions, mask, cache, *rest):
                if ids.shape[1] == 1:
                    engine.batch_rows.append(ids.shape[0])
                return forward(ids, positions, mask, cache, *rest)

            engine._forward = spy
            await engine.start()
            try:
                return await fn(engine)
            finally:
                await engine.stop()

        return asyncio.run(main())

    return _run


QUESTIONS = ["the sea", "write a haiku about the blue river at night 🌊",
             "你好", "name three colors of the sky and the tree and the mountain, then say why"]


def test_batched_sequences_equal_each_alone(run):
    # Different prompt lengths and different lengths of answer: rows join with different
    # padding and leave at different steps.
    lengths = [24, 9, 17, 30]

    async def fn(e):
        prompts = [chat(e, q) for q in QUESTIONS]
        assert len({len(p) for p in prompts}) == len(prompts)
        params = [greedy(n, ignore_eos=True) for n in lengths]
        alone = [(await tokens(e, p, [sp]))[0] for p, sp in zip(prompts, params)]
        assert max(e.batch_rows) == 1
        together = await asyncio.gather(*(tokens(e, p, [sp]) for p, sp in zip(prompts, params)))
        assert max(e.batch_rows) == 4
        return alone, [t[0] for t in together]

    alone, together = run(fn)
    assert [len(a) for a in alone] == lengths
    assert together == alone
    assert len({tuple(a[:8]) for a in alone}) > 1  # the prompts do lead somewhere different


def test_greedy_matches_a_plain_forward_without_cache(run, tiny_model):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, local_files_only=True).eval()

    async def fn(e):
        prompt = chat(e, QUESTIONS[1])
        first = await outputs(e, prompt, [greedy(1, logprobs=3)])
        # The reference shares the batch with a longer prompt, so it runs padded.
        ref, _ = await asyncio.gather(
            tokens(e, prompt, [greedy(12, ignore_eos=True)]),
            tokens(e, chat(e, QUESTIONS[3]), [greedy(12, ignore_eos=True)]),
        )
        return prompt, first[0], ref[0]

    prompt, first, got = run(fn)
    assert got == plain_greedy(model, prompt, 12)
    with torch.inference_mode():
        logprobs = torch.log_softmax(model(torch.tensor([prompt])).logits[0, -1].float(), -1)
    assert first.logprob == pytest.approx(float(logprobs[first.token_id]), abs=1e-4)
    top = torch.topk(logprobs, 3)
    assert [t for t, _ in first.top_logprobs] == top.indices.tolist()


def test_sequences_join_while_others_are_mid_generation(run):
    # Two slots, three requests: B joins A mid-answer, C waits for a slot and joins when A
    # leaves, while B is still running.
    async def fn(e):
        pa, pb, pc = (chat(e, q) for q in QUESTIONS[1:])
        alone = [(await tokens(e, p, [greedy(n, ignore_eos=True)]))[0]
                 for p, n in ((pa, 20), (pb, 30), (pc, 16))]
        a_at = asyncio.Event()
        a_tokens: list[int] = []

        async def read_a():
            async for step in e.generate(pa, [greedy(20, ignore_eos=True)]):
                a_tokens.extend(t.token_id for t in step)
                if len(a_tokens) >= 5:
                    a_at.set()
            return a_tokens

        async def later(prompt, n):
            await a_at.wait()
            return (await tokens(e, prompt, [greedy(n, ignore_eos=True)]))[0]

        together = await asyncio.gather(read_a(), later(pb, 30), later(pc, 16))
        return alone, list(together)

    alone, together = run(fn, max_sequences=2)
    assert together == alone


def test_staggered_joins_and_leaves_equal_a_plain_forward(run, tiny_model):
    # Five requests of different prompt lengths arrive one after another while the others
    # run; three slots, so some wait for a row that another one leaves. Every answer is the
    # plain model's greedy answer, computed without any cache.
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, local_files_only=True).eval()
    lengths = [20, 7, 26, 12, 15]
    texts = [*QUESTIONS, "the quick brown fox " * 5]

    async def fn(e):
        prompts = [chat(e, q) for q in texts]
        started = [asyncio.Event() for _ in texts]

        async def one(i):
            if i:
                await started[i - 1].wait()
            out = []
            async for step in e.generate(prompts[i], [greedy(lengths[i], ignore_eos=True)]):
                out.extend(t.token_id for t in step)
                if len(out) >= 3:
                    started[i].set()
            started[i].set()
            return out

        return prompts, await asyncio.gather(*(one(i) for i in range(len(texts))))

    prompts, got = run(fn, max_sequences=3)
    for prompt, n, answer in zip(prompts, lengths, got, strict=True):
        assert answer == plain_greedy(model, prompt, n)


def test_seeded_draws_do_not_depend_on_the_batch(run):
    chain = {"top_k": 40, "top_p": 0.9, "min_p": 0.02, "presence_penalty": 0.5,
             "frequency_penalty": 0.3, "repetition_penalty": 1.2, "logit_bias": {5: 2.0}}

    def sampled(seed, n=24):
        return SamplingParams(max_tokens=n, temperature=0.9, seed=seed, ignore_eos=True, **chain)

    async def fn(e):
        p = chat(e, QUESTIONS[1])
        alone = (await tokens(e, p, [sampled(11)]))[0]
        # Others of different lengths already running, joining and leaving around it.
        runner = e.generate(chat(e, QUESTIONS[3]), [sampled(3, 40), greedy(9, ignore_eos=True)])
        it = runner.__aiter__()
        await it.__anext__()
        crowd = await asyncio.gather(
            tokens(e, p, [sampled(11)]), tokens(e, chat(e, QUESTIONS[0]), [sampled(12, 5)]),
            *(tokens(e, chat(e, q), [sampled(13)]) for q in QUESTIONS[2:]),
        )
        async for _ in it:
            pass
        return alone, crowd[0][0]

    alone, in_crowd = run(fn, max_sequences=6)
    assert len(alone) == 24
    assert in_crowd == alone


def _variant(tiny_model, path, config) -> None:
    """The tiny model's tokenizer with other (random) weights: `config`'s architecture."""
    from transformers import AutoModelForCausalLM

    path.mkdir()
    for f in tiny_model.iterdir():
        if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
            (path / f.name).write_bytes(f.read_bytes())
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)


def _variant_configs(vocab: int) -> dict:
    from transformers import Gemma2Config, MistralConfig, Qwen2Config

    shape = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                 max_position_embeddings=MAX_POSITIONS, initializer_range=0.2)
    return {
        # every layer slides over the last 5 positions (no layer types)
        "mistral-sliding": MistralConfig(**shape, sliding_window=5),
        # sliding and full layers mixed, and attention that adds its mask (eager)
        # (untied: Gemma's scaled embeddings, tied, would only ever repeat the last token)
        "gemma2-mixed-eager": Gemma2Config(**shape, sliding_window=6, query_pre_attn_scalar=16,
                                           tie_word_embeddings=False,
                                           layer_types=["sliding_attention", "full_attention",
                                                        "sliding_attention"],
                                           attn_implementation="eager"),
        "qwen2-mixed": Qwen2Config(**shape, use_sliding_window=True, sliding_window=4,
                                   max_window_layers=1, layer_types=["full_attention",
                                                                     "sliding_attention",
                                                                     "sliding_attention"]),
    }


@pytest.mark.parametrize("variant", ["mistral-sliding", "gemma2-mixed-eager", "qwen2-mixed"])
def test_sliding_window_models_equal_a_plain_forward(tiny_model, tmp_path, variant):
    # Windows far shorter than the prompts: the engine's masks must slide as the model's own.
    from transformers import AutoModelForCausalLM

    path = tmp_path / variant
    _variant(tiny_model, path, _variant_configs(512)[variant])
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval()
    lengths = [14, 6, 10]

    async def main():
        engine = TransformersEngine(path, max_sequences=2, threads=2, prefill_chunk=8)
        await engine.start()
        try:
            prompts = [chat(engine, q) for q in QUESTIONS[1:]]
            got = await asyncio.gather(*(tokens(engine, p, [greedy(n, ignore_eos=True)])
                                         for p, n in zip(prompts, lengths, strict=True)))
            return prompts, [g[0] for g in got]
        finally:
            await engine.stop()

    prompts, got = asyncio.run(main())
    assert len({t for g in got for t in g}) > 6  # the model does not just repeat itself
    for prompt, n, answer in zip(prompts, lengths, got, strict=True):
        assert answer == plain_greedy(model, prompt, n)


def test_long_prompt_is_read_in_pieces_while_others_keep_decoding(run):
    text = "the quick brown fox jumps over the lazy dog " * 8

    async def fn(e):
        long_prompt = chat(e, text)
        assert len(long_prompt) > 4 * 16
        alone = (await tokens(e, long_prompt, [greedy(8)]))[0]
        runner = e.generate(chat(e, "count"), [greedy(200, ignore_eos=True)])
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
        return alone, await reader, len(long_prompt), steps_while_reading

    alone, chunked, n_prompt, steps = run(fn, prefill_chunk=16)
    assert chunked == alone
    assert steps >= n_prompt // 16 - 1  # one runner token per 16-token piece of prompt


def test_n_choices_share_the_prompt_and_match_n_equal_1(run):
    async def fn(e):
        p = chat(e, QUESTIONS[0])
        return (await tokens(e, p, [greedy()]))[0], await tokens(e, p, [greedy()] * 3)

    one, three = run(fn)
    assert three == [one, one, one]


def test_cancel_frees_the_slot_for_the_next_request(run):
    async def fn(e):
        p = chat(e, QUESTIONS[1])
        stream = e.generate(p, [greedy(200, ignore_eos=True)])
        it = stream.__aiter__()
        await it.__anext__()
        stream.cancel()
        rest = [step async for step in it]  # ends: the engine drops the cancelled sequence
        nxt = await asyncio.wait_for(tokens(e, p, [greedy(4)]), timeout=30)
        # One choice of three cancelled: the other two run on to the end.
        two = e.generate(p, [greedy(12, ignore_eos=True)] * 3)
        counts = [0, 0, 0]
        async for step in two:
            for t in step:
                counts[t.index] += 1
                if t.index == 1 and counts[1] == 2:
                    two.cancel(1)
        return rest, nxt, counts

    rest, nxt, counts = run(fn, max_sequences=3)
    assert sum(len(s) for s in rest) < 5  # at most a step already under way
    assert len(nxt[0]) == 4
    assert counts[0] == counts[2] == 12 and counts[1] < 5


def test_seeded_sampling_is_reproducible_and_seeds_differ(run):
    def sampled(seed, **kw):
        return SamplingParams(max_tokens=20, temperature=1.0, seed=seed, ignore_eos=True, **kw)

    filtered = {"top_k": 40, "top_p": 0.9, "min_p": 0.02, "presence_penalty": 0.5,
                "frequency_penalty": 0.3, "repetition_penalty": 1.2}

    async def fn(e):
        p = chat(e, QUESTIONS[0])
        plain = [(await tokens(e, p, [sampled(s)]))[0] for s in (1, 1, 2, 3)]
        chain = [(await tokens(e, p, [sampled(s, **filtered)]))[0] for s in (7, 7)]
        # The same seed with others in the batch: same draws.
        batched = await asyncio.gather(
            tokens(e, p, [sampled(1)]), tokens(e, chat(e, QUESTIONS[3]), [sampled(5)]),
        )
        return plain, chain, batched[0][0]

    (a, b, c, d), (x, y), in_batch = run(fn)
    assert a == b
    assert not (a == c == d)
    assert x == y
    assert in_batch == a


def test_logprobs_are_sorted_and_greedy_is_top_1(run):
    async def fn(e):
        return await outputs(e, chat(e, QUESTIONS[2]), [greedy(6, logprobs=4, ignore_eos=True)])

    outs = run(fn)
    assert len(outs) == 6
    for o in outs:
        assert o.logprob is not None and o.logprob <= 0
        assert len(o.top_logprobs) == 4
        lps = [lp for _, lp in o.top_logprobs]
        assert lps == sorted(lps, reverse=True)
        assert o.top_logprobs[0][0] == o.token_id
        assert o.top_logprobs[0][1] == pytest.approx(o.logprob)


def test_penalties_and_bias_steer_greedy_but_not_logprobs(run):
    async def fn(e):
        p = chat(e, QUESTIONS[0])
        plain = await outputs(e, p, [greedy(48, ignore_eos=True)])
        banned = plain[0].token_id
        biased = await outputs(e, p, [greedy(16, ignore_eos=True, logprobs=1,
                                             logit_bias={banned: -100.0})])
        no_repeats = (await tokens(e, p, [greedy(48, ignore_eos=True, frequency_penalty=50.0)]))[0]
        presence = (await tokens(e, p, [greedy(48, ignore_eos=True, presence_penalty=50.0)]))[0]
        fresh = (await tokens(e, p, [greedy(8, ignore_eos=True, repetition_penalty=1e6)]))[0]
        return p, plain, banned, biased, no_repeats, presence, fresh

    p, plain, banned, biased, no_repeats, presence, fresh = run(fn)
    assert len({o.token_id for o in plain}) < 48  # the random model repeats itself...
    assert len(set(no_repeats)) == len(set(presence)) == 48  # ...unless penalized
    assert banned not in [o.token_id for o in biased]
    # Logprobs come from the raw logits: the banned token is still the most likely there.
    assert biased[0].top_logprobs[0][0] == banned
    assert biased[0].logprob < biased[0].top_logprobs[0][1]
    assert not set(fresh[:1]) & set(p)  # HF-style repetition penalty covers the prompt


def test_max_tokens_end_token_and_full_context(run):
    async def fn(e):
        end = e.tokenize("<|im_end|>", add_bos=False)[0]
        p = chat(e, QUESTIONS[0])
        capped = await outputs(e, p, [greedy(3, ignore_eos=True)])
        # A +100 bias makes the end-of-turn token certain: the first token ends the answer.
        stopped = await outputs(e, p, [greedy(50, logit_bias={end: 100.0})])
        sampled_stop = await outputs(
            e, p, [SamplingParams(max_tokens=50, temperature=0.8, seed=3, logit_bias={end: 100.0})]
        )
        ignored = await outputs(e, p, [greedy(4, logit_bias={end: 100.0}, ignore_eos=True)])
        # 20 prompt tokens in a 24-token context: 4 tokens fit.
        long = e.tokenize("the sea " * 10, add_bos=False)[:20]
        full = await outputs(e, long, [greedy(100, ignore_eos=True)])
        return end, capped, stopped, sampled_stop, ignored, full

    end, capped, stopped, sampled_stop, ignored, full = run(fn, context_length=24)
    assert [o.finish_reason for o in capped] == [None, None, "length"]
    for outs in (stopped, sampled_stop):
        assert len(outs) == 1
        assert outs[0].token_id == end and outs[0].end_of_generation
        assert outs[0].finish_reason == "stop"
    assert [o.token_id for o in ignored] == [end] * 4
    assert not any(o.end_of_generation for o in ignored)
    assert ignored[-1].finish_reason == "length"
    assert len(full) == 4 and full[-1].finish_reason == "length"


def test_facts_the_core_reads(tiny_model):
    e = TransformersEngine(tiny_model, context_length=4096, max_sequences=3)
    try:
        ids = {t: e.tokenize(t, add_bos=False)[0] for t in SPECIALS}
        assert e.context_length == MAX_POSITIONS  # capped by the model's positions
        assert e.max_sequences == 3
        assert e.vocab_size == 512
        assert e.chat_template == CHATML
        assert (e.bos_token, e.eos_token) == ("<s>", "<|im_end|>")
        assert e.add_bos  # the tokenizer's post-processor prepends <s>
        # config eos (<|endoftext|>) and the tokenizer's eos / end of turn (<|im_end|>)
        assert e.end_tokens == frozenset({ids["<|endoftext|>"], ids["<|im_end|>"]})
        assert e.device.type == "cpu" and e.dtype == torch.float32
    finally:
        e.close()
    assert TransformersEngine(tiny_model, context_length=100).context_length == 100


def test_tokenize_add_bos_and_special_tokens(tiny_model):
    e = TransformersEngine(tiny_model)
    bos = e.tokenize("<s>", add_bos=False)
    assert len(bos) == 1
    plain = e.tokenize("hello world", add_bos=False)
    assert bos[0] not in plain
    assert e.tokenize("hello world", add_bos=True) == bos + plain  # BOS only, never EOS
    marked = e.tokenize("<|im_start|>user\nhi<|im_end|>", add_bos=False)
    start, end = (e.tokenize(t, add_bos=False) for t in ("<|im_start|>", "<|im_end|>"))
    assert len(start) == len(end) == 1
    assert marked[0] == start[0] and marked[-1] == end[0]
    assert e.token_bytes(start[0]) == e.token_bytes(bos[0]) == b""  # special: no text


def test_token_bytes_rebuild_utf8_text(tiny_model):
    e = TransformersEngine(tiny_model)
    ids = e.tokenize(MIXED_TEXT, add_bos=False)
    pieces = [e.token_bytes(t) for t in ids]
    assert b"".join(pieces) == MIXED_TEXT.encode()
    # Byte-level BPE: some tokens hold part of a character, and every byte has a token.
    assert any(not _is_utf8(p) for p in pieces)
    assert sorted(e.token_bytes(t) for t in range(e.vocab_size) if len(e.token_bytes(t)) == 1) \
        == [bytes([b]) for b in range(256)]


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode()
    except UnicodeDecodeError:
        return False
    return True


def test_missing_files_name_the_path(tmp_path, tiny_model):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        TransformersEngine(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="config.json"):
        TransformersEngine(tmp_path)
    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        TransformersEngine(tmp_path, gguf_file="missing.gguf")
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (no_weights / name).write_bytes((tiny_model / name).read_bytes())
    with pytest.raises(FileNotFoundError, match="no-weights"):
        TransformersEngine(no_weights)


def test_bundled_smollm2_through_transformers_gguf_loading():
    from llmserve.models import bundled_model_path

    try:
        path = bundled_model_path()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    pytest.importorskip("gguf", reason="transformers' GGUF loading needs the gguf package")
    started = time.monotonic()
    try:
        engine = TransformersEngine(path.parent, gguf_file=path.name, threads=2, context_length=512)
    except (NotImplementedError, ValueError) as exc:
        if "Q4_1" in str(exc) or "quant" in str(exc).lower():
            pytest.skip(f"transformers cannot dequantize this GGUF (Q4_1): {exc}")
        raise
    loaded = time.monotonic() - started

    async def main():
        await engine.start()
        try:
            p = chat(engine, "What is the capital of France?")
            q = chat(engine, "Give me a JSON object describing a person called Alice who is 30.")
            return await asyncio.gather(outputs(engine, p, [greedy(12)]),
                                        outputs(engine, q, [greedy(48, grammar=PERSON_GRAMMAR)]))
        finally:
            await engine.stop()

    im_end = engine.tokenize("<|im_end|>", add_bos=False)
    assert len(im_end) == 1 and im_end[0] in engine.end_tokens
    assert engine.eos_token == "<|im_end|>" and engine.chat_template
    ids = engine.tokenize(MIXED_TEXT, add_bos=False)
    assert b"".join(engine.token_bytes(t) for t in ids) == MIXED_TEXT.encode()
    outs, person = asyncio.run(main())
    text = b"".join(b"" if o.end_of_generation else engine.token_bytes(o.token_id) for o in outs)
    assert "Paris" in text.decode(), (text, loaded)
    # The grammar's tokenizer, built from the GGUF's (converted) vocabulary: the same answer
    # as the llama.cpp engine gives.
    assert person[-1].finish_reason == "stop"
    assert json.loads(decoded(engine, person)) == {"name": "Alice", "age": 30}


def test_server_serves_a_model_directory_with_engine_auto(tiny_model, tmp_path):
    """`llmserve serve --model DIR` picks the transformers engine and serves the directory's
    own chat template, streamed and not, under the directory's name."""
    import httpx
    from conftest import run_server
    from sse import stream_post

    with run_server(tmp_path, "--model", str(tiny_model), "--embedding-model", "none",
                    api_key=None) as s:
        name = tiny_model.name.lower()
        with httpx.Client(base_url=s.url, timeout=60) as h:
            assert [m["id"] for m in h.get("/v1/models").json()["data"]] == [name]
            body = {"model": name, "messages": [{"role": "user", "content": "hi"}],
                    "max_tokens": 6, "temperature": 0}
            whole = h.post("/v1/chat/completions", json=body).json()
            assert whole["usage"]["completion_tokens"] <= 6
            streamed = stream_post(h, "/v1/chat/completions", {**body, "stream": True})
            assert streamed.done
            text = "".join(
                c["choices"][0]["delta"].get("content") or ""
                for c in streamed.chunks() if c["choices"]
            )
            assert text == whole["choices"][0]["message"]["content"]


# -- grammars (llguidance) --------------------------------------------------------------------


def test_grammar_output_parses_and_leaves_its_neighbours_alone(run):
    async def fn(e):
        pj, pf = chat(e, QUESTIONS[1]), chat(e, QUESTIONS[3])
        bound = await outputs(e, pj, [greedy(64, grammar=PERSON_COMPACT)])
        free = await outputs(e, pf, [greedy(20, ignore_eos=True)])
        unbound = await outputs(e, pj, [greedy(20, ignore_eos=True)])
        e.batch_rows.clear()
        both = await asyncio.gather(outputs(e, pj, [greedy(64, grammar=PERSON_COMPACT)]),
                                    outputs(e, pf, [greedy(20, ignore_eos=True)]))
        assert max(e.batch_rows) == 2  # they did share steps
        return e, bound, free, unbound, both

    e, bound, free, unbound, (bound2, free2) = run(fn)
    assert_person(e, bound)
    assert [o.token_id for o in bound2] == [o.token_id for o in bound]
    assert [o.token_id for o in free2] == [o.token_id for o in free]
    # the random model says no JSON on its own
    assert [o.token_id for o in unbound] != [o.token_id for o in bound][:20]


def test_grammar_with_n_choices_sampling_and_logprobs(run):
    yes_no = LLMatcher.grammar_from_lark('start: "yes" | "no"')

    def sampled(seed):
        return SamplingParams(max_tokens=64, temperature=1.0, seed=seed, grammar=PERSON_COMPACT)

    async def fn(e):
        p = chat(e, QUESTIONS[0])
        one = await outputs(e, p, [greedy(64, grammar=PERSON_COMPACT)])
        three = await tokens(e, p, [greedy(64, grammar=PERSON_COMPACT)] * 3)
        mixed = await tokens(e, p, [greedy(64, grammar=PERSON_COMPACT), greedy(8, ignore_eos=True)])
        alone = await tokens(e, p, [greedy(8, ignore_eos=True)])
        drawn = await outputs(e, p, [sampled(1), sampled(2), sampled(3)])
        yn = await outputs(e, p, [greedy(8, logprobs=10, grammar=yes_no)])
        return e, one, three, mixed, alone, drawn, yn

    e, one, three, mixed, alone, drawn, yn = run(fn)
    assert three == [[o.token_id for o in one]] * 3
    assert mixed == [three[0], alone[0]]
    for i in range(3):
        assert_person(e, [o for o in drawn if o.index == i])
    assert decoded(e, yn) in ("yes", "no") and yn[-1].finish_reason == "stop"
    first = yn[0]
    assert 1 <= len(first.top_logprobs) < 10  # only pieces of "yes" and "no"
    assert first.top_logprobs[0] == (first.token_id, pytest.approx(first.logprob))
    assert sum(math.exp(lp) for _, lp in first.top_logprobs) == pytest.approx(1.0, abs=1e-4)


def test_grammar_cancel_frees_the_slot_and_bad_grammar_is_refused(run):
    from llmserve.engines.grammar import GrammarError

    endless = LLMatcher.grammar_from_lark("start: /[a-z ]+/")

    async def fn(e):
        p = chat(e, QUESTIONS[1])
        with pytest.raises(GrammarError):
            e.generate(p, [greedy(grammar=LLMatcher.grammar_from_lark("start: nowhere"))])
        stream = e.generate(p, [greedy(200, ignore_eos=True, grammar=endless)] * 2)
        it = stream.__aiter__()
        await it.__anext__()
        stream.cancel()
        rest = [step async for step in it]
        nxt = await asyncio.wait_for(outputs(e, p, [greedy(4, grammar=endless)] * 2), timeout=30)
        return e, rest, nxt

    e, rest, nxt = run(fn, max_sequences=2)
    assert sum(len(s) for s in rest) < 10  # two choices, a few steps under way at most
    assert len(nxt) == 8 and all(e.token_bytes(o.token_id).strip(b" ").isalpha()
                                 or e.token_bytes(o.token_id) == b" " for o in nxt)


def test_detokenize_and_token_strs(tiny_model):
    e = TransformersEngine(tiny_model)
    try:
        text = f"<s><|im_start|>user\n{MIXED_TEXT}<|im_end|>\n"
        ids = e.tokenize(text, add_bos=False)
        assert e.detokenize(ids) == text  # special tokens written out
        strs = e.token_strs(ids)
        assert strs[:2] == ["<s>", "<|im_start|>"] and len(strs) == len(ids)
        assert e.detokenize([]) == "" and e.token_strs([]) == []
    finally:
        e.close()
