"""GET /health: 200 while every loaded model's engine runs; 503 with the reason while one is
down (crashed or stalled and restarting, or given up on after repeated crashes). Models not
loaded (or whose load failed: their own requests say why) leave it at 200; `states` says
where each model stands."""

from __future__ import annotations

from dataclasses import asdict

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response

from llmserve.api.state import app_state

router = APIRouter()


@router.get("/health")
async def health(request: Request) -> Response:
    registry = app_state(request).registry
    engines = registry.health()
    ok = all(h.ok for h in engines.values())
    status = registry.status()
    body = {
        "status": "ok" if ok else "unavailable",
        "models": [s.id for s in status],
        "states": {s.id: s.state for s in status},
        "engines": {name: asdict(h) for name, h in engines.items()},
    }
    return Response(orjson.dumps(body), status_code=200 if ok else 503,
                    media_type="application/json")
