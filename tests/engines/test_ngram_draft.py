"""Prompt-lookup drafting: what follows the latest earlier occurrence of the longest suffix."""

from __future__ import annotations

import pytest

from llmserve.engines.ngram_draft import NgramIndex, PromptLookup


def index(tokens, ngram_max=3, ngram_min=1) -> NgramIndex:
    ix = NgramIndex(ngram_max, ngram_min)
    ix.extend(tokens)
    return ix


def test_copies_what_followed_the_earlier_occurrence():
    assert index([1, 2, 3, 4, 5, 9, 1, 2, 3]).propose(2) == [4, 5]


def test_longest_suffix_wins_over_a_later_shorter_match():
    # "3" alone last continued with 8; "2 3" with 4
    assert index([2, 3, 4, 7, 3, 8, 2, 3]).propose(1) == [4]


def test_latest_occurrence_wins():
    assert index([5, 6, 1, 5, 6, 2, 5, 6]).propose(1) == [2]


def test_draft_may_run_into_the_suffix_and_stops_at_the_end():
    assert index([7, 7, 7]).propose(5) == [7]
    assert index([1, 2, 1, 2]).propose(5) == [1, 2]


def test_nothing_seen_nothing_proposed():
    assert index([1, 2, 3]).propose(4) == []
    assert index([]).propose(4) == []
    assert index([1, 2, 1]).propose(0) == []


def test_ngram_min_bounds_the_shortest_suffix():
    assert index([4, 9, 1, 2, 3, 9], ngram_min=1).propose(2) == [1, 2]
    assert index([4, 9, 1, 2, 3, 9], ngram_min=2).propose(2) == []


def test_extending_in_pieces_equals_extending_at_once():
    toks = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 3, 8, 4, 6, 2, 6, 4, 3, 3]
    whole = index(toks)
    parts = NgramIndex()
    for i in range(0, len(toks), 4):
        parts.extend(toks[i:i + 4])
        assert parts.propose(3) == index(toks[:i + 4]).propose(3)
    assert parts.propose(3) == whole.propose(3) and len(parts) == len(toks)


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError):
        NgramIndex(2, 3)
    with pytest.raises(ValueError):
        NgramIndex(3, 0)


def test_prompt_lookup_follows_what_the_sequence_generated():
    lookup = PromptLookup(tokens=4, ngram_max=3, ngram_min=2)
    ix = lookup.new_index()
    prompt = [1, 2, 3, 4, 5, 6]
    assert lookup.propose(ix, prompt, [], room=10) == []  # (5, 6) never continued
    # generated 1, 2: the pair seen at the prompt's start continues with 3, 4, 5, 6
    assert lookup.propose(ix, prompt, [1, 2], room=10) == [3, 4, 5, 6]
    assert lookup.propose(ix, prompt, [1, 2], room=2) == [3, 4]  # bounded by the room left
    assert len(ix) == len(prompt) + 2  # each token read once, however often it drafts
    assert lookup.propose(ix, prompt, [1, 2, 3, 4, 5], room=10) == [6, 1, 2, 3]


def test_prompt_lookup_never_trusts_a_single_token_below_its_minimum():
    lookup = PromptLookup(tokens=4, ngram_max=3, ngram_min=2)
    assert lookup.propose(lookup.new_index(), [7, 8, 9], [7], room=10) == []
    assert PromptLookup(ngram_max=1, ngram_min=5).ngram_min == 1  # clamped, not an error
