"""GET /metrics: Prometheus text exposition of this app's metrics (see serving/metrics.py)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from llmserve.api.state import app_state

router = APIRouter()


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(app_state(request).metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
