"""Two greedy answers to one prompt, compared as far as the model decides them.

llama.cpp's CPU kernels do not give the same logits bit for bit for every batch shape: flash
attention takes a tiled path for 64 or more query rows of a sequence in one pass and splits a
lone sequence's keys across threads past 256 cells, each rounding differently. So a prompt whose
cached prefix was read in another shape (a longer prompt earlier in that slot, a burst of
others), or a step beside other sequences, may see logits a little off the ones it sees alone
(llama-server says as much of its `cache_prompt`, and vLLM has the same property). Where the
model's two best next tokens are that close, greedy decoding may take either, and two answers
part there. Measured here (2-core Xeon): answers parted at steps whose two best tokens were
0.0085, 0.034, 0.11 and 0.12 nats apart when read alone on a fresh engine; in CI, at one 0.16
apart on this machine's figures.

So an answer is the reference's when it is the same text, or the same up to a step where the
token it took instead was, in the reference's own logprobs, within `TIE` nats of the
reference's pick. What the comparisons guard against (another request's grammar mask, a wrong
row of logits, another context) moves a logprob by nats, not tenths.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

TIE = 0.3


def _entries(content: Sequence[Any]) -> list[Mapping[str, Any]]:
    """`logprobs.content` of a chat choice, as the SDK's objects or as parsed JSON."""
    return [e if isinstance(e, Mapping) else e.model_dump() for e in content]


def parting(text: str, reference: Sequence[Any]) -> str | None:
    """Why `text` is not the reference answer (the `logprobs.content` of a greedy choice asked
    with `top_logprobs`), or None when it is, up to a near tie."""
    data, at = text.encode(), 0
    steps = _entries(reference)
    for i, step in enumerate(steps):
        token = bytes(step["bytes"] or b"")
        if token and data.startswith(token, at):
            at += len(token)
            continue
        rest = data[at:]
        near = [alt for alt in step["top_logprobs"]
                if step["logprob"] - alt["logprob"] <= TIE
                and (rest.startswith(bytes(alt["bytes"] or b"")) if rest else not alt["bytes"])]
        if near:
            return None  # a near tie: past it the answers may differ
        if not rest and not token:
            return None  # both end here (the reference's last step: a stop token)
        top = ", ".join(f"{alt['token']!r} {alt['logprob']:.4f}" for alt in step["top_logprobs"])
        return (f"step {i}: the reference took {step['token']!r} ({step['logprob']:.4f}; its "
                f"top: {top}), the answer goes on with {rest[:24]!r}")
    if at != len(data):
        return f"the answer goes on past the reference with {data[at:at + 24]!r}"
    return None


def assert_same_greedy(text: str, reference: Sequence[Any]) -> None:
    """`text` is the reference's greedy answer, up to a near tie (module docstring)."""
    why = parting(text, reference)
    assert why is None, f"{why}\nanswer: {text!r}"
