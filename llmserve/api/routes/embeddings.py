"""POST /v1/embeddings"""

from __future__ import annotations

import base64

import anyio.to_thread
import numpy as np
import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response

from llmserve.api.bodies import parse_body
from llmserve.api.lookup import embedding_model
from llmserve.api.protocol import EmbeddingRequest
from llmserve.api.requests import cancel_on_disconnect
from llmserve.errors import InvalidRequest, UnsupportedParameter

router = APIRouter()


@router.post("/v1/embeddings")
async def create_embeddings(request: Request) -> Response:
    body = await parse_body(request, EmbeddingRequest)
    served = await embedding_model(request, body.model)
    embedder = served.batcher.embedder
    if body.dimensions is not None and body.dimensions != embedder.dimensions:
        raise UnsupportedParameter(
            f"The model '{served.name}' makes vectors of {embedder.dimensions} dimensions only.",
            param="dimensions",
        )
    # Tokenizing a large input is work for a thread, not the event loop every stream shares.
    inputs = await anyio.to_thread.run_sync(_token_lists, served.name, embedder, body.inputs())

    async with cancel_on_disconnect(request):
        vectors = await served.batcher.embed(inputs)
    tokens = sum(len(ids) for ids in inputs)
    result = {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": _encode(v, body.encoding_format)}
            for i, v in enumerate(vectors)
        ],
        "model": served.name,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
    return Response(orjson.dumps(result, option=orjson.OPT_SERIALIZE_NUMPY),
                    media_type="application/json")


def _token_lists(name: str, embedder, items: list[str | list[int]]) -> list[list[int]]:
    inputs: list[list[int]] = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            if not item:
                raise InvalidRequest(f"Input {i} is an empty string.", param="input")
            ids = embedder.tokenize(item)
        else:
            if not item:
                raise InvalidRequest(f"Input {i} is an empty list of tokens.", param="input")
            bad = next((t for t in item if not 0 <= t < embedder.vocab_size), None)
            if bad is not None:
                raise InvalidRequest(f"Token id {bad} is outside the vocabulary.", param="input")
            ids = item
        if len(ids) > embedder.max_input_tokens:
            raise InvalidRequest(
                f"Input {i} has {len(ids)} tokens; the model '{name}' reads at most "
                f"{embedder.max_input_tokens}.",
                param="input",
                code="context_length_exceeded",
            )
        inputs.append(ids)
    return inputs


def _encode(vector: np.ndarray, fmt: str) -> list[float] | str:
    if fmt == "base64":  # little-endian float32, as OpenAI sends it
        return base64.b64encode(vector.astype("<f4").tobytes()).decode()
    return vector.astype(np.float32).tolist()
