"""A thinking model's output split into its reasoning and its answer, as it streams.

Models of the DeepSeek-R1 and Qwen3 families write their reasoning between `<think>` and
`</think>`, then the answer. Some templates open the tag in the prompt themselves (R1's write
`<think>\\n` after the generation prompt), so the output starts inside the reasoning and
only closes it; others let the model open it, or, asked not to think (Qwen3's
`enable_thinking: false`), write an empty `<think></think>` into the prompt.

So where an output starts is read from the prompt (`opened_in`): inside the reasoning when
the prompt's last start tag is not closed. Either way a start tag at the very beginning of
the output (after blanks) is dropped, and the end tag, never part of either text, switches
to the answer, whose leading blanks are dropped. A tag split across tokens is held back
until it is whole; an output cut off inside the reasoning keeps it all as reasoning.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Literal, get_args

ReasoningParserName = Literal["auto", "deepseek_r1", "qwen3", "none"]
REASONING_PARSERS: tuple[str, ...] = get_args(ReasoningParserName)


class _Mode(Enum):
    START = "start"  # the output's first characters: a start tag may come
    REASONING = "reasoning"
    ANSWER_START = "answer_start"  # just after the end tag: blanks are dropped
    ANSWER = "answer"


@dataclass(frozen=True, slots=True)
class ReasoningFormat:
    """How one model marks its reasoning, and whether its output starts inside it."""

    start: str = "<think>"
    end: str = "</think>"
    # deepseek_r1: always starts inside (R1 distills may omit the opening tag).
    always_opened: bool = False

    def opened_in(self, prompt: str) -> bool:
        """Whether an output that follows `prompt` starts inside the reasoning."""
        if self.always_opened:
            return True
        at = prompt.rfind(self.start)
        return at >= 0 and self.end not in prompt[at:]

    def closed_in(self, prompt: str) -> bool:
        """Whether `prompt` ends with the reasoning already closed (Qwen3's template, asked
        not to think, writes an empty one): the output is all answer."""
        return prompt.rstrip().endswith(self.end)


def reasoning_format(name: str, template_source: str) -> ReasoningFormat | None:
    """The format `--reasoning-parser name` gives a model with this chat template; None for
    no reasoning. `auto`: thinking tags when the template writes `<think>`."""
    if name == "none":
        return None
    if name == "deepseek_r1":
        return ReasoningFormat(always_opened=True)
    if name == "qwen3":
        return ReasoningFormat()
    if name == "auto":
        return ReasoningFormat() if "<think>" in template_source else None
    raise ValueError(f"unknown reasoning parser {name!r}: one of {', '.join(REASONING_PARSERS)}")


class ReasoningParser:
    """Splits one choice's text: `feed` each increment, `flush` at the end."""

    def __init__(self, fmt: ReasoningFormat, *, opened: bool) -> None:
        self._fmt = fmt
        self._opened = opened
        self._mode = _Mode.START
        self._held = ""  # text not yet placed: a possible tag, or the output's first blanks

    @property
    def reasoning(self) -> bool:
        """Whether text fed now is reasoning (while the output's start is undecided: whether
        the prompt opened it)."""
        if self._mode is _Mode.START:
            return self._opened
        return self._mode is _Mode.REASONING

    def feed(self, text: str) -> tuple[str, str]:
        """(reasoning, answer) text that is now certain."""
        text = self._held + text
        self._held = ""
        reasoning = answer = ""
        while text:
            mode = self._mode
            if mode is _Mode.START:
                body = text.lstrip()
                if body.startswith(self._fmt.start):
                    self._mode, text = _Mode.REASONING, body[len(self._fmt.start):]
                elif self._fmt.start.startswith(body):  # blanks, or part of the tag
                    self._held = text
                    break
                else:
                    self._mode = _Mode.REASONING if self._opened else _Mode.ANSWER
            elif mode is _Mode.REASONING:
                at = text.find(self._fmt.end)
                if at >= 0:
                    reasoning += text[:at]
                    self._mode, text = _Mode.ANSWER_START, text[at + len(self._fmt.end):]
                    continue
                keep = _partial_suffix(text, self._fmt.end)
                reasoning += text[: len(text) - keep]
                self._held = text[len(text) - keep:]
                break
            elif mode is _Mode.ANSWER_START:
                text = text.lstrip()
                if text:
                    self._mode = _Mode.ANSWER
            else:
                answer += text
                break
        return reasoning, answer

    def flush(self) -> tuple[str, str]:
        """What is held at the end: in the reasoning it stays reasoning (a cut-off tag too);
        a start that never became a tag is text of wherever the output started."""
        held, self._held = self._held, ""
        if self._mode is _Mode.START:
            return (held, "") if self._opened else ("", held)
        if self._mode is _Mode.REASONING:
            return held, ""
        return "", ""


def _partial_suffix(text: str, tag: str) -> int:
    """The length of the longest end of `text` that starts `tag` (held until it is known)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0
