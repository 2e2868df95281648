"""POST /tokenize, POST /detokenize: vLLM's shapes, at the root where vLLM serves them."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from llmserve.api.bodies import parse_body
from llmserve.api.lookup import chat_model
from llmserve.api.protocol import DetokenizeRequest, TokenizeRequest
from llmserve.api.requests import json_response

router = APIRouter()


@router.post("/tokenize")
async def tokenize(request: Request) -> Response:
    body = await parse_body(request, TokenizeRequest)
    served = await chat_model(request, body.model)
    prepare = served.prepare
    if body.chat:
        tokens = await prepare.chat_tokens(
            body.template_messages(), body.output_request(),
            add_generation_prompt=body.generation_prompt,
            continue_final_message=bool(body.continue_final_message),
            add_special_tokens=body.special_tokens,
            template_kwargs=body.chat_template_kwargs,
        )
    else:
        assert body.prompt is not None
        tokens = await prepare.text_tokens(body.prompt, add_special_tokens=body.special_tokens)
    return json_response({
        "count": len(tokens),
        "max_model_len": served.engine.context_length,
        "tokens": tokens,
        "token_strs": await prepare.token_strs(tokens) if body.return_token_strs else None,
    })


@router.post("/detokenize")
async def detokenize(request: Request) -> Response:
    body = await parse_body(request, DetokenizeRequest)
    served = await chat_model(request, body.model)
    return json_response({"prompt": await served.prepare.detokenize(body.tokens)})
