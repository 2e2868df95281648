"""The transformers engine's batched sampler: greedy is the argmax, draws follow the
distribution that temperature, top-k, top-p and min-p leave, and a seeded row draws the
same tokens whatever else shares its batch."""

from __future__ import annotations

import math
from collections import Counter

import pytest

torch = pytest.importorskip("torch", reason="the hf extra (torch, transformers) is not installed")

from llmserve.engines.base import SamplingParams  # noqa: E402
from llmserve.engines.hf_sampling import Sampler, draw_keys, gumbel, noise_bits  # noqa: E402

CPU = torch.device("cpu")
PROBS = [0.5, 0.25, 0.15, 0.1]


def _logits(rows: int, probs=PROBS) -> torch.Tensor:
    return torch.tensor([probs] * rows).log()


def _params(**kw) -> SamplingParams:
    return SamplingParams(max_tokens=100, **kw)


def _frequencies(params: SamplingParams, steps: int = 4000) -> list[float]:
    sampler = Sampler(1, len(PROBS), CPU)
    sampler.admit(0, params, [])
    keys = draw_keys(params.seed)
    counts: Counter[int] = Counter()
    for step in range(steps):
        counts[sampler.sample(_logits(1), [0], [params], [keys], [step]).tokens[0]] += 1
    return [counts[t] / steps for t in range(len(PROBS))]


def test_draws_follow_the_distribution():
    assert _frequencies(_params(temperature=1.0, seed=1)) == pytest.approx(PROBS, abs=0.03)


def test_temperature_top_k_top_p_and_min_p_shape_the_draws():
    cold = _frequencies(_params(temperature=0.5, seed=2))
    squared = [p * p / sum(q * q for q in PROBS) for p in PROBS]
    assert cold == pytest.approx(squared, abs=0.03)
    top2 = _frequencies(_params(temperature=1.0, top_k=2, seed=3))
    assert top2 == pytest.approx([2 / 3, 1 / 3, 0, 0], abs=0.03)
    # top_p 0.6: 0.5 does not reach it, 0.5 + 0.25 does: two tokens left
    assert _frequencies(_params(temperature=1.0, top_p=0.6, seed=4))[2:] == [0, 0]
    # min_p 0.25: tokens below 0.25 * 0.5 (0.1) are gone
    assert _frequencies(_params(temperature=1.0, min_p=0.25, seed=5))[3] == 0


def test_greedy_is_the_argmax_after_bias_and_penalties():
    sampler = Sampler(3, 4, CPU)
    rows = [_params(temperature=0.0), _params(temperature=0.0, logit_bias={2: 10.0}),
            _params(temperature=0.0, repetition_penalty=100.0)]
    for slot, p in enumerate(rows):
        sampler.admit(slot, p, [0])  # the prompt holds token 0
    draw = sampler.sample(_logits(3), [0, 1, 2], rows, [(0, 0)] * 3, [0] * 3)
    assert draw.tokens == [0, 2, 1]
    # frequency penalty: the chosen token counts from the next step on
    sampler.admit(0, freq := _params(temperature=0.0, frequency_penalty=5.0), [])
    assert [sampler.sample(_logits(1), [0], [freq], [(0, 0)], [s]).tokens[0]
            for s in range(3)] == [0, 1, 2]


def test_a_seeded_row_draws_the_same_whatever_shares_its_batch():
    p = _params(temperature=1.0, top_k=3, seed=42)
    alone = Sampler(1, 4, CPU)
    alone.admit(0, p, [])
    crowd = Sampler(4, 4, CPU)
    others = [_params(temperature=0.7, seed=1), _params(temperature=0.0),
              _params(temperature=1.3, top_p=0.8, seed=9, presence_penalty=1.0)]
    for slot, q in enumerate(others):
        crowd.admit(slot, q, [])
    crowd.admit(3, p, [])
    noisy = torch.randn(3, 4)
    got_alone, got_crowd = [], []
    for step in range(40):
        got_alone += alone.sample(_logits(1), [0], [p], [draw_keys(42)], [step]).tokens
        logits = torch.cat([noisy, _logits(1)])
        keys = [draw_keys(q.seed) for q in others] + [draw_keys(42)]
        got_crowd.append(crowd.sample(logits, [0, 1, 2, 3], [*others, p], keys,
                                      [step + 7] * 3 + [step]).tokens[3])
    assert got_alone == got_crowd
    assert len(set(got_alone)) == 3  # it does draw, from the top 3


def test_noise_depends_on_key_and_step_only():
    a = gumbel([draw_keys(1), draw_keys(2)], [5, 5], 64, CPU)
    b = gumbel([draw_keys(2)], [5], 64, CPU)
    assert torch.equal(a[1], b[0]) and not torch.equal(a[0], a[1])
    assert not torch.equal(gumbel([draw_keys(1)], [6], 64, CPU)[0], a[0])
    assert torch.isfinite(gumbel([draw_keys(s) for s in range(50)], list(range(50)), 4096, CPU)).all()


def test_the_top_noise_value_is_finite_and_a_masked_token_never_wins():
    """Seed 283, step 0: token 32472's hash has its top 24 bits all set, the value that once
    rounded to u = 1.0 in float32 (infinite noise, and a NaN that beat a grammar's mask)."""
    n_vocab, keys = 49152, draw_keys(283)
    assert int(noise_bits([keys], [0], n_vocab, CPU)[0, 32472]) >> 8 == (1 << 24) - 1
    assert torch.isfinite(gumbel([keys], [0], n_vocab, CPU)).all()
    p = _params(temperature=1.0, seed=283)
    sampler = Sampler(1, n_vocab, CPU)
    sampler.admit(0, p, [])
    masked = torch.full((1, n_vocab), float("-inf"))
    masked[0, 7] = 0.0  # a grammar allows token 7 alone
    assert sampler.sample(masked, [0], [p], [keys], [0]).tokens == [7]


def test_logprobs_come_from_the_raw_logits_sorted():
    sampler = Sampler(2, 4, CPU)
    rows = [_params(temperature=0.0, logprobs=2, logit_bias={3: 50.0}), _params(temperature=0.0)]
    for slot, p in enumerate(rows):
        sampler.admit(slot, p, [])
    draw = sampler.sample(_logits(2), [0, 1], rows, [(0, 0)] * 2, [0, 0])
    assert draw.tokens == [3, 0]
    assert draw.logprobs[0] == pytest.approx(math.log(0.1), abs=1e-5)
    assert [t for t, _ in draw.top[0]] == [0, 1]
    assert draw.top[0][0][1] == pytest.approx(math.log(0.5), abs=1e-5)
    assert draw.logprobs[1] is None and draw.top[1] is None
