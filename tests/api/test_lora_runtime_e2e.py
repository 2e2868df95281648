"""LoRA adapters loaded and unloaded while serving: POST /v1/load_lora_adapter and
/v1/unload_lora_adapter in vLLM's shapes, only with --allow-runtime-lora, only with the key,
only from --lora-dir; a loaded adapter answers as itself, comes back after its engine
restarts, and is refused once unloaded while a stream under it finishes. On every engine
(tests/conftest.engines), with adapters the test builds (tests/lora.py)."""

from __future__ import annotations

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
    """--lora-dir: two adapters and a damaged one; a secret beside it, outside."""
    root = tmp_path_factory.mktemp("runtime-lora")
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
    broken = folder / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_bytes(
        (folder / "alpha" / "adapter_config.json").read_bytes())
    (broken / "adapter_model.safetensors").write_bytes(b"not safetensors")
    return folder, {"alpha": "alpha", "beta": "beta", "broken": "broken"}


@pytest.fixture(scope="module")
def server(tmp_path_factory, engine, lora_dir):
    folder, _ = lora_dir
    with run_server(tmp_path_factory.mktemp("lora-runtime-server"), *engine_flags(engine),
                    "--allow-runtime-lora", "--lora-dir", str(folder),
                    "--embedding-model", "none") as s:
        yield s


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


def _answer(server, model: str) -> str:
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
    r = _load(server, "alpha", files["alpha"])
    assert r.status_code == 200 and r.text == "Success: LoRA adapter 'alpha' added successfully."
    card = _models(server)["alpha"]
    assert card["parent"] == MODEL and card["root"].endswith(files["alpha"])
    alpha, alpha_lp = _greedy(server, "alpha")
    assert alpha != base
    r = _unload(server, "alpha")
    assert r.status_code == 200 and "removed successfully" in r.text
    assert "alpha" not in _models(server)
    with pytest.raises(openai.NotFoundError):
        _answer(server, "alpha")
    # the same answers as before, up to near-ties (tests/greedy.py)
    assert parting(_answer(server, MODEL), base_lp) is None
    # loaded again, under another name: the same adapter, the same answer
    assert _load(server, "alpha-again", files["alpha"]).status_code == 200
    assert parting(_answer(server, "alpha-again"), alpha_lp) is None
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
    _refused(_load(server, "broken", files["broken"]), 400, "could not be loaded")
    assert "broken" not in _models(server)
    _refused(_load(server, MODEL, files["beta"]), 400, "exists already")
    _refused(_load(server, "b", files["beta"], load_inplace=True), 400, "load_inplace")
    _refused(_unload(server, "never-loaded"), 404, "cannot be found")
    assert _answer(server, MODEL)


def test_a_stream_under_way_finishes_after_its_adapter_is_unloaded(server, lora_dir):
    _, files = lora_dir
    assert _load(server, "beta", files["beta"]).status_code == 200
    _, reference = _greedy(server, "beta", 128, ignore_eos=True)
    stream = _client(server).chat.completions.create(
        model="beta", messages=ASK, max_tokens=128, temperature=0, stream=True,
        extra_body={"ignore_eos": True})
    parts: list[str] = []
    after = 0  # tokens that came after the adapter was unloaded
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
            if len(parts) == 2:  # under way: the adapter goes
                assert _unload(server, "beta").status_code == 200
            elif len(parts) > 2:
                after += 1
    assert after > 32
    assert parting("".join(parts), reference) is None  # up to near-ties (tests/greedy.py)
    with pytest.raises(openai.NotFoundError):
        _answer(server, "beta")


def test_a_restarted_engine_loads_the_adapters_loaded_while_serving(server, lora_dir, engine):
    _, files = lora_dir
    assert _load(server, "gamma", files["beta"]).status_code == 200
    _, before = _greedy(server, "gamma")
    os.kill(_engine_pid(server, engine), signal.SIGKILL)
    deadline = time.monotonic() + 180
    while True:  # refused (503) while it restarts
        try:
            after = _answer(server, "gamma")
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
        adapted = _answer(s, "alpha")
        assert adapted != _answer(s, "two")
        assert _unload(s, "alpha").status_code == 200
