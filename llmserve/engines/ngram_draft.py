"""Prompt-lookup drafting: guess a sequence's next tokens by copying what followed the most
recent earlier occurrence of its last few tokens (in its prompt or its own output).

No model: an index from every n-gram seen (n in [ngram_min, ngram_max]) to the position of
the token that followed its latest occurrence, kept up to date as tokens are appended, so a
draft costs a few dict look-ups however long the context is.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence


class NgramIndex:
    """The context of one sequence and where each of its n-grams last continued."""

    __slots__ = ("tokens", "ngram_min", "ngram_max", "_next")

    def __init__(self, ngram_max: int = 3, ngram_min: int = 1) -> None:
        if not 1 <= ngram_min <= ngram_max:
            raise ValueError(f"need 1 <= ngram_min <= ngram_max, got {ngram_min}, {ngram_max}")
        self.ngram_min = ngram_min
        self.ngram_max = ngram_max
        self.tokens: list[int] = []
        # n-gram -> index in `tokens` of the token after its latest occurrence
        self._next: dict[tuple[int, ...], int] = {}

    def __len__(self) -> int:
        return len(self.tokens)

    def extend(self, tokens: Iterable[int]) -> None:
        toks, nxt, lo, hi = self.tokens, self._next, self.ngram_min, self.ngram_max
        for token in tokens:
            i = len(toks)  # the n-grams ending just before `token` now have a continuation
            for n in range(lo, min(hi, i) + 1):
                nxt[tuple(toks[i - n:i])] = i
            toks.append(token)

    def propose(self, k: int) -> list[int]:
        """Up to `k` tokens that followed the latest earlier occurrence of the longest
        suffix (of ngram_max down to ngram_min tokens) seen before; [] when none was."""
        toks = self.tokens
        if k <= 0:
            return []
        for n in range(min(self.ngram_max, len(toks)), self.ngram_min - 1, -1):
            # the suffix itself has no continuation yet, so this is an earlier occurrence
            at = self._next.get(tuple(toks[-n:]))
            if at is not None:
                return toks[at:at + k]
        return []


class PromptLookup:
    """An engine's drafting settings, and the draft for any of its sequences: each sequence
    keeps its own `NgramIndex`, brought up to date with what it generated before each draft."""

    __slots__ = ("tokens", "ngram_max", "ngram_min")

    def __init__(self, tokens: int = 5, ngram_max: int = 3, ngram_min: int = 2) -> None:
        self.tokens = max(0, tokens)
        self.ngram_max = max(1, ngram_max)
        # One token's last continuation is a poor guess: with 1 the bundled model's free
        # generation ran at 0.49x, with 2 at 0.83x, copying a paragraph at 1.2x either way.
        self.ngram_min = max(1, min(ngram_min, self.ngram_max))

    def new_index(self) -> NgramIndex:
        return NgramIndex(self.ngram_max, self.ngram_min)

    def propose(self, index: NgramIndex, prompt: Sequence[int], generated: Sequence[int],
                room: int) -> list[int]:
        """Up to `room` (and the configured length) tokens to follow prompt + generated."""
        if not index.tokens:
            index.extend(prompt)
        index.extend(generated[len(index) - len(prompt):])
        return index.propose(min(self.tokens, room))
