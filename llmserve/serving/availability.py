"""Engine trouble as the client sees it: a crashed or restarting engine is a 503 with
Retry-After (try again soon); a failure of one request is a 500."""

from __future__ import annotations

import math

from llmserve.engines.base import EngineDown, EngineError, EngineHealth
from llmserve.errors import EngineFailure, EngineUnavailable, LLMServeError


def engine_failure(exc: EngineError) -> LLMServeError:
    if isinstance(exc, EngineDown):
        return EngineUnavailable(
            str(exc), headers={"Retry-After": str(max(1, math.ceil(exc.retry_after)))}
        )
    return EngineFailure(str(exc))


def ensure_up(name: str, health: EngineHealth) -> None:
    """Refuse now, before any byte of the answer, what a down engine cannot serve."""
    if not health.ok:
        reason = f": {health.reason}" if health.reason else ""
        retry = 1 if health.state in ("restarting", "starting", "stalled") else 30
        raise EngineUnavailable(
            f"The model '{name}' is unavailable (engine {health.state}{reason}). Retry later.",
            headers={"Retry-After": str(retry)},
        )
