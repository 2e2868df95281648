"""tok/s of the vLLM engine in process: 1 and 16 greedy streams of 128 tokens (ignore_eos)."""
import asyncio, os, sys, time
from llmserve.engines.base import SamplingParams
from llmserve.engines.vllm import VllmEngine

async def main(path, dtype):
    t = time.monotonic()
    e = VllmEngine(path, context_length=2048, max_sequences=16, dtype=dtype, threads=2)
    t1 = time.monotonic()
    await e.start()
    t2 = time.monotonic()
    print(f"dtype={dtype} facts {t1-t:.1f}s, start+warmup {t2-t1:.1f}s", flush=True)
    prompt = e.tokenize("<|im_start|>user\nTell me a long story about the sea.<|im_end|>\n<|im_start|>assistant\n", add_bos=False)
    async def one(i=0):
        p = e.tokenize(f"<|im_start|>user\nTell me a long story about the sea, number {i} of many.<|im_end|>\n<|im_start|>assistant\n", add_bos=False)
        n = 0; first = None; t0 = time.monotonic()
        async for step in e.generate(p, [SamplingParams(max_tokens=128, temperature=0.0, ignore_eos=True)]):
            if first is None: first = time.monotonic() - t0
            n += len(step)
        return n, first
    for streams in (1, 16):
        for rep in range(2):
            t0 = time.monotonic()
            res = await asyncio.gather(*(one(i) for i in range(streams)))
            dt = time.monotonic() - t0
            toks = sum(n for n, _ in res)
            print(f"  {streams:2d} streams: {toks} tokens in {dt:.2f}s = {toks/dt:.1f} tok/s "
                  f"({toks/dt/streams:.1f} per stream), ttft {max(f for _, f in res)*1000:.0f} ms", flush=True)
    await e.stop()

if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
