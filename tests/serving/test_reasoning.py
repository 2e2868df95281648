"""The reasoning splitter: fed in any pieces, it splits as it would split the whole text."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from llmserve.serving.reasoning import ReasoningFormat, ReasoningParser, reasoning_format

FMT = ReasoningFormat()
START, END = FMT.start, FMT.end


def whole(text: str, *, opened: bool) -> tuple[str, str]:
    """The split of a whole output, written plainly (the rule in serving/reasoning.py)."""
    body = text.lstrip()
    if body.startswith(START):
        inside = body[len(START):]
    elif opened:
        inside = text
    else:
        return "", text
    at = inside.find(END)
    if at < 0:
        return inside, ""
    return inside[:at], inside[at + len(END):].lstrip()


def fed(pieces: list[str], *, opened: bool) -> tuple[str, str, list[bool]]:
    parser = ReasoningParser(FMT, opened=opened)
    reasoning, answer, states = "", "", []
    for piece in pieces:
        r, a = parser.feed(piece)
        reasoning, answer = reasoning + r, answer + a
        states.append(parser.reasoning)
    r, a = parser.flush()
    return reasoning + r, answer + a, states


# Text made of the pieces that matter: the tags, parts of them, blanks, words.
_atoms = st.sampled_from([START, END, "<", "</", "<th", "</thi", "think>", ">", " ", "\n",
                          "Hello", "2+2=4", "é", "🙂", "<b>", "ink"])
texts = st.lists(_atoms, max_size=14).map("".join)


@st.composite
def splits(draw) -> tuple[str, list[str]]:
    text = draw(texts)
    cuts = sorted(draw(st.lists(st.integers(0, len(text)), max_size=8)))
    bounds = [0, *cuts, len(text)]
    return text, [text[a:b] for a, b in zip(bounds, bounds[1:])]


@given(splits(), st.booleans())
def test_any_split_gives_the_whole_text_s_split(case, opened):
    text, pieces = case
    reasoning, answer, _ = fed(pieces, opened=opened)
    assert (reasoning, answer) == whole(text, opened=opened)


@given(splits(), st.booleans())
def test_the_answer_never_comes_before_the_reasoning_ends(case, opened):
    text, pieces = case
    parser = ReasoningParser(FMT, opened=opened)
    answered = False
    for piece in pieces:
        r, a = parser.feed(piece)
        assert not (answered and r), "reasoning after the answer began"
        answered = answered or bool(a)


@pytest.mark.parametrize("pieces, expected", [
    (["<think>", "Let me see.", "</think>", "\n\n", "Four."], ("Let me see.", "Four.")),
    (["<th", "ink>\nhm", "m</", "think", ">Four"], ("\nhmm", "Four")),
    (["Four."], ("", "Four.")),
    (["  ", "Four."], ("", "  Four.")),
    (["<think>", "cut off in the mid"], ("cut off in the mid", "")),
    (["<think>a</thi"], ("a</thi", "")),
    (["<b>bold</b>"], ("", "<b>bold</b>")),
    (["Four. <think>x</think>"], ("", "Four. <think>x</think>")),
])
def test_the_model_opens_the_tag(pieces, expected):
    reasoning, answer, _ = fed(pieces, opened=False)
    assert (reasoning, answer) == expected


@pytest.mark.parametrize("pieces, expected", [
    (["Let me see.", "</think>", "Four."], ("Let me see.", "Four.")),
    (["<think>", "a", "</think>b"], ("a", "b")),  # an R1 distill that opens it again
    (["all of it is reasoning"], ("all of it is reasoning", "")),
])
def test_the_prompt_opened_the_tag(pieces, expected):
    reasoning, answer, _ = fed(pieces, opened=True)
    assert (reasoning, answer) == expected


def test_a_partial_tag_is_held_back_not_sent():
    parser = ReasoningParser(FMT, opened=True)
    assert parser.feed("thinking </th") == ("thinking ", "")
    assert parser.reasoning
    assert parser.feed("ink>") == ("", "")
    assert not parser.reasoning
    assert parser.feed(" the answer") == ("", "the answer")


def test_the_prompt_decides_where_the_output_starts():
    assert FMT.opened_in("<|im_start|>assistant\n<think>\n")
    assert not FMT.opened_in("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert not FMT.opened_in("<|im_start|>assistant\n")
    # an earlier turn's closed reasoning does not open this one
    assert not FMT.opened_in("<think>a</think>b<|im_start|>assistant\n")
    assert ReasoningFormat(always_opened=True).opened_in("<|im_start|>assistant\n")


def test_parser_names():
    assert reasoning_format("none", "<think>") is None
    assert reasoning_format("auto", "{{ messages }}") is None
    assert reasoning_format("auto", "{{ '<think>\\n' }}") == ReasoningFormat()
    assert reasoning_format("qwen3", "") == ReasoningFormat()
    assert reasoning_format("deepseek_r1", "").always_opened
    with pytest.raises(ValueError, match="unknown reasoning parser"):
        reasoning_format("granite", "")
