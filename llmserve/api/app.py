"""create_app(settings, registry) -> the ASGI app. No module-level state: everything the
routes need hangs off `app.state.llmserve`."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import re
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from starlette.middleware.cors import CORSMiddleware

from llmserve import __version__
from llmserve.api import errors
from llmserve.api.guards import Guards, require_json
from llmserve.api.lookup import LeaseMiddleware
from llmserve.api.routes import (
    chat,
    completions,
    docs,
    embeddings,
    health,
    lora,
    metrics,
    models,
    playground,
    responses,
    scores,
    stored_chat,
    tokenize,
)
from llmserve.api.state import AppState, app_state
from llmserve.config import Settings
from llmserve.engines.base import Engine
from llmserve.errors import AuthenticationFailed
from llmserve.models import ServedModel
from llmserve.models.registry import ModelRegistry
from llmserve.serving.metrics import Metrics
from llmserve.serving.scheduler import Scheduler
from llmserve.store import Store, store_path


def create_app(settings: Settings, registry: ModelRegistry) -> FastAPI:
    path = store_path(settings)
    store = Store(path, ttl=settings.store_ttl) if path is not None else None

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if store is not None:
            await store.open()
            purger = asyncio.create_task(store.run_purger())
        await registry.start()
        try:
            yield
        finally:
            # Background responses end (and are saved as failed) before the store closes.
            await state.runs.stop()
            await registry.stop()
            if store is not None:
                purger.cancel()
                await asyncio.gather(purger, return_exceptions=True)
                await store.close()

    # The docs routes come from routes/docs.py, behind the API key.
    app = FastAPI(title="llmserve", version=__version__, lifespan=lifespan,
                  openapi_url=None, docs_url=None, redoc_url=None)
    # A Prometheus registry of this app's own (never the process-wide default one).
    # Read at each scrape: the loaded models come and go.
    app_metrics = Metrics(lambda: _schedulers(registry), engines=lambda: _engines(registry),
                          models=registry)
    state = AppState(settings=settings, registry=registry, metrics=app_metrics, store=store)
    app.state.llmserve = state
    errors.install(app)
    # The last added runs first: request id, then CORS (so refusals carry its headers too),
    # then the guards.
    app.add_middleware(Guards, settings=settings)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "DELETE", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type", "X-Request-ID"],
            expose_headers=["X-Request-ID"],
        )
    app.add_middleware(LeaseMiddleware)
    app.add_middleware(_RequestIdMiddleware)

    app.include_router(health.router)
    app.include_router(metrics.router)  # no key, like /health: scrapers send none
    v1 = [Depends(_require_api_key), Depends(require_json)]
    app.include_router(models.router, dependencies=v1)
    app.include_router(lora.router, dependencies=v1)
    app.include_router(chat.router, dependencies=v1)
    app.include_router(stored_chat.router, dependencies=v1)
    app.include_router(completions.router, dependencies=v1)
    app.include_router(responses.router, dependencies=v1)
    app.include_router(embeddings.router, dependencies=v1)
    app.include_router(tokenize.router, dependencies=v1)  # at the root, as vLLM: same key rule
    app.include_router(scores.router, dependencies=v1)
    app.include_router(docs.router, dependencies=v1)
    if settings.playground:  # no key: the page holds no secret, and its calls need the key
        app.include_router(playground.router)
    return app


def _schedulers(registry: ModelRegistry) -> dict[str, Scheduler]:
    return {n: m.scheduler for n, m in registry.loaded().items() if isinstance(m, ServedModel)}


def _engines(registry: ModelRegistry) -> dict[str, Engine]:
    return {n: m.engine for n, m in registry.loaded().items() if isinstance(m, ServedModel)}


def key_hash(key: str) -> str:
    """Who a request is, to the store: a hash of its API key (the key itself is never kept)."""
    return hashlib.sha256(key.encode()).hexdigest()


async def _require_api_key(request: Request) -> None:
    """Refuse a request without a valid key; note the hash of the key it came with for the
    routes (`request_key_hash`): stored items are each key's own. Without keys, one owner."""
    keys = app_state(request).settings.api_keys
    if not keys:
        request.state.key_hash = ""
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not given:
        raise AuthenticationFailed(
            "Missing API key: send 'Authorization: Bearer <key>'.", code="missing_api_key"
        )
    # Compare with every key, never stopping early: timing tells nothing about which matched.
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(given.encode(), key.encode())
    if not matched:
        raise AuthenticationFailed("Incorrect API key provided.")
    request.state.key_hash = key_hash(given)


_SAFE_ID = re.compile(rb"[\x21-\x7e]{1,128}")


class _RequestIdMiddleware:
    """Tags each request with an id (the client's X-Request-ID or a new one), echoed back."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = next((v for k, v in scope["headers"] if k == b"x-request-id"), b"")
        # Echo only a sane id (printable ASCII, short); anything else gets a fresh one.
        rid = given.decode() if _SAFE_ID.fullmatch(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid

        async def send_with_id(message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", rid.encode())]
            await send(message)

        await self.app(scope, receive, send_with_id)


