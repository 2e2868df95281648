"""How far llama.cpp's logits move with the shape a prompt is read in: the figure behind
`TIE` in tests/greedy.py.

For each prompt of tests/api/test_chat_e2e.py's sixteen-stream test, the bundled model's greedy
answer (32 tokens) is found with the prompt read in one pass; then the same answer is read again
(teacher-forced) with the prompt read other ways: its first 24 tokens (the system prompt) kept
from another prompt's cache, in chunks of 7, and one token at a time (what a prompt's first
token gets in a step beside running streams: llama.cpp's equal split gives each sequence in a
pass the same number of tokens). At every step the gap between the one-pass run's two best tokens
is compared with the same two tokens' gap in the other run; the table has the largest change.

    PYTHONPATH=.:tests .venv/bin/python benchmarks/shape_noise.py

Measured on a 2-core Xeon (AMX) with the bundled Q4_1: the cached prefix and chunks of 7 change
nothing; one token at a time moves a gap by up to 0.81 nats (median over prompts 0.37).
"""

from __future__ import annotations

import statistics

import llama_cpp
import numpy as np
from api.test_chat_e2e import CONCURRENT_PROMPTS

from llmserve.models import bundled_model_path

SYSTEM = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
          "Face<|im_end|>\n")
OTHER = "What is the weather in Paris? Please answer with details."
STEPS = 32


class Reader:
    def __init__(self) -> None:
        self.llm = llama_cpp.Llama(str(bundled_model_path()), n_ctx=2048, n_threads=2,
                                   n_batch=512, logits_all=True, verbose=False)

    def chat(self, user: str) -> list[int]:
        text = f"{SYSTEM}<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
        return self.llm.tokenize(text.encode(), add_bos=False, special=True)

    def _last(self) -> np.ndarray:
        row = np.array(self.llm.scores[self.llm.n_tokens - 1])
        return row - np.logaddexp.reduce(row)

    def _reset(self) -> None:
        self.llm.reset()
        self.llm._ctx.kv_cache_clear()

    def greedy(self, prompt: list[int]) -> list[int]:
        self._reset()
        self.llm.eval(prompt)
        path: list[int] = []
        for _ in range(STEPS):
            path.append(int(np.argmax(self._last())))
            self.llm.eval([path[-1]])
        return path

    def logprobs(self, prompt: list[int], path: list[int], chunk: int,
                 cached_from: list[int] | None = None, keep: int = 0) -> list[np.ndarray]:
        """Each step's logprobs along `path`, the prompt read in pieces of `chunk` after
        `keep` tokens left in the cache by `cached_from`."""
        self._reset()
        at = 0
        if cached_from is not None:
            self.llm.eval(cached_from)
            self.llm._ctx.kv_cache_seq_rm(-1, keep, -1)
            self.llm.n_tokens = at = keep
        while at < len(prompt):
            self.llm.eval(prompt[at:at + chunk])
            at += chunk
        rows = [self._last()]
        for token in path[:-1]:
            self.llm.eval([token])
            rows.append(self._last())
        return rows


def largest_gap_change(base: list[np.ndarray], other: list[np.ndarray]) -> float:
    worst = 0.0
    for a, b in zip(base, other, strict=True):
        first, second = np.argsort(-a)[:2]
        worst = max(worst, abs((a[first] - a[second]) - (b[first] - b[second])))
    return float(worst)


def main() -> None:
    reader = Reader()
    other = reader.chat(OTHER)
    ways = {"cached prefix": dict(chunk=10**6, cached_from=other, keep=24),
            "chunks of 7": dict(chunk=7), "one at a time": dict(chunk=1)}
    table: dict[str, list[float]] = {way: [] for way in ways}
    print(f"{'prompt':34} " + " ".join(f"{way:>14}" for way in ways))
    for user in CONCURRENT_PROMPTS:
        prompt = reader.chat(user)
        path = reader.greedy(prompt)
        base = reader.logprobs(prompt, path, chunk=10**6)
        row = []
        for way, kwargs in ways.items():
            change = largest_gap_change(base, reader.logprobs(prompt, path, **kwargs))
            table[way].append(change)
            row.append(change)
        print(f"{user[:34]:34} " + " ".join(f"{x:14.3f}" for x in row))
    print(f"{'largest':34} " + " ".join(f"{max(v):14.3f}" for v in table.values()))
    print(f"{'median':34} " + " ".join(f"{statistics.median(v):14.3f}" for v in table.values()))


if __name__ == "__main__":
    main()
