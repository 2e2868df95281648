"""Request sampling fields -> one SamplingParams per choice, checked against the model."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

from llmserve.engines.base import SamplingParams
from llmserve.errors import ContextLengthExceeded, InvalidRequest

# A temperature below this means greedy decoding, as in vLLM: logits divided by a smaller one
# overflow float32 to inf, and a softmax over inf is NaN.
GREEDY_BELOW = 1e-5

# The inclusive range of every float a client controls (for logit_bias: of each value).
# protocol.py's request fields carry the same bounds; build_params checks them again, so no
# engine sees a NaN, an infinity or a value out of range, whichever route built the request.
FLOAT_RANGES: dict[str, tuple[float, float]] = {
    "temperature": (0.0, 2.0),
    "top_p": (0.0, 1.0),
    "min_p": (0.0, 1.0),
    "presence_penalty": (-2.0, 2.0),
    "frequency_penalty": (-2.0, 2.0),
    # Divides the positive logits of seen tokens (and multiplies the negative ones). vLLM and
    # HF only ask for > 0, but 1e-300 divides logits into inf (then NaN) in float32. From 0.01
    # a logit grows at most 100x, and with a temperature of at least 1e-5 at most 1e7x in all:
    # far below float32's 3.4e38. (At 0.01 seen tokens already all but always win.)
    "repetition_penalty": (0.01, 10.0),
    "logit_bias": (-100.0, 100.0),
}


@dataclass(frozen=True, slots=True)
class SamplingRequest:
    """The sampling fields shared by chat and text completions, as the client sent them
    (defaults filled in); build_params checks their ranges and applies the greedy rules."""

    n: int = 1
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    logprobs: int | None = None
    ignore_eos: bool = False
    grammar: str | None = None  # llguidance's, from serving.constraints


def resolve_max_tokens(prompt_tokens: int, requested: int | None, context_length: int) -> int:
    """Tokens a choice may generate: as requested, or the rest of the context."""
    room = context_length - prompt_tokens
    if requested is None:
        if room < 1:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {context_length} tokens. However, your "
                f"prompt has {prompt_tokens} tokens, which leaves no room for a completion.",
                param="messages",
            )
        return room
    if requested > room:
        raise ContextLengthExceeded(
            f"This model's maximum context length is {context_length} tokens. However, you "
            f"requested {prompt_tokens + requested} tokens ({prompt_tokens} in the prompt, "
            f"{requested} for the completion). Please reduce the prompt or max_tokens.",
            param="max_tokens",
        )
    return requested


def check_floats(req: SamplingRequest) -> None:
    """Every float field finite and within FLOAT_RANGES, else a 400 naming the field."""
    for name, (low, high) in FLOAT_RANGES.items():
        if name == "logit_bias":
            values = [(f"logit_bias.{t}", v) for t, v in req.logit_bias.items()]
        else:
            values = [(name, getattr(req, name))]
        for param, value in values:
            if not (math.isfinite(value) and low <= value <= high):
                raise InvalidRequest(
                    f"Invalid value for '{param}': {value!r}; it must be a number from {low:g} "
                    f"to {high:g}.",
                    param=param,
                )


def effective_temperature(req: SamplingRequest) -> float:
    """The temperature engines get: 0 (greedy) below GREEDY_BELOW, and when top_p is 0 (which
    keeps only the top token); else as requested."""
    if req.temperature < GREEDY_BELOW or req.top_p == 0.0:
        return 0.0
    return req.temperature


def build_params(
    req: SamplingRequest, *, prompt_tokens: int, context_length: int, vocab_size: int
) -> list[SamplingParams]:
    check_floats(req)
    max_tokens = resolve_max_tokens(prompt_tokens, req.max_tokens, context_length)
    for token in req.logit_bias:
        if not 0 <= token < vocab_size:
            raise InvalidRequest(
                f"logit_bias token id {token} is outside the vocabulary (0..{vocab_size - 1})",
                param="logit_bias",
            )
    # n choices from one seed must still differ: each gets its own derived seed.
    base_seed = req.seed if req.seed is not None else None
    temperature = effective_temperature(req)
    params = []
    for i in range(req.n):
        seed = (base_seed + i) if base_seed is not None else random.getrandbits(32)
        params.append(
            SamplingParams(
                max_tokens=max_tokens,
                temperature=temperature,
                top_p=req.top_p,
                top_k=req.top_k,
                min_p=req.min_p,
                seed=seed,
                presence_penalty=req.presence_penalty,
                frequency_penalty=req.frequency_penalty,
                repetition_penalty=req.repetition_penalty,
                logit_bias=req.logit_bias,
                logprobs=req.logprobs,
                ignore_eos=req.ignore_eos,
                grammar=req.grammar,
            )
        )
    return params
