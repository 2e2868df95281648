"""POST /v1/rerank (also /rerank and /v2/rerank) and POST /v1/score (also /score), under
the paths vLLM serves them at, in its shapes (rerank: Jina's and Cohere's)."""

from __future__ import annotations

import time
import uuid

import anyio.to_thread
import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response

from llmserve.api.bodies import parse_body
from llmserve.api.lookup import scorer as model_scorer
from llmserve.api.protocol import RerankRequest, ScoreRequest
from llmserve.api.requests import cancel_on_disconnect
from llmserve.serving.scores import Scorer, Texts, ranked

router = APIRouter()


@router.post("/v1/rerank")
@router.post("/v2/rerank")
@router.post("/rerank")
async def rerank(request: Request) -> Response:
    body = await parse_body(request, RerankRequest)
    scorer = await model_scorer(request, body.model)
    documents = body.texts()
    scores, tokens = await _score(request, scorer, Texts([body.query], documents))
    results = []
    for i in ranked(scores, body.top_n):
        result: dict = {"index": i, "relevance_score": scores[i]}
        if body.return_documents:
            result["document"] = {"text": documents[i]}
        results.append(result)
    return _json({
        "id": f"rerank-{uuid.uuid4().hex}",
        "model": scorer.name,
        "usage": {"total_tokens": tokens},
        "results": results,
    })


@router.post("/v1/score")
@router.post("/score")
async def score(request: Request) -> Response:
    body = await parse_body(request, ScoreRequest)
    scorer = await model_scorer(request, body.model)
    first, second = body.sides()
    scores, tokens = await _score(request, scorer, Texts(first, second, ("text_1", "text_2")))
    return _json({
        "id": f"score-{uuid.uuid4().hex}",
        "object": "list",
        "created": int(time.time()),
        "model": scorer.name,
        "data": [{"index": i, "object": "score", "score": s} for i, s in enumerate(scores)],
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0},
    })


async def _score(request: Request, scorer: Scorer, texts: Texts) -> tuple[list[float], int]:
    # Tokenizing many documents is work for a thread, not the event loop every stream shares.
    job = await anyio.to_thread.run_sync(scorer.prepare, texts)
    async with cancel_on_disconnect(request):
        scores = await scorer.score(job)
    return scores, job.tokens


def _json(body: dict) -> Response:
    return Response(orjson.dumps(body), media_type="application/json")
