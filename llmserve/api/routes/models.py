"""GET /v1/models, GET /v1/models/{id}"""

from __future__ import annotations

from fastapi import APIRouter, Request

from llmserve.api.state import app_state
from llmserve.models import ServedEmbedder, ServedModel

router = APIRouter()


def _card(m: ServedModel | ServedEmbedder) -> dict:
    return {"id": m.name, "object": "model", "created": m.created, "owned_by": m.owned_by}


@router.get("/v1/models")
async def list_models(request: Request) -> dict:
    return {"object": "list", "data": [_card(m) for m in app_state(request).registry.cards()]}


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, request: Request) -> dict:
    return _card(app_state(request).registry.card(model_id))
