"""GET / and /playground: the chat page (llmserve/web), and its script and style sheet.

Served without the API key (the page holds no secret; every call it makes to /v1 needs the
key like any client's). The Content-Security-Policy lets the page load only this server's own
script and style sheet and talk only to this server: no inline script runs, whatever text
ends up in the page."""

from __future__ import annotations

from functools import cache
from importlib.resources import files

from fastapi import APIRouter
from fastapi.responses import Response

from llmserve.errors import NotFound

router = APIRouter(include_in_schema=False)

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # revalidated, so an upgraded server's page is the one used
}
# The files the page is made of, by the name it asks for them, with their media types.
ASSETS = {
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}


@cache
def _read(name: str) -> bytes:
    return files("llmserve.web").joinpath(name).read_bytes()


def _file(name: str, media_type: str) -> Response:
    return Response(_read(name), media_type=media_type, headers=HEADERS)


@router.api_route("/", methods=["GET", "HEAD"])
@router.api_route("/playground", methods=["GET", "HEAD"])
async def page() -> Response:
    return _file("index.html", "text/html; charset=utf-8")


@router.api_route("/playground/{name}", methods=["GET", "HEAD"])
async def asset(name: str) -> Response:
    media_type = ASSETS.get(name)
    if media_type is None:
        raise NotFound(f"No playground file named '{name}'.")
    return _file(name, media_type)
