"""What the routes reach through `request.app.state`: settings and served models."""

from __future__ import annotations

from dataclasses import dataclass

from starlette.requests import Request

from llmserve.config import Settings
from llmserve.models import ModelRegistry


@dataclass
class AppState:
    settings: Settings
    registry: ModelRegistry


def app_state(request: Request) -> AppState:
    return request.app.state.llmserve
