"""Stored chat completions (`store: true`), as at OpenAI: list, retrieve, update metadata,
delete, and list a completion's messages. Beyond OpenAI: a stored stream can be followed
again with `?stream=true` from the event after `Last-Event-ID`, live while it runs, then
from the store."""

from __future__ import annotations

import re
from typing import Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict

from llmserve.api.bodies import parse_body
from llmserve.api.protocol import Metadata
from llmserve.api.requests import json_response, list_page, page_body, request_key_hash
from llmserve.api.state import AppState, app_state
from llmserve.api.streams import resume_run, resume_stored
from llmserve.errors import InvalidRequest, NotFound
from llmserve.serving.runs import CHAT_COMPLETION
from llmserve.store import Store, StoredChat

router = APIRouter()


def _store(state: AppState) -> Store:
    if state.store is None:
        raise NotFound("This server keeps no chat completions (--store none).")
    return state.store


async def _found(request: Request, id: str) -> StoredChat:
    found = await _store(app_state(request)).get_chat(id, request_key_hash(request))
    if found is None:
        raise NotFound(f"No chat completion found with id '{id}'.")
    return found


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
        model=model, metadata=metadata or None, after=after, limit=limit, order=order,
        key_hash=request_key_hash(request))
    return json_response(page_body([c.completion for c in chats], has_more))


@router.get("/v1/chat/completions/{completion_id}")
async def retrieve_chat_completion(
    request: Request, completion_id: str, stream: bool = False,
) -> Response:
    state = app_state(request)
    if not stream:
        return json_response((await _found(request, completion_id)).completion)
    position = request.headers.get("last-event-id")
    run = state.runs.get(completion_id, CHAT_COMPLETION, request_key_hash(request))
    if run is not None:
        return resume_run(request, run, position, "Last-Event-ID")
    await _found(request, completion_id)
    events = await _store(state).events(completion_id)
    if not events:
        raise InvalidRequest("Only completions that were streamed can be streamed again.",
                             param="stream")
    return resume_stored(request, events, position, "Last-Event-ID")


class _MetadataUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    metadata: Metadata | None


@router.post("/v1/chat/completions/{completion_id}")
async def update_chat_completion(request: Request, completion_id: str) -> Response:
    body = await parse_body(request, _MetadataUpdate)
    updated = await _store(app_state(request)).update_chat_metadata(
        completion_id, body.metadata or {}, request_key_hash(request))
    if updated is None:
        raise NotFound(f"No chat completion found with id '{completion_id}'.")
    return json_response(updated.completion)


@router.delete("/v1/chat/completions/{completion_id}")
async def delete_chat_completion(request: Request, completion_id: str) -> Response:
    state = app_state(request)
    key_hash = request_key_hash(request)
    run = state.runs.get(completion_id, CHAT_COMPLETION, key_hash)
    if run is not None:  # a running one exists, saved or not yet
        await state.runs.remove(run)
    if not await _store(state).delete_chat(completion_id, key_hash) and run is None:
        raise NotFound(f"No chat completion found with id '{completion_id}'.")
    return json_response({"object": "chat.completion.deleted", "id": completion_id, "deleted": True})


@router.get("/v1/chat/completions/{completion_id}/messages")
async def list_chat_messages(
    request: Request, completion_id: str, after: str | None = None,
    limit: int = Query(20, ge=1, le=100), order: Literal["asc", "desc"] = "asc",
) -> Response:
    messages = (await _found(request, completion_id)).messages
    return json_response(list_page(messages, after=after, limit=limit, order=order,
                                   what="message in this completion"))
