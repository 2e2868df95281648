"""LoRA adapters served as models (`--lora NAME=PATH`, and `base` in a models file): listed
with their base as `parent`, picked by the request's `model`, decoded in the same engine
beside the base; a broken adapter fails only its own requests, with the reason. On every engine
(tests/conftest.engines), with adapters the test builds for the bundled model (tests/lora.py):
GGUF LoRAs on llama.cpp, PEFT directories on the others."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest
from conftest import MODEL, engine_flags, engines, hf_model_dir, run_server
from greedy import parting
from lora import write_gguf_lora, write_peft_lora
from openai_schema import validate

from llmserve.models import bundled_model_path

ASK = [{"role": "user", "content": "Give me three colours."}]


@pytest.fixture(scope="module", params=engines())
def engine(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, engine):
    out = tmp_path_factory.mktemp("loras")
    if engine == "llamacpp":
        broken = out / "broken.gguf"
        broken.write_bytes(b"not a gguf file")
        return {"alpha": write_gguf_lora(out / "alpha.gguf", bundled_model_path(), seed=1),
                "beta": write_gguf_lora(out / "beta.gguf", bundled_model_path(), seed=2),
                "broken": broken}
    alpha = write_peft_lora(out / "alpha", hf_model_dir(), seed=1)
    broken = out / "broken"  # alpha's config, no weights a reader can open
    broken.mkdir()
    (broken / "adapter_config.json").write_bytes((alpha / "adapter_config.json").read_bytes())
    (broken / "adapter_model.safetensors").write_bytes(b"not safetensors")
    return {"alpha": alpha, "beta": write_peft_lora(out / "beta", hf_model_dir(), seed=2),
            "broken": broken}


# the reason each engine gives for the broken file
WHY_BROKEN = {"llamacpp": "could not load", "transformers": "is not a LoRA adapter of this model",
              "vllm": "vLLM could not load"}


@pytest.fixture(scope="module")
def server(tmp_path_factory, engine, adapters):
    flags = [f for name, path in adapters.items() for f in ("--lora", f"{name}={path}")]
    with run_server(tmp_path_factory.mktemp("lora-server"), *flags, *engine_flags(engine),
                    "--embedding-model", "none") as s:
        yield s


def _run(server, fn):
    """`await fn(client)` with an async client of `server`, in a loop of its own."""
    async def main():
        async with openai.AsyncOpenAI(base_url=server.base_url, api_key=server.api_key,
                                      max_retries=0, timeout=300) as client:
            return await fn(client)

    return asyncio.run(main())


async def _answer(client: openai.AsyncOpenAI, model: str, *, stream: bool = False):
    kwargs = dict(model=model, messages=ASK, max_tokens=24, temperature=0, logprobs=True,
                  top_logprobs=5)
    if not stream:
        done = await client.chat.completions.create(**kwargs)
        assert done.model == model
        return done.choices[0].message.content, done.choices[0].logprobs.content
    parts = []
    async for chunk in await client.chat.completions.create(**kwargs, stream=True):
        assert chunk.model == model
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
    return "".join(parts), None


def test_models_lists_each_adapter_with_its_base_as_parent(server, adapters):
    r = httpx.get(server.base_url + "/models", headers=server.headers())
    validate("ListModelsResponse", r.json())
    cards = {m["id"]: m for m in r.json()["data"]}
    assert {MODEL, "alpha", "beta", "broken"} <= set(cards)
    assert cards["alpha"]["parent"] == MODEL and cards["alpha"]["root"] == str(adapters["alpha"])
    assert "parent" not in cards[MODEL]
    one = httpx.get(server.base_url + "/models/beta", headers=server.headers()).json()
    assert one["parent"] == MODEL


def test_an_adapter_answers_as_itself_streamed_or_not(server):
    async def check(client):
        base, _ = await _answer(client, MODEL)
        alpha, alpha_lp = await _answer(client, "alpha")
        beta, _ = await _answer(client, "beta")
        assert len({base, alpha, beta}) == 3, (base, alpha, beta)
        streamed, _ = await _answer(client, "alpha", stream=True)
        assert parting(streamed, [e.model_dump() for e in alpha_lp]) is None

    _run(server, check)
    metrics = httpx.get(server.url + "/metrics", headers=server.headers()).text
    assert 'llmserve:generation_tokens_total{model_name="alpha"}' in metrics


def test_base_and_adapters_together_each_get_their_own_answer(server):
    models = [MODEL, "alpha", "beta"] * 2

    async def check(client):
        alone = {m: await _answer(client, m) for m in set(models)}
        together = await asyncio.gather(*(_answer(client, m) for m in models))
        for model, (text, _) in zip(models, together, strict=True):
            reference = [e.model_dump() for e in alone[model][1]]
            assert parting(text, reference) is None, (model, text, alone[model][0])

    _run(server, check)


def test_a_broken_adapter_fails_alone_with_its_reason(server, engine):
    why = WHY_BROKEN[engine]
    with pytest.raises(openai.APIStatusError) as err:
        _run(server, lambda client: _answer(client, "broken"))
    assert err.value.status_code == 503
    assert "LoRA adapter" in err.value.message and why in err.value.message
    validate("ErrorResponse", err.value.response.json())
    status = httpx.get(server.base_url + "/models/status", headers=server.headers()).json()
    states = {m["id"]: m for m in status["data"]}
    assert states["broken"]["state"] == "failed" and why in states["broken"]["reason"]
    assert states["alpha"]["state"] == "running" and states[MODEL]["state"] == "running"
    assert _run(server, lambda client: _answer(client, "alpha"))[0]
    assert httpx.get(server.url + "/health").status_code == 200
