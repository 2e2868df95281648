"""What the routes reach through `request.app.state`: settings, served models and their
metrics, the store and the runs that outlive their request."""

from __future__ import annotations

from dataclasses import dataclass, field

from starlette.requests import Request

from llmserve.api.drain import Inflight
from llmserve.config import Settings
from llmserve.models.registry import ModelRegistry
from llmserve.serving.metrics import Metrics
from llmserve.serving.runs import Runs
from llmserve.store import Store


@dataclass
class AppState:
    settings: Settings
    registry: ModelRegistry
    metrics: Metrics
    inflight: Inflight = field(default_factory=Inflight)
    store: Store | None = None  # None: --store none
    runs: Runs = field(default_factory=Runs)  # background responses, resumable streams


def app_state(request: Request) -> AppState:
    return request.app.state.llmserve
