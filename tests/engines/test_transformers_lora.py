"""LoRA adapters on the transformers engine (PEFT directories, PEFT's mixed batches), with
adapters the tests build for the bundled model as a Hugging Face directory (tests/lora.py): an
adapter changes the output; base and adapter requests decoded in the same forward passes each
get what they get alone; an adapter at scale 0 is the base; speculation under an adapter drafts
under it too; a broken adapter fails its own requests, with the reason, and nothing else."""

from __future__ import annotations

import pytest

pytest.importorskip("torch", reason="the hf extra (torch, transformers) is not installed")
pytest.importorskip("peft", reason="the hf extra (peft) is not installed")

from greedy import parting  # noqa: E402
from lora import (  # noqa: E402
    alone,
    check_adapters_change_the_output,
    check_adapters_share_a_step,
    check_loading_while_serving,
    check_scale_zero_is_the_base,
    reference,
    text,
    write_peft_lora,
)
from speculation_cases import REPEAT, chat, greedy, outputs, run_on  # noqa: E402

from llmserve.engines.transformers import TransformersEngine  # noqa: E402

PROMPTS = ["Give me three colours.", "Write a haiku about the sea.",
           "What is the capital of France?"]


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory):
    from conftest import hf_model_dir

    out = tmp_path_factory.mktemp("peft")
    a = write_peft_lora(out / "a", hf_model_dir(), seed=1)
    broken = out / "broken"  # a's config, its weights cut short
    broken.mkdir()
    (broken / "adapter_config.json").write_bytes((a / "adapter_config.json").read_bytes())
    (broken / "adapter_model.safetensors").write_bytes(
        (a / "adapter_model.safetensors").read_bytes()[:1000])
    return {"a": a, "b": write_peft_lora(out / "b", hf_model_dir(), seed=2), "broken": broken}


def _engine(adapter_dirs, **kw) -> TransformersEngine:
    from conftest import hf_model_dir

    return TransformersEngine(
        hf_model_dir(), context_length=512, max_sequences=8, threads=2,
        adapters={"a": (str(adapter_dirs["a"]), 1.0), "b": (str(adapter_dirs["b"]), 1.0),
                  "zero": (str(adapter_dirs["a"]), 0.0), "half": (str(adapter_dirs["a"]), 0.5),
                  "broken": (str(adapter_dirs["broken"]), 1.0),
                  "missing": (str(adapter_dirs["a"].parent / "nope"), 1.0)}, **kw)


@pytest.fixture(scope="module")
def engine(adapter_dirs):
    e = _engine(adapter_dirs)
    yield e
    e.close()


def test_the_adapters_load_and_the_broken_ones_say_why(engine):
    assert engine.adapters["a"] is None and engine.adapters["zero"] is None
    assert "is not a LoRA adapter of this model" in engine.adapters["broken"]
    assert "no adapter_config.json" in engine.adapters["missing"]


def test_an_adapter_changes_the_output(engine):
    check_adapters_change_the_output(engine, PROMPTS[0])


def test_scale_zero_is_the_base(engine):
    check_scale_zero_is_the_base(engine, PROMPTS[1])


def test_requests_of_several_adapters_in_one_step_each_get_their_own_output(engine):
    check_adapters_share_a_step(engine, PROMPTS[:2])


def test_a_drafted_step_reads_under_the_sequences_adapter(engine, adapter_dirs):
    """Drafts are read in the pass of the sequence's adapter: the same logprobs as without
    speculation under it, not the base's (half scale: the adapter still copies the text)."""
    spec = _engine(adapter_dirs, speculative="ngram", speculative_tokens=6)
    try:
        drafted = alone(spec, REPEAT, "half")
        assert spec._spec.accepted_tokens > 0
    finally:
        spec.close()
    plain = alone(engine, REPEAT, "half")
    base = alone(engine, REPEAT, None)
    assert parting(text(engine, drafted), reference(engine, plain)) is None

    def gap(x, y):
        return max(abs(p.logprob - q.logprob) for p, q in zip(x, y, strict=False))

    assert gap(drafted, plain) < 1e-3 < 1e-2 < gap(drafted, base)


def test_a_broken_adapter_fails_its_requests_only(engine):
    with pytest.raises(ValueError, match="the LoRA adapter 'broken' failed to load"):
        alone(engine, PROMPTS[0], "broken")
    with pytest.raises(ValueError, match="no LoRA adapter named 'other'"):
        alone(engine, PROMPTS[0], "other")
    assert text(engine, alone(engine, PROMPTS[0], None))
    assert text(engine, alone(engine, PROMPTS[0], "a"))


def test_no_adapter_loaded_is_the_plain_engine():
    from conftest import hf_model_dir

    e = TransformersEngine(hf_model_dir(), context_length=256, max_sequences=2, threads=2)
    try:
        assert e.adapters == {} and e._peft is None
        with pytest.raises(ValueError, match="no LoRA adapter"):
            alone(e, "hi", "a")
        assert run_on(e, lambda x: outputs(x, chat(x, "hi"), [greedy(4)]))[0]
    finally:
        e.close()


def test_adapters_load_and_unload_while_serving(adapter_dirs):
    from conftest import hf_model_dir

    e = TransformersEngine(hf_model_dir(), context_length=512, max_sequences=4, threads=2)
    try:
        check_loading_while_serving(e, adapter_dirs["a"], adapter_dirs["broken"])
        assert e._peft is not None and list(e._peft.peft_config) == [e._lora_names[
            "org/pirate-v1.2"]]  # what was unloaded is gone from the model
    finally:
        e.close()
