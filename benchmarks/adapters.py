"""LoRA adapters: 16 greedy streams of 128 tokens spread over the base and 3 adapters (4
each) against 16 on the base alone, and against 16 on one adapter. In-process (the engine's
cost, no HTTP), the bundled model with rank-8 adapters on q, v and the MLP's up projection
(tests/lora.py), in palindromic blocks A B C C B A. On llama.cpp (GGUF LoRAs: one llama_decode
per adapter per step), transformers (the model as a Hugging Face directory, PEFT adapters: one
forward pass per step, PEFT's mixed batches) or vLLM (the same directories as LoRARequests,
--max-loras 4; run it with the vLLM venv's python).

    PYTHONPATH=.:tests .venv/bin/python benchmarks/adapters.py [--rounds 2] [--engine transformers]
    PYTHONPATH=.:tests .venv-vllm/bin/python benchmarks/adapters.py --engine vllm
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from lora import write_gguf_lora, write_peft_lora
from speculation_cases import chat

from llmserve.engines.base import SamplingParams
from llmserve.models import bundled_model_path

STREAMS = 16
TOKENS = 128
QUESTIONS = ["Write a long essay about the history of Rome.", "Explain how rain forms.",
             "Describe a walk through a forest.", "Tell me about the planets.",
             "Why do cats purr?", "How does a bicycle work?", "What is music?",
             "Describe the ocean at night."]
CASES = {"base only": [None] * STREAMS,
         "one adapter": ["a1"] * STREAMS,
         "base + 3 adapters": [None, "a1", "a2", "a3"] * (STREAMS // 4)}


async def block(engine: Any, adapters: list[str | None], nonce: int) -> float:
    """Tokens per second of one burst of streams (fresh prompts: a nonce opens each)."""
    params = [SamplingParams(max_tokens=TOKENS, temperature=0.0, ignore_eos=True)]

    async def one(i: int, adapter: str | None) -> int:
        prompt = chat(engine, f"({nonce}-{i}) {QUESTIONS[i % len(QUESTIONS)]}")
        n = 0
        async for step in engine.generate(prompt, params, adapter=adapter):
            n += len(step)
        return n

    start = time.perf_counter()
    counts = await asyncio.gather(*(one(i, a) for i, a in enumerate(adapters)))
    return sum(counts) / (time.perf_counter() - start)


def load(kind: str) -> Any:
    folder = Path(tempfile.mkdtemp())
    if kind == "llamacpp":
        from llmserve.engines.llamacpp import LlamaCppEngine

        base = bundled_model_path()
        adapters = {f"a{i}": (str(write_gguf_lora(folder / f"a{i}.gguf", base, seed=i)), 1.0)
                    for i in (1, 2, 3)}
        return LlamaCppEngine(base, context_length=512, max_sequences=STREAMS, threads=2,
                              adapters=adapters)
    from conftest import hf_model_dir

    base = hf_model_dir()
    adapters = {f"a{i}": (str(write_peft_lora(folder / f"a{i}", base, seed=i)), 1.0)
                for i in (1, 2, 3)}
    if kind == "vllm":
        import os

        from llmserve.engines.vllm import VllmEngine

        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0-1")
        return VllmEngine(base, context_length=512, max_sequences=STREAMS, dtype="float32",
                          threads=2, vllm_args={"max_loras": 4, "max_lora_rank": 8},
                          adapters=adapters)
    from llmserve.engines.transformers import TransformersEngine

    return TransformersEngine(base, context_length=512, max_sequences=STREAMS, threads=2,
                              adapters=adapters)


async def main(rounds: int, kind: str) -> None:
    engine = load(kind)
    await engine.start()
    try:
        await block(engine, CASES["base + 3 adapters"], -1)  # warm-up, untimed
        results: dict[str, list[float]] = {name: [] for name in CASES}
        order = list(CASES)
        nonce = 0
        for r in range(rounds):
            for name in order if r % 2 == 0 else order[::-1]:
                nonce += 1
                results[name].append(await block(engine, CASES[name], nonce))
    finally:
        await engine.stop()
    baseline = statistics.median(results["base only"])
    print(f"{'case':<20} {'tok/s (median)':>15} {'runs':>24} {'vs base only':>13}")
    for name, runs in results.items():
        med = statistics.median(runs)
        print(f"{name:<20} {med:>15.1f} {' '.join(f'{x:.1f}' for x in runs):>24} "
              f"{med / baseline:>12.2f}x")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--engine", choices=("llamacpp", "transformers", "vllm"),
                        default="llamacpp")
    args = parser.parse_args()
    asyncio.run(main(args.rounds, args.engine))
