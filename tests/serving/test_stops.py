"""StopMatcher: stop strings matched across piece boundaries, holding back no more than needed."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from llmserve.serving.stops import StopMatcher, StopResult

# A small alphabet makes stop strings occur in the text often.
_alpha = st.sampled_from("abc ")
_small_text = st.text(alphabet=_alpha, max_size=30)


@st.composite
def case(draw):
    text = draw(_small_text)
    stops = draw(
        st.lists(
            st.one_of(
                st.text(alphabet=_alpha, min_size=0, max_size=4),
                st.sampled_from(["ab", "abc", "b c", "cab", "aa", "a"]),
                # substrings of the text itself
                st.builds(
                    lambda i, k: text[i : i + k],
                    st.integers(0, max(len(text) - 1, 0)),
                    st.integers(1, 5),
                ),
            ),
            max_size=4,
        )
    )
    cuts = sorted(draw(st.sets(st.integers(0, len(text)), max_size=len(text) + 1)))
    bounds = [0, *cuts, len(text)]
    pieces = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    return text, stops, pieces


def first_match(text: str, stops: list[str]) -> int | None:
    """Where the text is cut: the start of the stop string occurrence that is complete
    first when `text` is read left to right (ties: the one starting first)."""
    found = [(i + len(s), i) for s in stops if s and (i := text.find(s)) >= 0]
    return min(found)[1] if found else None


def held_suffix(fed: str, stops: list[str]) -> str:
    """Longest suffix of `fed` that is a proper prefix of some stop string."""
    best = ""
    for s in stops:
        for k in range(1, len(s)):
            if fed.endswith(s[:k]) and k > len(best):
                best = s[:k]
    return best


def run(stops, pieces):
    """Feed pieces until a stop matches; return (sent text, stopped, index of stopping piece)."""
    m = StopMatcher(stops)
    sent = []
    for i, piece in enumerate(pieces):
        r = m.feed(piece)
        assert isinstance(r, StopResult)
        sent.append(r.text)
        if r.stopped:
            return "".join(sent), True, i
    sent.append(m.flush())
    return "".join(sent), False, None


@settings(max_examples=400, deadline=None)
@given(case())
def test_sent_text_is_the_text_before_the_first_stop(c):
    text, stops, pieces = c
    sent, stopped, at = run(stops, pieces)
    # Generation ends with the piece that first completes some stop string; what is sent is
    # everything fed so far up to the stop occurrence completed first.
    fed = ""
    for i, piece in enumerate(pieces):
        fed += piece
        if first_match(fed, stops) is not None:
            assert stopped and at == i
            assert sent == fed[: first_match(fed, stops)]
            break
    else:
        assert not stopped
        assert sent == text


@settings(max_examples=300, deadline=None)
@given(case())
def test_whole_text_in_one_piece_cuts_at_the_first_match(c):
    text, stops, _ = c
    sent, stopped, _ = run(stops, [text])
    i = first_match(text, stops)
    assert stopped == (i is not None)
    assert sent == (text if i is None else text[:i])


@settings(max_examples=300, deadline=None)
@given(case())
def test_result_independent_of_splitting(c):
    # How the text is cut into pieces never changes the result.
    text, stops, pieces = c
    sent, _, _ = run(stops, pieces)
    i = first_match(text, stops)
    assert sent == (text if i is None else text[:i])


@settings(max_examples=400, deadline=None)
@given(case())
def test_held_back_text_is_exactly_the_longest_possible_stop_start(c):
    text, stops, pieces = c
    m = StopMatcher(stops)
    fed = ""
    sent = ""
    for piece in pieces:
        fed += piece
        r = m.feed(piece)
        sent += r.text
        if r.stopped:
            break
        assert fed.startswith(sent)
        held = fed[len(sent) :]
        assert held == held_suffix(fed, stops), (fed, sent, stops)
    else:
        assert sent + m.flush() == text


def test_stop_split_across_three_pieces():
    m = StopMatcher(["<END>"])
    assert m.feed("hello <E") == StopResult("hello ", False)
    assert m.feed("N") == StopResult("", False)
    assert m.feed("D> world") == StopResult("", True)


def test_stop_split_across_three_pieces_keeps_text_before_it_in_same_piece():
    m = StopMatcher(["STOP"])
    assert m.feed("aS") == StopResult("a", False)
    assert m.feed("T") == StopResult("", False)
    assert m.feed("OPxyz") == StopResult("", True)


def test_held_text_released_when_stop_fails_to_complete():
    m = StopMatcher(["STOP"])
    assert m.feed("ST") == StopResult("", False)
    assert m.feed("X") == StopResult("STX", False)
    assert m.flush() == ""


def test_partial_stop_released_by_flush_at_end():
    m = StopMatcher(["STOP"])
    assert m.feed("abST") == StopResult("ab", False)
    assert m.flush() == "ST"
    assert m.flush() == ""


def test_released_text_keeps_a_new_possible_start():
    # Stop "aab": after "aa" then "a", one "a" is released and "aa" is still held.
    m = StopMatcher(["aab"])
    assert m.feed("aa") == StopResult("", False)
    assert m.feed("a") == StopResult("a", False)
    assert m.feed("b") == StopResult("", True)  # sent in all: "a"


def test_overlapping_prefixes_earliest_match_wins():
    m = StopMatcher(["ab", "abc", "b c"])
    assert m.feed("xa") == StopResult("x", False)
    assert m.feed("b c") == StopResult("", True)  # sent in all: "x"


def test_earliest_start_wins_over_earliest_listed():
    m = StopMatcher(["cd", "bcd"])
    assert m.feed("abcde") == StopResult("a", True)


def test_empty_stop_strings_are_ignored():
    m = StopMatcher(["", "Z"])
    assert m.feed("abc") == StopResult("abc", False)
    assert m.feed("xZy") == StopResult("x", True)


def test_only_empty_stop_strings_is_passthrough():
    m = StopMatcher([""])
    assert m.feed("abc") == StopResult("abc", False)
    assert m.flush() == ""


def test_no_stops_is_passthrough():
    m = StopMatcher([])
    for piece in ["a", "", "bc", "<|im_end|>"]:
        assert m.feed(piece) == StopResult(piece, False)
    assert m.flush() == ""


def test_duplicate_stops_behave_like_one():
    m = StopMatcher(["xy", "xy"])
    assert m.feed("ax") == StopResult("a", False)
    assert m.feed("y") == StopResult("", True)


def test_multi_character_stop_with_unicode():
    m = StopMatcher(["。\n"])
    assert m.feed("你好。") == StopResult("你好", False)
    assert m.feed("\n再见") == StopResult("", True)


def test_shorter_stop_completing_first_ends_generation():
    # Streaming semantics: generation ends as soon as any stop string is complete. A longer
    # stop that starts earlier but would only complete later never gets the chance to.
    m = StopMatcher(["abcd", "bc"])
    assert m.feed("a") == StopResult("", False)
    assert m.feed("b") == StopResult("", False)
    assert m.feed("c") == StopResult("a", True)
    # In one piece the cut is the same: "bc" is complete before "abcd" is.
    assert StopMatcher(["abcd", "bc"]).feed("abcd") == StopResult("a", True)
