"""Refuse what must not be served, before any route acts on it: a Host a loopback server does
not answer to (421, DNS rebinding), a body over --max-request-bytes (413, before it is read in
full), a POST under /v1 not sent as JSON (415: a browser cannot send JSON cross-origin without a
CORS preflight, so a page cannot post to the API, not even a bodiless cancel)."""

from __future__ import annotations

import ipaddress

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llmserve.api.errors import error_response
from llmserve.config import Settings
from llmserve.errors import (
    LLMServeError,
    MisdirectedRequest,
    RequestTooLarge,
    UnsupportedMediaType,
)


def host_name(value: str) -> str:
    """A Host header's (or --allowed-hosts entry's) name without the port, lowercased."""
    value = value.strip().lower()
    if value.startswith("["):  # [::1]:8000
        end = value.find("]")
        return value[: end + 1] if end > 0 else value
    return value.partition(":")[0]


def is_loopback(host: str) -> bool:
    """localhost, 127.x or ::1 (bracketed or not)."""
    host = host.strip().lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.removeprefix("[").removesuffix("]")).is_loopback
    except ValueError:
        return False


class Guards:
    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.limit = settings.max_request_bytes
        self.allowed = {host_name(h) for h in settings.allowed_hosts}
        # Only a server bound to loopback is a DNS rebinding target: elsewhere the Host
        # names whatever the network calls it.
        self.check_host = is_loopback(settings.host) and "*" not in self.allowed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers: dict[bytes, bytes] = {}
        for name, value in scope["headers"]:
            headers.setdefault(name, value)
        refusal = self._host_refusal(headers) or self._length_refusal(headers)
        if refusal is not None:
            return await error_response(refusal)(scope, receive, send)
        await self.app(scope, self._guarded(receive), send)

    def _host_refusal(self, headers: dict[bytes, bytes]) -> LLMServeError | None:
        # A missing Host cannot come from a browser, so it is no rebinding attempt.
        host = host_name(headers.get(b"host", b"").decode("latin-1"))
        if self.check_host and host and not is_loopback(host) and host not in self.allowed:
            return MisdirectedRequest(
                f"This server does not answer to the host {host!r}; "
                "list it in --allowed-hosts to allow it."
            )
        return None

    def _length_refusal(self, headers: dict[bytes, bytes]) -> LLMServeError | None:
        length = headers.get(b"content-length", b"")
        return self._too_large() if length.isdigit() and int(length) > self.limit else None

    def _guarded(self, receive: Receive) -> Receive:
        """`receive` that raises a 413 once the body (chunked or not) passes the limit; the
        app's error handler answers, and nothing reads further."""
        seen = 0

        async def guarded() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise self._too_large()
            return message

        return guarded

    def _too_large(self) -> RequestTooLarge:
        return RequestTooLarge(
            f"The request body is larger than the {self.limit} bytes this server accepts "
            "(--max-request-bytes).",
            headers={"Connection": "close"},  # the server stops reading the rest
        )


async def require_json(request: Request) -> None:
    """A dependency of every /v1 route: a POST must be sent as JSON, whether the route reads a
    body or not (a cancel has none). As a dependency it runs once a route matched, so an
    unknown path stays a 404 and a wrong method a 405."""
    if request.method != "POST":
        return
    media = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media != "application/json":
        raise UnsupportedMediaType(
            "The request body must be JSON, sent with 'Content-Type: application/json'."
        )
