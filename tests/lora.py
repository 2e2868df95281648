"""Small LoRA adapters for the bundled model, built by the tests (no hub, no training): random
low-rank updates strong enough that greedy output changes, written as llama.cpp's GGUF LoRA
(what `convert_lora_to_gguf.py` writes: `general.type = adapter`, `adapter.lora.alpha`, and a
`<base tensor>.lora_a` / `.lora_b` pair per adapted weight) or as a PEFT directory
(`adapter_config.json` + `adapter_model.safetensors`, written by PEFT itself); and what the
engine tests of adapters share."""

from __future__ import annotations

import asyncio
from pathlib import Path

import gguf
import numpy as np
from speculation_cases import chat, greedy, run_on

from llmserve.engines.base import TokenOutput

TARGETS = ("attn_q", "attn_v", "ffn_up")
PEFT_TARGETS = ("q_proj", "v_proj", "up_proj")  # the same weights, by their Hugging Face names


def write_gguf_lora(path: Path, base: Path, *, seed: int, rank: int = 8, alpha: float = 16.0,
                    std: float = 0.05, targets: tuple[str, ...] = TARGETS) -> Path:
    """An adapter of `base` (a GGUF model) at `path`: for every weight named `blk.N.<target>`,
    A (rank x in) and B (out x rank) with normal entries of `std`, seeded."""
    reader = gguf.GGUFReader(base)
    arch = str(bytes(reader.fields["general.architecture"].parts[-1]), "utf-8")
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    for tensor in reader.tensors:
        stem = tensor.name.removesuffix(".weight")
        if not (stem.startswith("blk.") and stem.split(".")[-1] in targets):
            continue
        n_in, n_out = (int(d) for d in tensor.shape[:2])  # GGUF order: ne[0] = inputs
        a = rng.normal(0.0, std, (rank, n_in)).astype(np.float32)
        b = rng.normal(0.0, std, (n_out, rank)).astype(np.float32)
        writer.add_tensor(f"{tensor.name}.lora_a", a)
        writer.add_tensor(f"{tensor.name}.lora_b", b)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_peft_lora(path: Path, hf_dir: Path, *, seed: int, rank: int = 8, alpha: float = 16.0,
                    std: float = 0.05, targets: tuple[str, ...] = PEFT_TARGETS) -> Path:
    """A PEFT LoRA of the Hugging Face model in `hf_dir` at `path` (a directory), its A and B
    matrices normal with entries of `std`, seeded."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32,
                                                 local_files_only=True)
    peft = get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0,
                                            target_modules=list(targets)))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * std)
    peft.save_pretrained(path)
    return path


def reference(engine, tokens: list[TokenOutput]) -> list[dict]:
    """A greedy run's tokens as chat logprobs (what tests/greedy.py reads)."""
    def entry(token: int, lp: float) -> dict:
        data = engine.token_bytes(token)
        return {"token": data.decode("utf-8", "replace"), "bytes": list(data), "logprob": lp}

    return [{**entry(t.token_id, t.logprob),
             "top_logprobs": [entry(tid, lp) for tid, lp in t.top_logprobs]} for t in tokens]


def text(engine, tokens: list[TokenOutput]) -> str:
    return b"".join(engine.token_bytes(t.token_id) for t in tokens
                    if not t.end_of_generation).decode("utf-8", "replace")


async def one(engine, prompt: str, adapter: str | None) -> list[TokenOutput]:
    """24 greedy tokens (top 5 logprobs each) of a chat answer to `prompt` under `adapter`."""
    out: list[TokenOutput] = []
    async for step in engine.generate(chat(engine, prompt), [greedy(24, logprobs=5)],
                                      adapter=adapter):
        out += step
    return out


def alone(engine, prompt: str, adapter: str | None) -> list[TokenOutput]:
    return run_on(engine, lambda e: one(e, prompt, adapter))


def together(engine, cases: list[tuple[str, str | None]]) -> list[list[TokenOutput]]:
    """`one` for every (prompt, adapter) case at once: decoded in the same steps."""
    async def fn(e):
        return await asyncio.gather(*(one(e, p, a) for p, a in cases))

    return run_on(engine, fn)


def check_loading_while_serving(engine, adapter: Path, broken: Path) -> None:
    """What `load_adapter` / `unload_adapter` must do on a serving engine with no adapter:
    a name PEFT could not take as a module name works; a second load of a name, and a broken
    file, are refused with why and change nothing; a request under way when its adapter is
    unloaded finishes under it, and the adapter is freed after it; a later one is refused;
    loaded again, the adapter gives what it gave."""
    import pytest

    from llmserve.engines.base import EngineError

    name = "org/pirate-v1.2"

    async def fn(e):
        base = await one(e, "Hi there", None)
        await e.load_adapter(name, str(adapter), 1.0)
        first = await one(e, "Hi there", name)
        assert text(e, first) != text(e, base)
        with pytest.raises(EngineError, match="loaded already"):
            await e.load_adapter(name, str(adapter), 1.0)
        with pytest.raises(EngineError):
            await e.load_adapter("broken", str(broken), 1.0)
        assert e.adapters == {name: None}
        running = asyncio.create_task(one(e, "Hi there", name))
        while not e._live:  # taken by the loop
            await asyncio.sleep(0.001)
        assert await e.unload_adapter(name) is True
        assert name not in e.adapters
        with pytest.raises(EngineError, match="still finishes its requests"):
            await e.load_adapter(name, str(adapter), 1.0)  # while it runs
        under_way = await running
        assert len(under_way) == len(first)
        assert not e._retiring or await _freed(e)
        with pytest.raises(ValueError, match="no LoRA adapter named"):
            await one(e, "Hi there", name)
        assert await e.unload_adapter(name) is False
        await e.load_adapter(name, str(adapter), 1.0)
        again = await one(e, "Hi there", name)
        return base, first, under_way, again, await one(e, "Hi there", None)

    base, first, under_way, again, base_again = run_on(engine, fn)
    for got, want in ((under_way, first), (again, first), (base_again, base)):
        why = _parting(text(engine, got), reference(engine, want))
        assert why is None, why


async def _freed(engine) -> bool:
    """The loop frees a retired adapter after the step that ends its last request."""
    for _ in range(1000):
        if not engine._retiring:
            return True
        await asyncio.sleep(0.002)
    return False


def _parting(got: str, want: list[dict]) -> str | None:
    from greedy import parting

    return parting(got, want)


def check_adapters_change_the_output(engine, prompt: str) -> None:
    """`a` and `b` each answer `prompt` otherwise than the base and each other."""
    base = text(engine, alone(engine, prompt, None))
    a = text(engine, alone(engine, prompt, "a"))
    b = text(engine, alone(engine, prompt, "b"))
    assert len({base, a, b}) == 3, (base, a, b)


def check_scale_zero_is_the_base(engine, prompt: str) -> None:
    """The adapter `zero` (loaded at scale 0) answers as the base does."""
    base = alone(engine, prompt, None)
    zero = alone(engine, prompt, "zero")
    assert _parting(text(engine, zero), reference(engine, base)) is None


def check_adapters_share_a_step(engine, prompts: list[str]) -> None:
    """Every prompt under the base, `a` and `b`, decoded together: each gets what it gets
    alone (up to near-ties, tests/greedy.py)."""
    cases = [(p, a) for p in prompts for a in (None, "a", "b")]
    by_itself = {case: alone(engine, *case) for case in cases}
    for case, got in zip(cases, together(engine, cases), strict=True):
        why = _parting(text(engine, got), reference(engine, by_itself[case]))
        assert why is None, (case, why)
