"""Every error leaves the server in OpenAI's envelope; this is the one place that maps them."""

from __future__ import annotations

import logging
import re

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from llmserve.errors import (
    ClientGone,
    InvalidRequest,
    LLMServeError,
    MethodNotAllowed,
    RouteNotFound,
)

log = logging.getLogger(__name__)


def error_body(exc: LLMServeError) -> dict:
    return {
        "error": {
            "message": exc.message,
            "type": exc.type,
            "param": exc.param,
            "code": exc.code,
        }
    }


def error_response(exc: LLMServeError) -> Response:
    return Response(
        orjson.dumps(error_body(exc)),
        status_code=exc.status_code,
        media_type="application/json",
        headers=exc.headers,
    )


_TYPE_TAG = re.compile(r"^(?:str|int|float|bool|none|function-.*|.*\[.*\])$")


def validation_error(errors: list) -> InvalidRequest:
    """pydantic's first complaint, as OpenAI would word it: what is wrong and where."""
    if not errors:
        return InvalidRequest("Invalid request.")
    first = errors[0]
    # Union members show up in the location as type tags ("str", "list[str]"): drop them.
    loc = [str(p) for p in first.get("loc", ()) if p != "body" and not _TYPE_TAG.match(str(p))]
    param = ".".join(loc) or None
    if first.get("type") == "json_invalid":
        return InvalidRequest(f"The request body is not valid JSON: {first.get('msg')}")
    msg = first.get("msg", "invalid value")
    return InvalidRequest(f"Invalid value for '{param}': {msg}" if param else msg, param=param)


def install(app: FastAPI) -> None:
    @app.exception_handler(LLMServeError)
    async def _served(request: Request, exc: LLMServeError) -> Response:
        if exc.status_code >= 500:
            log.error("request %s failed: %s", _request_id(request), exc.message)
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        return error_response(validation_error(list(exc.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 404:
            err: LLMServeError = RouteNotFound(f"No route {request.method} {request.url.path}.")
        elif exc.status_code == 405:
            err = MethodNotAllowed(
                f"Method {request.method} not allowed on {request.url.path}.",
                headers={**(exc.headers or {}),
                         "Allow": _allowed(request, (exc.headers or {}).get("Allow", ""))},
            )
        else:
            err = LLMServeError(str(exc.detail))
            err.status_code = exc.status_code
        return error_response(err)

    @app.exception_handler(ClientGone)
    async def _gone(request: Request, exc: ClientGone) -> Response:
        log.info("request %s: client disconnected, generation cancelled", _request_id(request))
        return Response(status_code=499)  # nginx's "client closed request"; nobody reads it

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> Response:
        rid = _request_id(request)
        log.error("request %s: unhandled error", rid, exc_info=exc)
        return error_response(
            LLMServeError(f"Internal server error (request id {rid}).", code="internal_error")
        )


def _allowed(request: Request, starlettes: str) -> str:
    """Every method some route serves on this path. Starlette's own Allow (`starlettes`)
    names only the first matching route's, and a path may have routes in several routers."""
    methods: set[str] = set()
    for route in _routes(request.app.routes):
        match, _ = route.matches(request.scope)
        if match is Match.PARTIAL:
            methods |= getattr(route, "methods", None) or set()
    return ", ".join(sorted(methods)) if methods else starlettes


def _routes(routes):
    for route in routes:
        inner = getattr(route, "original_router", None)  # FastAPI's included router
        if inner is not None:
            yield from _routes(inner.routes)
        else:
            yield route


def _request_id(request: Request) -> str:
    return getattr(request.state, "request_id", "-")
