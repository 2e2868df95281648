"""LoRA adapters served as models (`--lora NAME=PATH`, and `base` in a models file): listed
with their base as `parent`, picked by the request's `model`, decoded in the same engine
beside the base; a broken adapter fails only its own requests, with the reason. And loaded and
unloaded while serving: POST /v1/load_lora_adapter and /v1/unload_lora_adapter in vLLM's shapes,
only with --allow-runtime-lora, only with the key, only from --lora-dir; a loaded adapter
answers as itself, comes back after its engine restarts, and is refused once unloaded while a
stream under it finishes. On every engine (tests/conftest.engines), with adapters the test
builds for the bundled model (tests/lora.py): GGUF LoRAs on llama.cpp, PEFT directories on the
others. One server per engine serves both halves."""

from __future__ import annotations

import asyncio
import os
import signal
import time

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
def lora_dir(tmp_path_factory, engine):
    """--lora-dir: two adapters and a damaged one (each also served from the start, under
    the same name), and a secret beside the folder, outside it."""
    root = tmp_path_factory.mktemp("loras")
    folder = root / "loras"
    folder.mkdir()
    (root / "secret.gguf").write_bytes(b"not for clients")
    (folder / "escape.gguf").symlink_to(root / "secret.gguf")
    if engine == "llamacpp":
        write_gguf_lora(folder / "alpha.gguf", bundled_model_path(), seed=1)
        write_gguf_lora(folder / "beta.gguf", bundled_model_path(), seed=2)
        (folder / "broken.gguf").write_bytes(b"not a gguf file")
        return folder, {"alpha": "alpha.gguf", "beta": "beta.gguf", "broken": "broken.gguf"}
    write_peft_lora(folder / "alpha", hf_model_dir(), seed=1)
    write_peft_lora(folder / "beta", hf_model_dir(), seed=2)
    broken = folder / "broken"  # alpha's config, no weights a reader can open
    broken.mkdir()
    (broken / "adapter_config.json").write_bytes(
        (folder / "alpha" / "adapter_config.json").read_bytes())
    (broken / "adapter_model.safetensors").write_bytes(b"not safetensors")
    return folder, {"alpha": "alpha", "beta": "beta", "broken": "broken"}


@pytest.fixture(scope="module")
def adapters(lora_dir):
    """The adapters served from the start, by name: their paths."""
    folder, files = lora_dir
    return {name: folder / file for name, file in files.items()}


# the reason each engine gives for the broken file
WHY_BROKEN = {"llamacpp": "could not load", "transformers": "is not a LoRA adapter of this model",
              "vllm": "vLLM could not load"}


@pytest.fixture(scope="module")
def server(tmp_path_factory, engine, adapters, lora_dir):
    flags = [f for name, path in adapters.items() for f in ("--lora", f"{name}={path}")]
    with run_server(tmp_path_factory.mktemp("lora-server"), *flags, *engine_flags(engine),
                    "--allow-runtime-lora", "--lora-dir", str(lora_dir[0]),
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
    # the wrong route for it: refused under its own name
    r = httpx.post(server.base_url + "/embeddings", json={"model": "alpha", "input": "x"},
                   headers=server.headers())
    assert r.status_code == 400 and "'alpha'" in r.json()["error"]["message"], r.text


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


# -- loaded and unloaded while serving ----------------------------------------------------


def _post(server, path: str, body: dict, *, key: bool = True) -> httpx.Response:
    return httpx.post(server.base_url + path, json=body,
                      headers=server.headers() if key else {}, timeout=300)


def _load(server, name: str, path: str, **extra) -> httpx.Response:
    return _post(server, "/load_lora_adapter", {"lora_name": name, "lora_path": path, **extra})


def _unload(server, name: str) -> httpx.Response:
    return _post(server, "/unload_lora_adapter", {"lora_name": name})


def _client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key=server.api_key, max_retries=0,
                         timeout=300)


def _reply(server, model: str) -> str:
    return _greedy(server, model)[0]


def _greedy(server, model: str, tokens: int = 24, **extra) -> tuple[str, list[dict]]:
    """A greedy answer and its logprobs (what tests/greedy.parting compares with)."""
    done = _client(server).chat.completions.create(model=model, messages=ASK, max_tokens=tokens,
                                                   temperature=0, logprobs=True, top_logprobs=5,
                                                   extra_body=extra or None)
    assert done.model == model
    choice = done.choices[0]
    return choice.message.content, [e.model_dump() for e in choice.logprobs.content]


def _refused(response: httpx.Response, status: int, *words: str) -> None:
    assert response.status_code == status, response.text
    validate("ErrorResponse", response.json())
    message = response.json()["error"]["message"]
    for word in words:
        assert word in message, message


def _models(server) -> dict[str, dict]:
    r = httpx.get(server.base_url + "/models", headers=server.headers())
    validate("ListModelsResponse", r.json())
    return {m["id"]: m for m in r.json()["data"]}


def test_off_unless_allowed(tmp_path_factory):
    with run_server(tmp_path_factory.mktemp("no-runtime-lora"),
                    "--embedding-model", "none") as s:
        r = _load(s, "x", "x.gguf")
        _refused(r, 404, "--allow-runtime-lora")


def test_the_flag_needs_a_folder(tmp_path):
    with pytest.raises(RuntimeError, match="--lora-dir"):
        with run_server(tmp_path, "--allow-runtime-lora", "--embedding-model", "none"):
            pass


def test_a_loaded_adapter_answers_as_itself_until_unloaded(server, lora_dir):
    _, files = lora_dir
    base, base_lp = _greedy(server, MODEL)
    _, alpha_lp = _greedy(server, "alpha")  # served from the start
    r = _load(server, "r-alpha", files["alpha"])
    assert r.status_code == 200 and r.text == "Success: LoRA adapter 'r-alpha' added successfully."
    card = _models(server)["r-alpha"]
    assert card["parent"] == MODEL and card["root"].endswith(files["alpha"])
    alpha = _reply(server, "r-alpha")
    assert alpha != base
    assert parting(alpha, alpha_lp) is None  # the same adapter as the one served from the start
    r = _unload(server, "r-alpha")
    assert r.status_code == 200 and "removed successfully" in r.text
    assert "r-alpha" not in _models(server)
    with pytest.raises(openai.NotFoundError):
        _reply(server, "r-alpha")
    # the same answers as before, up to near-ties (tests/greedy.py)
    assert parting(_reply(server, MODEL), base_lp) is None
    # loaded again, under another name: the same adapter, the same answer
    assert _load(server, "alpha-again", files["alpha"]).status_code == 200
    assert parting(_reply(server, "alpha-again"), alpha_lp) is None
    assert _unload(server, "alpha-again").status_code == 200


def test_only_with_the_key(server, lora_dir):
    _, files = lora_dir
    r = _post(server, "/load_lora_adapter", {"lora_name": "k", "lora_path": files["beta"]},
              key=False)
    _refused(r, 401)
    assert "k" not in _models(server)


def test_only_from_the_folder(server, lora_dir):
    folder, _ = lora_dir
    for path in ("../secret.gguf", str(folder.parent / "secret.gguf"), "escape.gguf", "/etc",
                 "."):
        _refused(_load(server, "outside", path), 400, "not inside the LoRA folder")
    _refused(_load(server, "nowhere", "nope.gguf"), 400, "No LoRA adapter at")
    assert "outside" not in _models(server)


def test_a_broken_adapter_or_a_taken_name_is_refused_with_the_reason(server, lora_dir):
    _, files = lora_dir
    _refused(_load(server, "r-broken", files["broken"]), 400, "could not be loaded")
    assert "r-broken" not in _models(server)
    _refused(_load(server, "alpha", files["beta"]), 400, "exists already")  # served from the start
    _refused(_load(server, MODEL, files["beta"]), 400, "exists already")
    _refused(_load(server, "b", files["beta"], load_inplace=True), 400, "load_inplace")
    _refused(_unload(server, "never-loaded"), 404, "cannot be found")
    assert _reply(server, MODEL)


def test_a_stream_under_way_finishes_after_its_adapter_is_unloaded(server, lora_dir):
    _, files = lora_dir
    assert _load(server, "r-beta", files["beta"]).status_code == 200
    _, reference = _greedy(server, "r-beta", 64, ignore_eos=True)
    stream = _client(server).chat.completions.create(
        model="r-beta", messages=ASK, max_tokens=64, temperature=0, stream=True,
        extra_body={"ignore_eos": True})
    parts: list[str] = []
    after = 0  # tokens that came after the adapter was unloaded
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
            if len(parts) == 2:  # under way: the adapter goes
                assert _unload(server, "r-beta").status_code == 200
            elif len(parts) > 2:
                after += 1
    assert after > 16
    assert parting("".join(parts), reference) is None  # up to near-ties (tests/greedy.py)
    with pytest.raises(openai.NotFoundError):
        _reply(server, "r-beta")


def test_a_restarted_engine_loads_the_adapters_loaded_while_serving(server, lora_dir, engine):
    _, files = lora_dir
    assert _load(server, "gamma", files["beta"]).status_code == 200
    _, before = _greedy(server, "gamma")
    os.kill(_engine_pid(server, engine), signal.SIGKILL)
    deadline = time.monotonic() + 180
    while True:  # refused (503) while it restarts
        try:
            after = _reply(server, "gamma")
            break
        except openai.APIStatusError as exc:
            assert exc.status_code == 503 and time.monotonic() < deadline, exc
            time.sleep(0.5)
    assert parting(after, before) is None
    assert _unload(server, "gamma").status_code == 200


def _engine_pid(server, engine: str) -> int:
    """The process that decodes: the model's engine process, or vLLM's engine core."""
    if engine != "vllm":
        status = httpx.get(server.base_url + "/models/status", headers=server.headers()).json()
        return {m["id"]: m for m in status["data"]}[MODEL]["pid"]
    import psutil

    cores = [p for p in psutil.Process(server.process.pid).children(recursive=True)
             if "EngineCore" in " ".join(p.cmdline()) + p.name()]
    assert cores, "no vLLM engine core found"
    return cores[0].pid


def test_with_several_models_an_adapter_names_its_base_and_loads_with_it(tmp_path_factory):
    folder = tmp_path_factory.mktemp("several-loras")
    write_gguf_lora(folder / "alpha.gguf", bundled_model_path(), seed=1)
    gguf = bundled_model_path()
    with run_server(tmp_path_factory.mktemp("several"), "--model", f"one={gguf}",
                    "--model", f"two={gguf}", "--allow-runtime-lora", "--lora-dir", str(folder),
                    "--embedding-model", "none") as s:
        _refused(_load(s, "alpha", "alpha.gguf"), 400, "base_model")
        _refused(_load(s, "alpha", "alpha.gguf", base_model="three"), 404, "three")
        # `two` is not loaded yet: the adapter is listed now and loads with it
        assert _load(s, "alpha", "alpha.gguf", base_model="two").status_code == 200
        assert _models(s)["alpha"]["parent"] == "two"
        adapted = _reply(s, "alpha")
        assert adapted != _reply(s, "two")
        assert _unload(s, "alpha").status_code == 200
