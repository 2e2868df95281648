"""GET /v1/models, /v1/models/status, /v1/models/{id}: every model the server can serve,
loaded or not (each name, aliases too, as OpenAI's model object), and where each stands."""

from __future__ import annotations

from dataclasses import asdict

from fastapi import APIRouter, Request

from llmserve.api.state import app_state
from llmserve.models.registry import ModelRegistry

router = APIRouter()


def _card(registry: ModelRegistry, name: str) -> dict:
    entry = registry.entry(name)  # 404 for an unknown name
    card = {"id": name, "object": "model", "created": registry.created, "owned_by": "llmserve"}
    if entry.is_adapter:  # vLLM's fields for a LoRA adapter
        card |= {"parent": entry.base, "root": str(entry.path)}
    return card


@router.get("/v1/models")
async def list_models(request: Request) -> dict:
    registry = app_state(request).registry
    return {"object": "list", "data": [_card(registry, n) for n in registry.names()]}


# Before /v1/models/{id}, which would take "status" for a model's name.
@router.get("/v1/models/status")
async def models_status(request: Request) -> dict:
    return {"object": "list",
            "data": [asdict(s) for s in app_state(request).registry.status()]}


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, request: Request) -> dict:
    return _card(app_state(request).registry, model_id)
