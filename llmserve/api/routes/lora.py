"""POST /v1/load_lora_adapter, /v1/unload_lora_adapter: LoRA adapters loaded and unloaded
while serving, in vLLM's shapes (its plain-text success answers too). Only with
--allow-runtime-lora, and only adapters inside --lora-dir: a client names a path, and the
server would otherwise read any file it can."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse, Response

from llmserve.api.bodies import parse_body
from llmserve.api.protocol import LoadLoraAdapterRequest, UnloadLoraAdapterRequest
from llmserve.api.state import app_state
from llmserve.config import Settings
from llmserve.errors import InvalidRequest, RouteNotFound
from llmserve.models.entries import ModelEntry
from llmserve.models.registry import ModelRegistry

router = APIRouter()


@router.post("/v1/load_lora_adapter")
async def load_lora_adapter(request: Request) -> Response:
    settings = _allowed(request)
    body = await parse_body(request, LoadLoraAdapterRequest)
    registry = app_state(request).registry
    path = adapter_path(settings, body.lora_path)
    base = body.base_model or _only_chat_model(registry)
    await registry.add_adapter(ModelEntry((body.lora_name,), path, base=base, scale=body.scale))
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")


@router.post("/v1/unload_lora_adapter")
async def unload_lora_adapter(request: Request) -> Response:
    _allowed(request)
    body = await parse_body(request, UnloadLoraAdapterRequest)
    await app_state(request).registry.remove_adapter(body.lora_name)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")


def _allowed(request: Request) -> Settings:
    settings = app_state(request).settings
    if not settings.allow_runtime_lora:
        raise RouteNotFound("Loading LoRA adapters while serving is off: start the server with "
                            "--allow-runtime-lora --lora-dir DIR.")
    return settings


def adapter_path(settings: Settings, given: str) -> Path:
    """`given` (relative to --lora-dir, or absolute) resolved, links followed; refused
    unless it lies inside --lora-dir."""
    folder = Path(settings.lora_dir or "").expanduser().resolve()
    path = (folder / given).resolve()
    if not path.is_relative_to(folder) or path == folder:
        raise InvalidRequest(f"'{given}' is not inside the LoRA folder (--lora-dir).",
                             param="lora_path")
    if not path.exists():
        raise InvalidRequest(f"No LoRA adapter at '{given}' in the LoRA folder.",
                             param="lora_path")
    return path


def _only_chat_model(registry: ModelRegistry) -> str:
    chat = [e.name for e in registry.entries() if e.kind == "chat" and not e.is_adapter]
    if len(chat) != 1:
        raise InvalidRequest(f"Several chat models are served ({', '.join(chat)}): name the "
                             "one the adapter is for in 'base_model'.", param="base_model")
    return chat[0]
