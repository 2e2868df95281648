"""LoRA adapters on the llama.cpp engine, with adapters the tests build for the bundled model
(tests/lora.py): an adapter changes the output; base and adapter requests decoded in the same
step (one llama_decode per adapter) each get what they get alone; an adapter at scale 0 is the
base; a cached prefix is reused only under the adapter that computed it; a broken adapter
fails its own requests, with the reason, and nothing else."""

from __future__ import annotations

import pytest
from greedy import parting
from lora import (
    alone,
    check_adapters_change_the_output,
    check_adapters_share_a_step,
    check_loading_while_serving,
    check_scale_zero_is_the_base,
    reference,
    text,
    write_gguf_lora,
)
from speculation_cases import chat, greedy, outputs, run_on

from llmserve.engines.llamacpp import LlamaCppEngine
from llmserve.models import bundled_model_path

PROMPTS = ["Give me three colours.", "Write a haiku about the sea.",
           "What is the capital of France?"]


@pytest.fixture(scope="module")
def adapter_files(tmp_path_factory):
    base = bundled_model_path()
    out = tmp_path_factory.mktemp("loras")
    broken = out / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\0" * 64)
    return {"a": write_gguf_lora(out / "a.gguf", base, seed=1),
            "b": write_gguf_lora(out / "b.gguf", base, seed=2),
            "broken": broken}


@pytest.fixture(scope="module")
def engine(adapter_files):
    e = LlamaCppEngine(
        bundled_model_path(), context_length=512, max_sequences=8, threads=2,
        adapters={"a": (str(adapter_files["a"]), 1.0), "b": (str(adapter_files["b"]), 1.0),
                  "zero": (str(adapter_files["a"]), 0.0),
                  "broken": (str(adapter_files["broken"]), 1.0),
                  "missing": (str(adapter_files["a"].parent / "nope.gguf"), 1.0)})
    yield e
    e.close()


def test_the_adapters_load_and_the_broken_ones_say_why(engine):
    assert engine.adapters["a"] is None and engine.adapters["zero"] is None
    assert "broken.gguf" in engine.adapters["broken"]
    assert "file not found" in engine.adapters["missing"]


def test_an_adapter_changes_the_output(engine):
    check_adapters_change_the_output(engine, PROMPTS[0])


def test_scale_zero_is_the_base(engine):
    check_scale_zero_is_the_base(engine, PROMPTS[1])


def test_requests_of_several_adapters_in_one_step_each_get_their_own_output(engine):
    check_adapters_share_a_step(engine, PROMPTS)


def test_a_cached_prefix_is_reused_only_under_its_own_adapter(engine):
    fresh = alone(engine, PROMPTS[2], "b")
    alone(engine, PROMPTS[2], "a")  # its slot now holds the prompt, computed under a
    alone(engine, PROMPTS[2], None)
    again = alone(engine, PROMPTS[2], "b")
    assert parting(text(engine, again), reference(engine, fresh)) is None


def test_a_broken_adapter_fails_its_requests_only(engine):
    with pytest.raises(ValueError, match="failed to load: llama.cpp could not load"):
        alone(engine, PROMPTS[0], "broken")
    with pytest.raises(ValueError, match="no LoRA adapter named 'other'"):
        alone(engine, PROMPTS[0], "other")
    assert text(engine, alone(engine, PROMPTS[0], None))


def test_no_adapter_loaded_is_the_plain_engine():
    e = LlamaCppEngine(bundled_model_path(), context_length=256, max_sequences=2, threads=2)
    try:
        assert e.adapters == {}
        with pytest.raises(ValueError, match="no LoRA adapter"):
            alone(e, "hi", "a")
        assert run_on(e, lambda x: outputs(x, chat(x, "hi"), [greedy(4)]))[0]
    finally:
        e.close()


def test_adapters_load_and_unload_while_serving(adapter_files):
    e = LlamaCppEngine(bundled_model_path(), context_length=512, max_sequences=4, threads=2)
    try:
        check_loading_while_serving(e, adapter_files["a"], adapter_files["broken"])
    finally:
        e.close()
