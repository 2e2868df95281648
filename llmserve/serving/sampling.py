"""Request sampling fields -> one SamplingParams per choice, checked against the model."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from llmserve.engines.base import SamplingParams
from llmserve.errors import ContextLengthExceeded, InvalidRequest


@dataclass(frozen=True, slots=True)
class SamplingRequest:
    """The sampling fields shared by chat and text completions, already range-checked."""

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


def build_params(
    req: SamplingRequest, *, prompt_tokens: int, context_length: int, vocab_size: int
) -> list[SamplingParams]:
    max_tokens = resolve_max_tokens(prompt_tokens, req.max_tokens, context_length)
    for token in req.logit_bias:
        if not 0 <= token < vocab_size:
            raise InvalidRequest(
                f"logit_bias token id {token} is outside the vocabulary (0..{vocab_size - 1})",
                param="logit_bias",
            )
    # n choices from one seed must still differ: each gets its own derived seed.
    base_seed = req.seed if req.seed is not None else None
    params = []
    for i in range(req.n):
        seed = (base_seed + i) if base_seed is not None else random.getrandbits(32)
        params.append(
            SamplingParams(
                max_tokens=max_tokens,
                temperature=req.temperature,
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
            )
        )
    return params
