"""GET /health: 200 while every model's engine runs; 503 with the reason while one is down
(crashed or stalled and restarting, or given up on after repeated crashes)."""

from __future__ import annotations

from dataclasses import asdict

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response

from llmserve.api.state import app_state

router = APIRouter()


@router.get("/health")
async def health(request: Request) -> Response:
    engines = app_state(request).registry.health()
    ok = all(h.ok for h in engines.values())
    body = {
        "status": "ok" if ok else "unavailable",
        "models": list(engines),
        "engines": {name: asdict(h) for name, h in engines.items()},
    }
    return Response(orjson.dumps(body), status_code=200 if ok else 503,
                    media_type="application/json")
