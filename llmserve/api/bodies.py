"""Request bodies: JSON read and validated into the route's pydantic model, a 400 for what
is not valid (large bodies parsed off the event loop)."""

from __future__ import annotations

import json
import math
from typing import TypeVar

import anyio.to_thread
import orjson
from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from llmserve.api.errors import validation_error
from llmserve.errors import InvalidRequest

M = TypeVar("M", bound=BaseModel)

# Bodies larger than this are parsed and validated on a worker thread: a multi-megabyte body
# costs its own request, not the event loop's streams.
PARSE_INLINE_BYTES = 256 * 1024


async def parse_body(request: Request, model: type[M]) -> M:
    raw = await request.body()
    if len(raw) > PARSE_INLINE_BYTES:
        return await anyio.to_thread.run_sync(_parse, raw, model)
    return _parse(raw, model)


def _parse(raw: bytes, model: type[M]) -> M:
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        _refuse_non_finite(raw, model)
        raise InvalidRequest(f"The request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc.errors(include_url=False)) from None


def _refuse_non_finite(raw: bytes, model: type[BaseModel]) -> None:
    """orjson refuses NaN, Infinity, -Infinity and numbers too large for a double, which are
    not JSON but which Python's json module writes (and reads). For a body that is JSON but
    for such numbers, raise a 400 naming the field that holds one rather than "not valid JSON":
    the model's own validation says what is wrong where; a number in a field it does not check
    is named by its path. Such a body is never served. Returns for any other invalid body."""
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):  # not JSON even for Python (or nested too deeply)
        return
    path = _first_non_finite(data)
    if path is None:  # refused for another reason (a lone surrogate, ...): orjson's error
        return
    if isinstance(data, dict):
        try:
            model.model_validate(data)
        except ValidationError as exc:
            raise validation_error(exc.errors(include_url=False)) from None
    param = ".".join(path) or None
    raise InvalidRequest(
        f"Invalid value for '{param}': NaN and infinite numbers are not valid JSON."
        if param else "NaN and infinite numbers are not valid JSON.",
        param=param,
    )


def _first_non_finite(data: object) -> list[str] | None:
    """The path (keys and list indices) of the first NaN or infinite float in `data`."""
    todo: list[tuple[object, list[str]]] = [(data, [])]
    while todo:
        value, path = todo.pop()
        if isinstance(value, float) and not math.isfinite(value):
            return path
        if isinstance(value, dict):
            todo.extend((v, [*path, str(k)]) for k, v in reversed(value.items()))
        elif isinstance(value, list):
            todo.extend((v, [*path, str(i)]) for i, v in reversed(list(enumerate(value))))
    return None
