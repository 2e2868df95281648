"""Stored chat completions (`store: true`), as at OpenAI: list, retrieve, update metadata,
delete, and list a completion's messages. Beyond OpenAI: a stored stream can be followed
again with `?stream=true` from the event after `Last-Event-ID`, live while it runs, then
from the store."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from typing import Any, Literal

import orjson
from fastapi import APIRouter, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict

from llmserve.api.protocol import Metadata
from llmserve.api.requests import event_stream, follow_run, parse_body
from llmserve.api.state import AppState, app_state
from llmserve.errors import InvalidRequest, NotFound
from llmserve.store import Store, StoredChat

router = APIRouter()


def _json(body: Any) -> Response:
    return Response(orjson.dumps(body), media_type="application/json")


def _store(state: AppState) -> Store:
    if state.store is None:
        raise NotFound("This server keeps no chat completions (--store none).")
    return state.store


async def _found(state: AppState, id: str) -> StoredChat:
    found = await _store(state).get_chat(id)
    if found is None:
        raise NotFound(f"No chat completion found with id '{id}'.")
    return found


def _page(data: list[dict], has_more: bool) -> dict:
    return {"object": "list", "data": data, "has_more": has_more,
            "first_id": data[0]["id"] if data else "", "last_id": data[-1]["id"] if data else ""}


_METADATA_KEY = re.compile(r"metadata\[(.+)\]")


@router.get("/v1/chat/completions")
async def list_chat_completions(
    request: Request, model: str | None = None, after: str | None = None,
    limit: int = Query(20, ge=1, le=100), order: Literal["asc", "desc"] = "asc",
) -> Response:
    # metadata[key]=value, as the OpenAI client sends a metadata filter
    metadata = {m.group(1): v for k, v in request.query_params.items()
                if (m := _METADATA_KEY.fullmatch(k))}
    chats, has_more = await _store(app_state(request)).list_chats(
        model=model, metadata=metadata or None, after=after, limit=limit, order=order)
    return _json(_page([c.completion for c in chats], has_more))


@router.get("/v1/chat/completions/{completion_id}")
async def retrieve_chat_completion(
    request: Request, completion_id: str, stream: bool = False,
) -> Response:
    state = app_state(request)
    if not stream:
        return _json((await _found(state, completion_id)).completion)
    raw = request.headers.get("last-event-id", "-1").strip() or "-1"
    try:
        after = int(raw)
    except ValueError:
        raise InvalidRequest("Last-Event-ID must be the id of an event of this stream.",
                             param="Last-Event-ID") from None
    run = state.runs.get(completion_id)
    if run is not None:
        return follow_run(request, run, after)
    await _found(state, completion_id)
    events = await _store(state).events(completion_id, after)
    if not events and after < 0:
        raise InvalidRequest("Only completions that were streamed can be streamed again.",
                             param="stream")

    async def replay() -> AsyncIterator[bytes]:
        for _, data in events:
            yield data

    return event_stream(request, replay(), [])


class _MetadataUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    metadata: Metadata | None


@router.post("/v1/chat/completions/{completion_id}")
async def update_chat_completion(request: Request, completion_id: str) -> Response:
    body = await parse_body(request, _MetadataUpdate)
    updated = await _store(app_state(request)).update_chat_metadata(
        completion_id, body.metadata or {})
    if updated is None:
        raise NotFound(f"No chat completion found with id '{completion_id}'.")
    return _json(updated.completion)


@router.delete("/v1/chat/completions/{completion_id}")
async def delete_chat_completion(request: Request, completion_id: str) -> Response:
    state = app_state(request)
    run = state.runs.get(completion_id)
    if run is not None and run.cancel():
        await asyncio.gather(run.task, return_exceptions=True)  # type: ignore[arg-type]
    if not await _store(state).delete_chat(completion_id):
        raise NotFound(f"No chat completion found with id '{completion_id}'.")
    return _json({"object": "chat.completion.deleted", "id": completion_id, "deleted": True})


@router.get("/v1/chat/completions/{completion_id}/messages")
async def list_chat_messages(
    request: Request, completion_id: str, after: str | None = None,
    limit: int = Query(20, ge=1, le=100), order: Literal["asc", "desc"] = "asc",
) -> Response:
    messages = list((await _found(app_state(request), completion_id)).messages)
    if order == "desc":
        messages.reverse()
    if after is not None:
        ids = [m["id"] for m in messages]
        if after not in ids:
            raise InvalidRequest(f"No message with id '{after}' in this completion.",
                                 param="after")
        messages = messages[ids.index(after) + 1:]
    return _json(_page(messages[:limit], len(messages) > limit))
