"""The bench's baseline for the transformers engine: Hugging Face `model.generate` on the
same prompts and the same weights, in the same run.

Each level's requests go in static batches of the level's size: left-padded to the longest
prompt, greedy, every row generating exactly `max_tokens` (min_new_tokens = max_new_tokens,
as `ignore_eos` does for llmserve). No server, no streaming, nobody joining mid-batch: what
plain batched generation of this model does on this machine. A request's "arrivals" are the
times its batch's steps produced a token (a logits processor notes them), so its time to
first token is its batch's prefill.
"""

from __future__ import annotations

import time
from pathlib import Path

import llmserve.engines.hf_offline  # noqa: F401 - before transformers

# isort: split

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from llmserve.bench.load import Timing
from llmserve.bench.report import LevelResult, summarize
from llmserve.engines import hf_loading


class _StepClock(LogitsProcessor):
    """Notes when each generation step's logits are ready (one token per row)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.times.append(time.perf_counter())
        return scores


class HFGenerate:
    """The model behind `model_path` (a directory, or a GGUF file dequantized as the
    transformers engine loads it), ready to `measure` one level."""

    system = "hf generate"  # its name in the bench's table

    def __init__(self, model_path: Path, *, threads: int | None = None, device: str = "auto",
                 dtype: str = "auto") -> None:
        if threads:
            torch.set_num_threads(threads)
        self._threads = threads
        path, gguf = hf_loading.check_files(Path(model_path), None)
        self._device = hf_loading.resolve_device(device)
        self._text = hf_loading.HFTokenizer(path, gguf_file=gguf)
        tokenizer = self._text.tokenizer
        # what the bench renders its chat prompts with, as it does for the engine
        self.chat_template = hf_loading.chat_template(tokenizer)
        self.bos_token = hf_loading.as_str(tokenizer.bos_token)
        self.eos_token = hf_loading.as_str(tokenizer.eos_token)
        dtype_ = hf_loading.resolve_dtype(dtype, self._device)
        self._model = hf_loading.load_model(path, gguf, dtype_, False).to(self._device).eval()
        pad = tokenizer.pad_token_id
        if pad is None:
            pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        self._pad = int(pad)

    def tokenize(self, text: str, *, add_bos: bool) -> list[int]:
        return self._text.tokenize(text, add_bos=add_bos)

    def generate(self, prompts: list[list[int]], max_tokens: int) -> tuple[list[list[int]], list[float]]:
        """One static batch: every prompt's `max_tokens` greedy tokens, and the step times."""
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[self._pad] * (width - len(p)) + p for p in prompts],
                           device=self._device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts],
                            device=self._device)
        config = GenerationConfig(do_sample=False, max_new_tokens=max_tokens,
                                  min_new_tokens=max_tokens, pad_token_id=self._pad,
                                  eos_token_id=self._model.generation_config.eos_token_id)
        clock = _StepClock()
        if self._threads:
            torch.set_num_threads(self._threads)  # per thread: the bench's event loop thread
        with torch.inference_mode():
            out = self._model.generate(input_ids=ids, attention_mask=mask,
                                       generation_config=config,
                                       logits_processor=LogitsProcessorList([clock]))
        return out[:, width:].tolist(), clock.times

    def measure(self, prompts: list[list[int]], concurrency: int, requests: int,
                max_tokens: int) -> LevelResult:
        """`requests` requests (prompt i is `prompts[i % len(prompts)]`) in static batches
        of `concurrency`."""
        self.generate([prompts[0]], 4)  # warm, not measured
        timings: list[Timing] = []
        cpu0, wall0 = time.process_time(), time.perf_counter()
        for first in range(0, requests, concurrency):
            batch = [prompts[i % len(prompts)] for i in range(first, min(first + concurrency, requests))]
            start = time.perf_counter()
            tokens, steps = self.generate(batch, max_tokens)
            end = time.perf_counter()
            timings += [Timing(start=start, end=end, arrivals=list(steps), tokens=len(t))
                        for t in tokens]
        result = summarize(self.system, concurrency, timings, time.perf_counter() - wall0)
        result.cpu_s = time.process_time() - cpu0
        return result

    def close(self) -> None:
        self._model = None
