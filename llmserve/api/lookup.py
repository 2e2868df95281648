"""The one way a route reaches a model: by the request's `model`, through the registry,
held (never unloaded) until the request's answer has been sent in full."""

from __future__ import annotations

from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from llmserve.api.state import app_state
from llmserve.models import ServedEmbedder, ServedModel, ServedReranker
from llmserve.models.registry import Lease, Use
from llmserve.serving.scores import Scorer

_LEASES = "model_leases"


async def use_model(request: Request, name: str,
                    use: Use) -> ServedModel | ServedEmbedder | ServedReranker:
    """The model `name`, loaded (waiting while it loads); 404, 400 or 503 otherwise."""
    lease = await app_state(request).registry.acquire(name, use)
    leases: list[Lease] | None = request.scope.get("state", {}).get(_LEASES)
    if leases is None:  # outside LeaseMiddleware (cannot happen in create_app's app)
        lease.release()
        raise RuntimeError("use_model needs LeaseMiddleware")
    leases.append(lease)
    return lease.served  # type: ignore[return-value]


async def chat_model(request: Request, name: str) -> ServedModel:
    return await use_model(request, name, "chat")  # type: ignore[return-value]


async def embedding_model(request: Request, name: str) -> ServedEmbedder:
    return await use_model(request, name, "embedding")  # type: ignore[return-value]


async def scorer(request: Request, name: str) -> Scorer:
    """What scores pairs for `name`: a reranker, or an embedding model (by cosine)."""
    served = await use_model(request, name, "score")
    return served.scorer  # type: ignore[union-attr]


class LeaseMiddleware:
    """Gives back the models a request took once its response has ended (a stream too:
    the app returns when its last byte is sent or the client is gone). Work that outlives
    the request (background responses, stored streams) holds its scheduler slots, which
    keep the model loaded as well."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        leases: list[Lease] = []
        scope.setdefault("state", {})[_LEASES] = leases
        try:
            await self.app(scope, receive, send)
        finally:
            for lease in leases:
                lease.release()
