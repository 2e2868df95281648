"""IncrementalDetokenizer and token_text: bytes -> text, never part of a character."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from llmserve.serving.detokenizer import IncrementalDetokenizer, token_text

REPLACEMENT = "\ufffd"

# Mostly multi-byte characters: CJK (3 bytes), emoji (4 bytes), accented Latin (2 bytes),
# plus everything else UTF-8 can encode. U+FFFD itself is left out so that its appearance
# in the output always means a decoding error.
_chars = st.one_of(
    st.characters(min_codepoint=0x4E00, max_codepoint=0x9FFF),  # CJK
    st.characters(min_codepoint=0x1F300, max_codepoint=0x1FAFF),  # emoji
    st.characters(min_codepoint=0x00C0, max_codepoint=0x024F),  # Latin with accents
    st.characters(codec="utf-8", exclude_characters=REPLACEMENT),
)
_texts = st.text(alphabet=_chars, max_size=40)


@st.composite
def text_and_cuts(draw):
    text = draw(_texts)
    data = text.encode("utf-8")
    cuts = sorted(draw(st.sets(st.integers(0, len(data)), max_size=len(data) + 1)))
    bounds = [0, *cuts, len(data)]
    pieces = [data[a:b] for a, b in zip(bounds, bounds[1:])]
    return text, pieces


@settings(max_examples=300, deadline=None)
@given(text_and_cuts())
def test_pieces_are_whole_characters_and_join_to_the_text(case):
    text, pieces = case
    detok = IncrementalDetokenizer()
    out = []
    for piece in pieces:
        s = detok.feed(piece)
        assert isinstance(s, str)
        assert REPLACEMENT not in s
        s.encode("utf-8")  # no lone surrogates: only whole characters
        out.append(s)
    tail = detok.flush()
    assert REPLACEMENT not in tail
    out.append(tail)
    assert "".join(out) == text
    # Everything was whole by the end: nothing is left for flush.
    assert tail == ""


@settings(max_examples=200, deadline=None)
@given(text_and_cuts())
def test_each_piece_is_exactly_the_characters_completed_so_far(case):
    text, pieces = case
    detok = IncrementalDetokenizer()
    fed = b""
    sent = ""
    for piece in pieces:
        fed += piece
        sent += detok.feed(piece)
        # The sent text is the longest whole-character prefix of the bytes fed so far.
        expected = fed.decode("utf-8", errors="ignore")
        complete = fed[: len(expected.encode("utf-8"))]
        assert complete.decode("utf-8") == sent
        # At most one partial character (<= 3 bytes) is held back.
        assert len(fed) - len(sent.encode("utf-8")) <= 3


def test_character_split_across_three_tokens():
    data = "中".encode("utf-8")  # e4 b8 ad
    detok = IncrementalDetokenizer()
    assert detok.feed(data[:1]) == ""
    assert detok.feed(data[1:2]) == ""
    assert detok.feed(data[2:]) == "中"
    assert detok.flush() == ""


def test_emoji_split_byte_by_byte_then_ascii():
    data = "😀".encode("utf-8")
    detok = IncrementalDetokenizer()
    assert [detok.feed(data[i : i + 1]) for i in range(4)] == ["", "", "", "😀"]
    assert detok.feed(b"ok") == "ok"


def test_piece_completing_one_character_and_starting_another():
    data = "中文".encode("utf-8")  # 6 bytes
    detok = IncrementalDetokenizer()
    assert detok.feed(data[:2]) == ""
    assert detok.feed(data[2:4]) == "中"
    assert detok.feed(data[4:]) == "文"


def test_empty_feed_returns_empty_string():
    detok = IncrementalDetokenizer()
    assert detok.feed(b"") == ""
    assert detok.flush() == ""


def test_invalid_bytes_become_replacement_character_not_an_error():
    detok = IncrementalDetokenizer()
    assert detok.feed(b"a\xffb") == f"a{REPLACEMENT}b"
    # A continuation byte with no lead byte is invalid too.
    assert detok.feed(b"\x80") == REPLACEMENT
    # Decoding goes on normally afterwards.
    assert detok.feed("中".encode("utf-8")) == "中"


def test_lead_byte_followed_by_ascii_is_replaced_and_ascii_kept():
    detok = IncrementalDetokenizer()
    assert detok.feed(b"\xe4") == ""  # could still be a character
    out = detok.feed(b"x")
    assert out == f"{REPLACEMENT}x"


def test_dangling_partial_character_comes_out_of_flush():
    detok = IncrementalDetokenizer()
    assert detok.feed(b"ab" + "中".encode("utf-8")[:2]) == "ab"
    assert detok.flush() == REPLACEMENT
    # After flush the decoder is reset: nothing more held.
    assert detok.flush() == ""


def test_token_text_whole_utf8_is_the_string():
    assert token_text(b"hello") == "hello"
    assert token_text(" 中文".encode("utf-8")) == " 中文"
    assert token_text("😀".encode("utf-8")) == "😀"
    assert token_text(b"") == ""


def test_token_text_partial_utf8_is_escaped_bytes():
    assert token_text(b"\xe4\xbd") == "\\xe4\\xbd"
    assert token_text(b"\xff") == "\\xff"
    # Once any byte is invalid, all bytes of the token are escaped, ASCII included.
    assert token_text(b"a\xe4") == "\\x61\\xe4"


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=12))
def test_token_text_never_raises_and_roundtrips(data):
    s = token_text(data)
    try:
        expected = data.decode("utf-8")
    except UnicodeDecodeError:
        assert bytes(int(h, 16) for h in s.split("\\x")[1:]) == data
        assert s == "".join(f"\\x{b:02x}" for b in data)
    else:
        assert s == expected
