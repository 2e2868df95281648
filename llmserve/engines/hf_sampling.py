"""Sampling for the transformers engine: every sequence of a step in a few tensor operations.

The chain is the llama.cpp engine's: logit bias, penalties (repetition over prompt and
output, presence and frequency over output), then greedy, or temperature, top-k, top-p,
min-p and a draw. Per-sequence state that lives across steps (bias row, tokens seen, token
counts) sits in `[slots, vocab]` tensors on the device, one row per cache slot, allocated
only once some sequence needs it.

A draw is Gumbel-max: the argmax of log-probabilities plus Gumbel noise. The noise is a
hash of (the sequence's seed, how many tokens it has generated, token id), computed on the
device: the same seed draws the same tokens whoever else shares the step, with no
generator per row and no Python loop over rows.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from llmserve.engines.base import SamplingParams

_M32 = 0xFFFFFFFF


def _mix32_int(x: int) -> int:
    """A 32-bit integer hash (`lowbias32`), on Python ints."""
    x &= _M32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """`x * c mod 2**32` for int64 `x < 2**32`, in halves so no product overflows int64."""
    lo = x * (c & 0xFFFF)
    hi = ((x * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & _M32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """`_mix32_int` on an int64 tensor of 32-bit values."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def draw_keys(seed: int | None) -> tuple[int, int]:
    """A sequence's two 32-bit noise keys (a random seed when none is given)."""
    if seed is None:
        seed = random.getrandbits(64)
    seed %= 1 << 64
    k1 = _mix32_int(seed ^ 0x5BD1E995)
    k2 = _mix32_int((seed >> 32) ^ _mix32_int(k1 + 0x27D4EB2F))
    return k1, k2


def noise_bits(keys: list[tuple[int, int]], steps: list[int], n_vocab: int,
               device: torch.device) -> torch.Tensor:
    """`[rows, n_vocab]` 32-bit hashes: row i is a function of `keys[i]` and `steps[i]` only."""
    s1 = [_mix32_int(k1 ^ _mix32_int(step + 0x9E3779B9)) for (k1, _), step in zip(keys, steps, strict=True)]
    s2 = [_mix32_int(k2 + step * 0x632BE5AB) for (_, k2), step in zip(keys, steps, strict=True)]
    ids = torch.arange(n_vocab, dtype=torch.int64, device=device)
    a = torch.tensor(s1, dtype=torch.int64, device=device)[:, None]
    b = torch.tensor(s2, dtype=torch.int64, device=device)[:, None]
    h = _mix32((_mul32(ids, 0x9E3779B1)[None, :] + a) & _M32)
    return _mix32(h ^ b)


def gumbel(keys: list[tuple[int, int]], steps: list[int], n_vocab: int,
           device: torch.device) -> torch.Tensor:
    """`[rows, n_vocab]` Gumbel noise from `noise_bits`, finite everywhere."""
    h = noise_bits(keys, steps, n_vocab, device)
    # 23 bits: k + 0.5 is exact in float32 for k < 2**23, so u lies strictly inside (0, 1).
    # (With 24, the top value rounded to 1.0: infinite noise, which made a token a grammar
    # forbids win the draw, about once in 300 rows of 49k tokens.)
    u = ((h >> 9).float() + 0.5) * (1.0 / (1 << 23))
    return -torch.log(-torch.log(u))


@dataclass(frozen=True)
class Draw:
    """One step's result for its rows: the tokens, and for rows that asked, the chosen
    token's log-probability and the top alternatives (raw logits, before bias and
    penalties)."""

    tokens: list[int]
    logprobs: list[float | None]
    top: list[tuple[tuple[int, float], ...] | None]


class Sampler:
    """Per-slot sampling state and the batched draw."""

    def __init__(self, slots: int, n_vocab: int, device: torch.device) -> None:
        self._slots = slots
        self._n_vocab = n_vocab
        self._device = device
        self._bias: torch.Tensor | None = None  # [slots, vocab] float
        self._seen: torch.Tensor | None = None  # [slots, vocab] bool: prompt + output
        self._counts: torch.Tensor | None = None  # [slots, vocab] float: output

    def _table(self, dtype: torch.dtype) -> torch.Tensor:
        return torch.zeros(self._slots, self._n_vocab, dtype=dtype, device=self._device)

    def admit(self, slot: int, p: SamplingParams, prompt: list[int]) -> None:
        """A new sequence in `slot`: its bias row, and its penalty rows cleared."""
        n, dev = self._n_vocab, self._device
        bias = {t: b for t, b in p.logit_bias.items() if 0 <= t < n}
        if bias and self._bias is None:
            self._bias = self._table(torch.float32)
        if self._bias is not None:
            self._bias[slot].zero_()
            if bias:
                ids = torch.tensor(list(bias), dtype=torch.long, device=dev)
                self._bias[slot, ids] = torch.tensor(list(bias.values()), dtype=torch.float32, device=dev)
        if p.repetition_penalty != 1.0 and self._seen is None:
            self._seen = self._table(torch.bool)
        if self._seen is not None:
            self._seen[slot].zero_()
            if p.repetition_penalty != 1.0:
                ids = torch.tensor([t for t in prompt if 0 <= t < n], dtype=torch.long, device=dev)
                self._seen[slot, ids] = True
        if (p.presence_penalty or p.frequency_penalty) and self._counts is None:
            self._counts = self._table(torch.float32)
        if self._counts is not None:
            self._counts[slot].zero_()

    def sample(self, logits: torch.Tensor, slots: list[int], params: list[SamplingParams],
               keys: list[tuple[int, int]], steps: list[int]) -> Draw:
        """Row i of `logits` (float32, grammar masks applied) is the sequence in `slots[i]`,
        sampled with `params[i]`, its noise keyed by `keys[i]` and `steps[i]`."""
        dev, rows = self._device, len(slots)
        slot_index = torch.tensor(slots, dtype=torch.long, device=dev)
        want = [i for i, p in enumerate(params) if p.logprobs is not None]
        lp_rows = torch.log_softmax(logits[want], dim=-1) if want else None

        x = logits
        if self._bias is not None and any(p.logit_bias for p in params):
            x = x + self._bias.index_select(0, slot_index)
        if self._seen is not None and any(p.repetition_penalty != 1.0 for p in params):
            rp = torch.tensor([p.repetition_penalty for p in params], device=dev)[:, None]
            x = torch.where(self._seen.index_select(0, slot_index),
                            torch.where(x > 0, x / rp, x * rp), x)
        if self._counts is not None and any(p.presence_penalty or p.frequency_penalty for p in params):
            counts = self._counts.index_select(0, slot_index)
            fp = torch.tensor([p.frequency_penalty for p in params], device=dev)[:, None]
            pp = torch.tensor([p.presence_penalty for p in params], device=dev)[:, None]
            x = x - fp * counts - pp * (counts > 0).float()

        drawn = [i for i, p in enumerate(params) if not (p.temperature <= 0.0 or p.top_k == 1)]
        chosen = x.argmax(dim=-1)
        if drawn:
            picked = self._draw(x[drawn] if len(drawn) < rows else x,
                                [params[i] for i in drawn], [keys[i] for i in drawn],
                                [steps[i] for i in drawn])
            if len(drawn) < rows:
                chosen = chosen.index_copy(0, torch.tensor(drawn, dtype=torch.long, device=dev), picked)
            else:
                chosen = picked
        self._record(slot_index, chosen)

        tokens = chosen.tolist()
        logprobs: list[float | None] = [None] * rows
        top: list[tuple[tuple[int, float], ...] | None] = [None] * rows
        if lp_rows is not None:
            lp_chosen = lp_rows.gather(1, chosen[want][:, None])[:, 0].tolist()
            k_max = min(max(params[i].logprobs for i in want), self._n_vocab)
            values, ids = torch.topk(lp_rows, k_max) if k_max > 0 else (lp_rows[:, :0], None)
            values = values.tolist()
            ids = ids.tolist() if ids is not None else [[] for _ in want]
            for j, i in enumerate(want):
                logprobs[i] = lp_chosen[j]
                k = min(params[i].logprobs, self._n_vocab)
                # a grammar's forbidden tokens (-inf) are no alternative
                top[i] = tuple((t, v) for t, v in zip(ids[j][:k], values[j][:k], strict=True)
                               if v > float("-inf"))
        return Draw(tokens, logprobs, top)

    def _draw(self, x: torch.Tensor, params: list[SamplingParams], keys: list[tuple[int, int]],
              steps: list[int]) -> torch.Tensor:
        dev, n = self._device, self._n_vocab
        x = x / torch.tensor([p.temperature for p in params], device=dev)[:, None]
        ks = [p.top_k if 0 < p.top_k < n else 0 for p in params]
        if any(ks):
            kth = torch.topk(x, max(ks)).values.gather(
                1, torch.tensor([max(k, 1) - 1 for k in ks], dtype=torch.long, device=dev)[:, None])
            off = torch.tensor([k == 0 for k in ks], device=dev)[:, None]
            x = x.masked_fill((x < kth) & ~off, float("-inf"))
        probs = torch.softmax(x, dim=-1)
        if any(p.top_p < 1.0 for p in params):
            top_p = torch.tensor([p.top_p if p.top_p < 1.0 else 2.0 for p in params], device=dev)
            sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
            before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
            # keeps the token that reaches top_p
            sorted_probs = sorted_probs.masked_fill(before >= top_p[:, None], 0.0)
            probs = torch.empty_like(probs).scatter_(1, order, sorted_probs)
        if any(p.min_p > 0.0 for p in params):
            min_p = torch.tensor([p.min_p for p in params], device=dev)[:, None]
            probs = probs.masked_fill(probs < min_p * probs.max(dim=-1, keepdim=True).values, 0.0)
        return (torch.log(probs) + gumbel(keys, steps, n, dev)).argmax(dim=-1)

    def _record(self, slot_index: torch.Tensor, tokens: torch.Tensor) -> None:
        """The new tokens count for their sequences' penalties from the next step on."""
        if self._seen is not None:
            self._seen[slot_index, tokens] = True
        if self._counts is not None:
            self._counts.index_put_((slot_index, tokens),
                                    torch.ones_like(tokens, dtype=torch.float32), accumulate=True)
