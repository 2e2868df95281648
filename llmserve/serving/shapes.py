"""OpenAI objects that chat and text completions share."""

from __future__ import annotations

from llmserve.serving.generation import Usage


def usage_body(usage: Usage) -> dict:
    body: dict = {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }
    if usage.reasoning_tokens is not None:
        body["completion_tokens_details"] = {"reasoning_tokens": usage.reasoning_tokens}
    return body


def logprob_value(value: float) -> float:
    # JSON has no -inf; OpenAI reports impossible tokens as -9999.0.
    return max(value, -9999.0)
