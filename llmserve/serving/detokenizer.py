"""Token bytes -> text, never emitting part of a UTF-8 character.

Byte-level tokenizers can split one character (CJK, emoji) across tokens. An incremental
UTF-8 decoder holds an unfinished character until its last byte arrives, so every piece of
text handed on is whole, and the pieces join to exactly the decoded whole.
"""

from __future__ import annotations

import codecs


class IncrementalDetokenizer:
    """Feeds token bytes, returns the text they complete."""

    __slots__ = ("_decoder",)

    def __init__(self) -> None:
        # "replace": bytes that can never be valid UTF-8 become U+FFFD instead of raising;
        # an incomplete character is held back, not replaced.
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")

    def feed(self, data: bytes) -> str:
        return self._decoder.decode(data)

    def flush(self) -> str:
        """Text still held at the end of generation (a dangling partial character)."""
        return self._decoder.decode(b"", final=True)


def token_text(data: bytes) -> str:
    """A token's text for logprobs: its string where the bytes are whole UTF-8, else
    the bytes escaped as OpenAI shows them (`\\xe4\\xbd`). Clients read `bytes` for exactness."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return "".join(f"\\x{b:02x}" for b in data)
