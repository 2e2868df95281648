"""models: names served for GGUF files, and the bundled default model."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmserve.models import bundled_model_path, served_name_for


@pytest.mark.parametrize(
    "filename, name",
    [
        ("SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2-135m-instruct"),
        ("SmolLM2-135M-Instruct.Q8_0.gguf", "smollm2-135m-instruct"),
        ("SmolLM2-135M-Instruct-F16.gguf", "smollm2-135m-instruct"),
        ("SmolLM2-135M-Instruct.f32.gguf", "smollm2-135m-instruct"),
        ("SmolLM2-135M-Instruct-BF16.gguf", "smollm2-135m-instruct"),
        ("Llama-3.2-1B-Instruct-IQ4_XS.gguf", "llama-3.2-1b-instruct"),
        ("Qwen2.5-0.5B-Instruct-Q4_K_M.gguf", "qwen2.5-0.5b-instruct"),
        ("qwen2-0_5b-instruct-q4_0.gguf", "qwen2-0_5b-instruct"),
        ("Mistral-7B-Instruct-v0.3.Q5_K_S.gguf", "mistral-7b-instruct-v0.3"),
        ("Phi-3-mini-4k-instruct-IQ2_XXS.gguf", "phi-3-mini-4k-instruct"),
    ],
)
def test_served_name_strips_quant_suffix_and_lowercases(filename, name):
    assert served_name_for(Path(filename)) == name


@pytest.mark.parametrize(
    "filename, name",
    [
        ("SmolLM2-135M-Instruct.gguf", "smollm2-135m-instruct"),
        ("Qwen2.5-7B-Instruct.gguf", "qwen2.5-7b-instruct"),
        ("my-model.gguf", "my-model"),
    ],
)
def test_served_name_without_quant_suffix(filename, name):
    assert served_name_for(Path(filename)) == name


def test_served_name_uses_only_the_file_name():
    assert served_name_for(Path("/models/Q4_0/TinyLlama-1.1B-Chat.Q4_0.gguf")) == "tinyllama-1.1b-chat"


def test_bundled_model_path():
    path = bundled_model_path()
    assert isinstance(path, Path)
    assert path.is_file()
    assert path.suffix == ".gguf"
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert served_name_for(path) == "smollm2-135m-instruct"


def test_vllm_engine_needs_a_model_directory(tmp_path):
    from llmserve.config import Settings
    from llmserve.models import engine_spec

    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(FileNotFoundError, match="llmserve.engines.vllm convert"):
        engine_spec(Settings(engine="vllm"), gguf)


def test_vllm_engine_spec(tmp_path, monkeypatch):
    import importlib.util

    from llmserve.config import Settings
    from llmserve.models import engine_spec

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "vllm" else real(name, *a))
    with pytest.raises(FileNotFoundError, match="needs vLLM installed"):
        engine_spec(Settings(engine="vllm"), tmp_path)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())
    spec = engine_spec(Settings(engine="vllm", max_sequences=4, threads=2), tmp_path)
    assert spec.kind == "vllm" and spec.path == tmp_path
    assert spec.options["max_sequences"] == 4 and spec.options["threads"] == 2
    spec = engine_spec(Settings(engine="vllm", tensor_parallel_size=2,
                                enable_prefix_caching=False), tmp_path)
    assert spec.options["vllm_args"]["tensor_parallel_size"] == 2
    assert spec.options["vllm_args"]["enable_prefix_caching"] is False
    assert spec.options["vllm_args"]["quantization"] is None  # vLLM's default
    # its stall watchdog under the same flag as the other engines'
    spec = engine_spec(Settings(engine="vllm", engine_stall_timeout=10), tmp_path)
    assert spec.options["restart_policy"].stall_timeout == 10


def test_auto_engine_picks_vllm_for_a_directory_only_on_a_gpu(tmp_path, monkeypatch):
    import importlib.util

    from llmserve.models import loading as models
    from llmserve.config import Settings

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "vllm" else real(name, *a))
    monkeypatch.setattr(models, "_vllm_on_gpu", lambda: True)
    assert models.engine_spec(Settings(), tmp_path).kind == "vllm"
    assert models.engine_spec(Settings(), models.bundled_model_path()).kind == "llamacpp"
    monkeypatch.setattr(models, "_vllm_on_gpu", lambda: False)
    assert models.engine_spec(Settings(), tmp_path).kind == "transformers"


def test_vllm_flags_are_refused_on_other_engines():
    from llmserve.config import Settings
    from llmserve.models import bundled_model_path, engine_spec

    with pytest.raises(ValueError, match="--quantization, --enable-prefix-caching: for --engine"):
        engine_spec(Settings(quantization="awq", enable_prefix_caching=True),
                    bundled_model_path())


def test_speculative_flags_reach_llamacpp_and_transformers(tmp_path):
    from llmserve.config import Settings
    from llmserve.models import engine_spec

    gguf = bundled_model_path()
    # auto, the default: on where drafts are adaptive (llama.cpp), off elsewhere
    for engine, auto in (("llamacpp", "ngram"), ("transformers", "off")):
        spec = engine_spec(Settings(engine=engine), gguf)
        assert (spec.kind, spec.options["speculative"]) == (engine, auto)
        spec = engine_spec(Settings(engine=engine, speculative="off"), gguf)
        assert spec.options["speculative"] == "off"
        spec = engine_spec(Settings(engine=engine, speculative="ngram", speculative_tokens=7,
                                    speculative_ngram=2), gguf)
        assert (spec.options["speculative"], spec.options["speculative_tokens"],
                spec.options["speculative_ngram"]) == ("ngram", 7, 2)
    with pytest.raises(ValueError, match="--speculative-config: for --engine vllm only"):
        engine_spec(Settings(speculative_config={"method": "ngram"}), gguf)


def test_speculative_flags_reach_vllm_as_its_speculative_config(tmp_path, monkeypatch):
    import importlib.util

    from llmserve.config import Settings
    from llmserve.models import engine_spec

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())

    def config(**kw):
        return engine_spec(Settings(engine="vllm", **kw), tmp_path).options["vllm_args"][
            "speculative_config"]

    assert config() is None
    assert config(speculative_tokens=7) is None  # off: the other two change nothing
    assert config(speculative="ngram") == {"method": "ngram", "num_speculative_tokens": 5,
                                           "prompt_lookup_max": 3, "prompt_lookup_min": 2}
    assert config(speculative="ngram", speculative_tokens=8, speculative_ngram=1) == {
        "method": "ngram", "num_speculative_tokens": 8, "prompt_lookup_max": 1,
        "prompt_lookup_min": 1}
    raw = {"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 4}
    assert config(speculative_config=raw) == raw  # as given
    assert config(speculative="ngram", speculative_config=raw) == raw  # and it wins
