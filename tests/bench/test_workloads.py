"""The bench's prompts: cold conversations share nothing a cache could reuse, every block asks
the same questions, and the grounded workload is fixed and copies from its prompts."""

from __future__ import annotations

import itertools
import json
from importlib import resources

import pytest

from llmserve.bench.workloads import GROUNDED, PROBE, PromptMaker, workload_prompts
from llmserve.engines.llamacpp import LlamaCppEngine
from llmserve.models import bundled_model_path
from llmserve.serving.chat_template import CHATML_TEMPLATE, ChatTemplate


@pytest.fixture(scope="module")
def model():
    engine = LlamaCppEngine(bundled_model_path(), context_length=64, max_sequences=1)
    yield engine
    engine.close()


def _common(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def test_cold_conversations_share_no_prefix_beyond_the_template_opening(model):
    """Blocks of several systems and levels, as the bench makes them: no two conversations,
    in one block or across blocks, share tokens past their nonce's first ones, so no cache
    holds more than the template's opening of one it was not sent."""
    template = ChatTemplate(model.chat_template or CHATML_TEMPLATE, bos_token=model.bos_token,
                            eos_token=model.eos_token)
    maker = PromptMaker(seed=7)
    # the same sizes twice over, as a palindrome's two halves make them
    blocks = [maker.block(workload_prompts(w), n) for _ in range(2)
              for w in ("free", "grounded") for n in (1, 4, 20)]
    blocks.append([maker.conversation(PROBE) for _ in range(3)])
    conversations = [c for b in blocks for c in b]
    rendered = [template.render(c) for c in conversations]
    tokens = [model.tokenize(r, add_bos=False) for r in rendered]
    nonces = [c[0]["content"].split()[0] for c in conversations]
    assert len(set(nonces)) == len(nonces)  # one each
    for r, nonce in zip(rendered, nonces, strict=True):
        assert nonce in r and r.index(nonce) < 40, r[:80]  # in the template's first message
    # where each nonce ends, in tokens: past that, no two conversations may agree
    nonce_ends = [len(model.tokenize(r[: r.index(n) + len(n)], add_bos=False))
                  for r, n in zip(rendered, nonces, strict=True)]
    for i, j in itertools.combinations(range(len(tokens)), 2):
        assert _common(tokens[i], tokens[j]) < nonce_ends[i], (rendered[i][:60], rendered[j][:60])


def test_every_block_asks_the_same_questions_in_order():
    maker = PromptMaker()
    prompts = workload_prompts("grounded")
    a, b = maker.block(prompts, 8), maker.block(prompts, 8)
    assert [c[1] for c in a] == [c[1] for c in b]
    assert [c[1]["content"] for c in a] == [prompts[i % len(prompts)] for i in range(8)]
    assert {c[0]["content"] for c in a}.isdisjoint(c[0]["content"] for c in b)


def test_nonces_are_seeded_or_random():
    def first(seed):
        return PromptMaker(seed).conversation("q")[0]["content"]

    assert first(3) == first(3) and first(3) != first(4)
    assert first(None) != first(None)  # a server started earlier (--url) has not seen them


def test_workloads_are_fixed():
    shipped = json.loads(resources.files("llmserve.bench").joinpath("prompts.json").read_text())
    assert workload_prompts("free") == shipped
    grounded = workload_prompts("grounded")
    assert grounded == workload_prompts("grounded") == GROUNDED and len(set(grounded)) >= 5
    with pytest.raises(ValueError):
        workload_prompts("chat")


def test_grounded_prompts_give_the_text_to_work_on(model):
    """Each names its task, then gives the text the answer is to come from: long enough that
    a default answer (128 tokens) is still copying it."""
    for prompt in GROUNDED:
        task, text = prompt.split("\n\n", 1)
        assert len(model.tokenize(task, add_bos=False)) < 45, task
        assert len(model.tokenize(text, add_bos=False)) >= 120, text[:60]
