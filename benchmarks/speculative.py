"""Prompt-lookup speculation on the llama.cpp engine (or `--engine transformers`), no HTTP,
at 1 stream: tok/s with it off, on with a draft whenever a guess exists (`always`), and on
with adaptive drafts (llama.cpp), on an input-grounded workload (repeat a given paragraph)
and on free generation. The engines are loaded at once, each in a child process as the server
runs it (see `load`), and run in palindromic rounds (off, always, adaptive, adaptive, always,
off) so that the machine's drift stays out of the ratio.

    PYTHONPATH=. .venv/bin/python benchmarks/speculative.py [--rounds 3] [--tokens 5] [--ngram 3]
        [--engine transformers [--model DIR]]

decode tok/s: tokens after the first over the time from the first to the last (the prompt's
reading is the same on and off); end-to-end: all tokens over the request's whole time.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from llmserve.engines.base import SamplingParams
from llmserve.engines.cpu import weight_repack_enabled
from llmserve.engines.process import EngineProcess
from llmserve.engines.spec import EngineSpec
from llmserve.models import bundled_model_path

PARAGRAPH = (
    "The old lighthouse stood at the edge of the cliff for more than a century, guiding ships "
    "through the narrow strait between the two islands. Its keeper, a quiet man named Elias "
    "Marsh, climbed the spiral stairs every evening to light the great lamp, and every morning "
    "he wrote the weather, the passing ships and the state of the sea in a worn leather book. "
    "When the harbour board decided to replace him with an automatic light, the fishermen of "
    "Port Avery signed a letter asking them to let him stay until the end of the winter, and "
    "the board, to everyone's surprise, agreed."
)
WORKLOADS = {
    # input-grounded: the answer copies the prompt
    "repeat": (f"Repeat this text exactly, word for word: {PARAGRAPH}", False),
    "free": ("Tell me a long story about the sea.", True),  # free generation (ignore_eos)
}


def chat(engine: EngineProcess, text: str) -> list[int]:
    return engine.tokenize(
        f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n", add_bos=False
    )


async def one(engine: EngineProcess, text: str, ignore_eos: bool, max_tokens: int
              ) -> tuple[int, float, float]:
    """Tokens, decode tok/s, end-to-end tok/s of one greedy request."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=ignore_eos)
    n, first, last = 0, 0.0, 0.0
    t0 = time.perf_counter()
    async for step in engine.generate(chat(engine, text), [params]):
        now = time.perf_counter()
        if n == 0:
            first = now
        n += len(step)
        last = now
    return n, (n - 1) / (last - first) if last > first else 0.0, n / (last - t0)


def hf_dir(model: str | None) -> Path:
    """--model, or the bundled GGUF as a Hugging Face directory (where the tests convert it)."""
    if model:
        return Path(model)
    from llmserve.engines.vllm import convert_gguf

    gguf = bundled_model_path()
    out = Path(tempfile.gettempdir()) / f"llmserve-hf-smollm2-{gguf.stat().st_size}"
    if not out.is_dir():
        convert_gguf(gguf, out)
    return out


def load(args: argparse.Namespace, variant: str) -> EngineProcess:
    """`off`, `always` (a draft whenever a guess exists) or `adaptive` (llama.cpp: drafts
    only the lengths that pay, see engines/draft_policy.py), each in a child process as the
    server runs it. Not in this process: engines that take turns here each decode on a thread
    of their own, and with an OpenMP build of llama.cpp every such thread keeps a pool of
    workers, so libgomp soon manages more threads than there are CPUs and throttles every
    barrier's spinning (`off` ran 80 tok/s against 116-123 alone, which had made the ratios
    look 1.45x better than they are)."""
    options = {"speculative": "off" if variant == "off" else "ngram",
               "speculative_tokens": args.tokens, "speculative_ngram": args.ngram,
               "speculative_ngram_min": args.ngram_min, "context_length": 1024,
               "max_sequences": 4, "threads": args.threads}
    if args.engine == "transformers":
        spec = EngineSpec("transformers", hf_dir(args.model), options)
    else:
        spec = EngineSpec("llamacpp", Path(args.model or bundled_model_path()), {
            **options, "weight_repack": weight_repack_enabled(args.weight_repack),
            "speculative_adaptive": variant == "adaptive"})
    return EngineProcess(spec, name=variant)


async def main(args: argparse.Namespace) -> None:
    variants = ["off", "always"] + (["adaptive"] if args.engine == "llamacpp" else [])
    engines = {v: load(args, v) for v in variants}
    for e in engines.values():
        await e.start()
    repack = (f" weight_repack={weight_repack_enabled(args.weight_repack)}"
              if args.engine == "llamacpp" else "")
    print(f"engine={args.engine} speculative_tokens={args.tokens} "
          f"speculative_ngram={args.ngram}..{args.ngram_min} max_tokens={args.max_tokens} "
          f"rounds={args.rounds} threads={args.threads}{repack}, 1 stream, greedy", flush=True)
    print(f"{'workload':8} {'variant':8} {'tokens':>6} {'decode':>7} {'ratio':>6} "
          f"{'e2e':>7} {'ratio':>6} {'accept':>7} {'from drafts':>11}")
    order = variants + variants[::-1]  # palindromic: the machine's drift cancels
    for name, (text, ignore_eos) in WORKLOADS.items():
        for e in engines.values():  # warm-up, unmeasured
            await one(e, text, ignore_eos, 16)
        base = {v: engines[v].spec_decode_stats() for v in variants}
        got: dict[str, list[tuple[int, float, float]]] = {v: [] for v in variants}
        for _ in range(args.rounds):
            for v in order:
                got[v].append(await one(engines[v], text, ignore_eos, args.max_tokens))
        off_d = statistics.median(r[1] for r in got["off"])
        off_e = statistics.median(r[2] for r in got["off"])
        for v in variants:
            d = statistics.median(r[1] for r in got[v])
            e = statistics.median(r[2] for r in got[v])
            stats, before = engines[v].spec_decode_stats(), base[v]
            drafted = stats.draft_tokens - before.draft_tokens if stats else 0
            accepted = stats.accepted_tokens - before.accepted_tokens if stats else 0
            rate = f"{accepted / drafted:7.0%}" if drafted else f"{'-':>7}"
            share = accepted / sum(r[0] for r in got[v])
            print(f"{name:8} {v:8} {got[v][0][0]:6d} {d:7.1f} {d / off_d:5.2f}x "
                  f"{e:7.1f} {e / off_e:5.2f}x {rate} {share:11.0%}", flush=True)
    for e in engines.values():
        await e.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", choices=["llamacpp", "transformers"], default="llamacpp")
    parser.add_argument("--model", help="GGUF file (llamacpp) or model directory (transformers; "
                        "default: the bundled GGUF converted)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=5, help="speculative_tokens")
    parser.add_argument("--ngram", type=int, default=3, help="speculative_ngram")
    parser.add_argument("--ngram-min", type=int, default=2, help="shortest n-gram looked up")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--weight-repack", choices=["auto", "on", "off"], default="auto",
                        help="as the server's flag (default auto, as the server)")
    asyncio.run(main(parser.parse_args()))
