"""tok/s of the vLLM engine split across worker processes on this machine, against one process.

    .venv-vllm/bin/python benchmarks/vllm_parallel.py [--rounds 2] [--streams 16] [--tokens 128]

Each configuration runs in a fresh process (vLLM binds its workers' threads once per process),
in alternating rounds (A B C D, A B C D, ...): greedy streams of `--tokens` tokens each
(ignore_eos), twice per start, on the bundled model converted to a Hugging Face directory.
Ratios are against one process as llmserve runs it by default (eager).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

CONFIGS = {
    "one process (eager)": dict(enforce_eager=True, vllm_args={}),
    "one process (compiled)": dict(enforce_eager=False, vllm_args={}),
    "PP=2 (compiled)": dict(enforce_eager=None, vllm_args={"pipeline_parallel_size": 2}),
    "TP=3 (eager)": dict(enforce_eager=None, vllm_args={"tensor_parallel_size": 3}),
}
BASELINE = "one process (eager)"


async def measure(name: str, path: str, streams: int, tokens: int) -> dict:
    from llmserve.engines.base import SamplingParams
    from llmserve.engines.vllm import VllmEngine

    began = time.monotonic()
    engine = VllmEngine(path, context_length=2048, max_sequences=streams, threads=2,
                        **CONFIGS[name])
    await engine.start()
    started = time.monotonic() - began

    async def one(i: int) -> int:
        text = (f"<|im_start|>user\nTell me a long story about the sea, number {i} of many."
                "<|im_end|>\n<|im_start|>assistant\n")
        prompt = engine.tokenize(text, add_bos=False)
        params = [SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)]
        return sum([len(step) async for step in engine.generate(prompt, params)])

    rates = []
    for _ in range(2):
        t0 = time.monotonic()
        made = sum(await asyncio.gather(*(one(i) for i in range(streams))))
        rates.append(made / (time.monotonic() - t0))
    await engine.stop()
    return {"name": name, "start_s": started, "tok_s": rates}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--streams", type=int, default=16)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--only", choices=list(CONFIGS), help=argparse.SUPPRESS)  # the child
    p.add_argument("--model", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.only:
        result = asyncio.run(measure(args.only, args.model, args.streams, args.tokens))
        print("RESULT " + json.dumps(result), flush=True)
        return

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import hf_model_dir

    model = str(hf_model_dir())
    runs: dict[str, list[float]] = {name: [] for name in CONFIGS}
    starts: dict[str, list[float]] = {name: [] for name in CONFIGS}
    for r in range(args.rounds):
        for name in CONFIGS:
            out = subprocess.run(
                [sys.executable, __file__, "--only", name, "--model", model,
                 "--streams", str(args.streams), "--tokens", str(args.tokens)],
                capture_output=True, text=True, timeout=900)
            line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                print(f"{name}: failed\n{out.stderr[-2000:]}", flush=True)
                continue
            result = json.loads(line[len("RESULT "):])
            runs[name] += result["tok_s"]
            starts[name].append(result["start_s"])
            print(f"round {r + 1} {name}: " + " ".join(f"{x:.1f}" for x in result["tok_s"])
                  + f" tok/s (started in {result['start_s']:.0f} s)", flush=True)

    base = statistics.median(runs[BASELINE]) if runs[BASELINE] else None
    print(f"\n{args.streams} greedy streams x {args.tokens} tokens, median of "
          f"{2 * args.rounds} passes\n")
    print(f"| {'configuration':24} | tok/s | vs {BASELINE} | start (s) |")
    print(f"|{'-' * 26}|------:|{'-' * (len(BASELINE) + 5)}:|----------:|")
    for name in CONFIGS:
        if not runs[name]:
            continue
        med = statistics.median(runs[name])
        ratio = f"{med / base:.2f}x" if base else "-"
        print(f"| {name:24} | {med:5.1f} | {ratio:>{len(BASELINE) + 3}} | "
              f"{statistics.median(starts[name]):9.0f} |")


if __name__ == "__main__":
    main()
