"""GET /health: 200 once the models are loaded (the app only serves after loading)."""

from __future__ import annotations

from fastapi import APIRouter, Request

from llmserve.api.state import app_state

router = APIRouter()


@router.get("/health")
async def health(request: Request) -> dict:
    return {"status": "ok", "models": [m.name for m in app_state(request).registry.cards()]}
