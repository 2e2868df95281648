"""Two greedy answers to one prompt, compared as far as the model decides them.

llama.cpp's CPU kernels do not give the same logits bit for bit for every batch shape: flash
attention takes a tiled path for 64 or more query rows of a sequence in one pass and splits a
lone sequence's keys across threads past 256 cells, each rounding differently. So a prompt whose
cached prefix was read in another shape (a longer prompt earlier in that slot, a burst of
others), or a step beside other sequences, may see logits a little off the ones it sees alone
(llama-server says as much of its `cache_prompt`, and vLLM has the same property). Where the
model's two best next tokens are that close, greedy decoding may take either, and two answers
part there. How far: benchmarks/shape_noise.py reads each of the sixteen-stream test's prompts
in one pass and again one token at a time (the shape a prompt's first token gets in a step
beside running streams: llama.cpp gives each sequence of a pass the same number of tokens), and
finds the gap between a step's two best tokens moved by up to 0.81 nats (median 0.37) on the
bundled model; CI saw answers part where the reference's two best were 0.36 apart.

So an answer is the reference's when it is the same text, or the same up to a step where the
token it took instead was, in the reference's own logprobs, within `TIE` nats of the
reference's pick. What the comparisons guard against (another request's grammar mask, a wrong
row of logits, another context) moves a logprob by nats, not tenths.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

TIE = 1.0  # above the 0.81 measured; a wrong context or mask moves logprobs further


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
