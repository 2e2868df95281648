"""Transformers engine: Hugging Face checkpoints (or GGUF files, dequantized) in PyTorch, with
continuous batching over one left-padded KV cache.

One decode thread owns the model, as in the llama.cpp engine. Each step it takes new
requests and cancellations from its inbox, runs ONE forward pass holding the next token of
every running sequence, reads a piece of at most `prefill_chunk` prompt tokens (the whole
prompt, up to `max_prefill`, when nothing else runs), samples every sequence with its own
parameters, and hands all new tokens to the event loop with a single `call_soon_threadsafe`.

The running sequences share one `DynamicCache` whose tensors are `[batch, heads, columns,
dim]`. Every row is right-aligned: its `n_past` real tokens fill the last `n_past` columns and
the columns before them are zero padding, masked out by a 2D attention mask rebuilt each step
from the rows' lengths. Positions are passed explicitly (`n_past` per row), so a row's
tokens see exactly the positions they would see alone. A decode step appends one column to
every row, which keeps the alignment. A prompt is read into a cache of its own (batch 1, no
padding, so it is read exactly as it would be alone); once read, its rows (one per choice:
n > 1 shares the prompt's KV) join the batch: every part is left-padded to the longest row
and the parts are stacked. A finished or cancelled sequence leaves at once: the remaining
rows are selected, and leading columns that are padding in every row are dropped.

Rows with a grammar (`SamplingParams.grammar`, see engines/grammar.py) have their logits
masked, all in one tensor op, before sampling; forced tokens are sampled one per step here.
"""

from __future__ import annotations

import os

# Nothing here may reach the Hugging Face hub: set before transformers (and huggingface_hub)
# are imported, and every load also passes `local_files_only=True`.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import contextlib
import inspect
import json
import logging
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, DynamicCache

from llmserve.engines import grammar
from llmserve.engines.base import EngineError, SamplingParams, TokenOutput
from llmserve.engines.stepping import (
    Delivery,
    EngineRequest,
    StepLoopEngine,
    StepOutputs,
    finish_reason,
)

log = logging.getLogger(__name__)

# Chat end-of-turn tokens, when the tokenizer has them as special tokens.
_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<end_of_turn>", "<|end|>", "<|END_OF_TURN_TOKEN|>")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@dataclass(eq=False)
class _Sequence:
    request: EngineRequest
    index: int
    params: SamplingParams
    greedy: bool  # argmax with nothing to apply first: sampled for the whole batch at once
    generator: torch.Generator | None = None
    bias_ids: torch.Tensor | None = None
    bias_values: torch.Tensor | None = None
    seen: torch.Tensor | None = None  # [vocab] bool: prompt + generated (repetition penalty)
    counts: torch.Tensor | None = None  # [vocab] float: generated (presence/frequency)
    n_past: int = 0  # tokens held in the KV cache (its row's real columns)
    generated: int = 0
    next_token: int = -1
    matcher: Any = None  # its grammar's llguidance matcher; None: unconstrained


@dataclass(eq=False)
class _Batch:
    """The running sequences, row i of `cache` holding `seqs[i]` (right-aligned)."""

    seqs: list[_Sequence] = field(default_factory=list)
    cache: Any = None  # DynamicCache, or None when empty


class TransformersEngine(StepLoopEngine):
    """A Hugging Face causal LM decoded by PyTorch, many sequences per step."""

    thread_name = "hf-decode"

    def __init__(
        self,
        model_path: str | Path,
        *,
        context_length: int | None = None,
        max_sequences: int = 8,
        dtype: str | torch.dtype = "auto",
        device: str | torch.device = "auto",
        trust_remote_code: bool = False,
        gguf_file: str | None = None,
        threads: int | None = None,
        prefill_chunk: int = 256,
        max_prefill: int = 4096,
    ) -> None:
        if max_sequences < 1:
            raise ValueError("max_sequences must be at least 1")
        self._threads = threads
        if threads:
            torch.set_num_threads(threads)
        self._max_sequences = max_sequences
        self._prefill_chunk = max(1, prefill_chunk)
        self._max_prefill = max(self._prefill_chunk, max_prefill)
        self._device = _resolve_device(device)
        self._dtype = _resolve_dtype(dtype, self._device)

        path, gguf = _check_files(Path(model_path), gguf_file)
        self.model_path = path
        self.gguf_file = gguf
        self._text = HFTokenizer(path, gguf_file=gguf, trust_remote_code=trust_remote_code)
        self._tokenizer = self._text.tokenizer
        self._model = _load_model(path, gguf, self._dtype, trust_remote_code)
        self._model.to(self._device)
        self._model.eval()

        config = self._model.config
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        kinds = set(getattr(text_config, "layer_types", None) or ())
        if kinds - {"full_attention", "sliding_attention"}:
            raise EngineError(
                f"{path}: layer types {sorted(kinds)} are not supported (only attention layers whose "
                "KV cache is a plain [batch, heads, tokens, dim] tensor)"
            )
        self._text_config = text_config
        trained = _max_positions(text_config, self._tokenizer)
        self._context_length = min(context_length or trained, trained)
        out_emb = self._model.get_output_embeddings()
        self._n_vocab = int(
            getattr(out_emb, "out_features", None) or getattr(text_config, "vocab_size", None)
            or len(self._tokenizer)
        )

        forward_params = inspect.signature(self._model.forward).parameters
        self._cache_kw = "cache" if "cache" in forward_params else "past_key_values"
        self._logits_to_keep = "logits_to_keep" in forward_params

        tok = self._tokenizer
        self._bos_id: int | None = tok.bos_token_id
        self._bos_token = _as_str(tok.bos_token)
        self._eos_token = _as_str(tok.eos_token)
        self._chat_template = _chat_template(tok)
        probe = tok("a", add_special_tokens=True)["input_ids"]
        self._add_bos = self._bos_id is not None and bool(probe) and probe[0] == self._bos_id
        self._end_tokens = self._find_end_tokens()
        self._token_bytes = _token_bytes_table(tok, self._n_vocab)
        self._grammars = grammar.Grammars(
            lambda: grammar.hf_tokenizer(self._tokenizer, self._n_vocab, self._end_tokens),
            self._n_vocab, engine_threads=threads,
        )

        self._init_loop()
        # decode-thread state
        self._batch = _Batch()
        self._pending: dict[EngineRequest, Any] = {}  # prompts being read: their own caches

    # -- facts the serving core reads ----------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    def tokenize(self, text: str, *, add_bos: bool) -> list[int]:
        return self._text.tokenize(text, add_bos=add_bos)

    def _find_end_tokens(self) -> frozenset[int]:
        ids: set[int] = set()
        gen = getattr(self._model, "generation_config", None)
        for source in (getattr(gen, "eos_token_id", None),
                       getattr(self._model.config, "eos_token_id", None),
                       getattr(self._text_config, "eos_token_id", None),
                       self._tokenizer.eos_token_id):
            if isinstance(source, int):
                ids.add(source)
            elif isinstance(source, (list, tuple)):
                ids.update(t for t in source if isinstance(t, int))
        added = self._tokenizer.get_added_vocab()
        for text in _END_OF_TURN:
            if text in added:
                ids.add(added[text])
        return frozenset(t for t in ids if 0 <= t < self._n_vocab)

    # -- lifecycle -------------------------------------------------------------------------

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._batch = _Batch()
        self._pending.clear()
        self._model = None
        if self._device.type == "cuda":
            torch.cuda.empty_cache()

    # -- decode thread ---------------------------------------------------------------------

    def serve(self, deliver: Delivery) -> None:
        if self._threads:
            torch.set_num_threads(self._threads)  # OpenMP settings are per thread
        with torch.inference_mode():
            super().serve(deliver)

    def _running(self) -> bool:
        return bool(self._batch.seqs)

    def _reset(self) -> None:
        self._batch = _Batch()
        self._pending.clear()
        self._prefilling.clear()

    def _apply_cancels(self, out: StepOutputs) -> None:
        prefilling = self._prefilling
        for req in [r for r in prefilling if self._all_cancelled(r)]:
            prefilling.remove(req)
            self._pending.pop(req, None)
            req.sequences = []
            out.end(req)
        seqs = self._batch.seqs
        keep = []
        for i, seq in enumerate(seqs):
            req = seq.request
            if req.cancel_all or seq.index in req.cancelled:
                req.sequences.remove(seq)
                if not req.sequences:
                    out.end(req)
            else:
                keep.append(i)
        if len(keep) < len(seqs):
            self._rebuild(keep, [])

    def _admit(self) -> None:
        waiting, prefilling = self._waiting, self._prefilling
        used = len(self._batch.seqs) + sum(len(r.sequences) for r in prefilling)
        # FIFO: a large request at the head waits for room rather than being overtaken forever.
        while waiting and len(waiting[0].params) <= self._max_sequences - used:
            req = waiting.popleft()
            req.prefilled = 0
            req.sequences = [self._new_sequence(req, i, p) for i, p in enumerate(req.params)]
            used += len(req.sequences)
            prefilling.append(req)

    def _new_sequence(self, req: EngineRequest, index: int, p: SamplingParams) -> _Sequence:
        dev, n = self._device, self._n_vocab
        bias = {t: b for t, b in p.logit_bias.items() if 0 <= t < n}
        penalties = p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1.0
        argmax = p.temperature <= 0.0 or p.top_k == 1
        seq = _Sequence(req, index, p, greedy=argmax and not bias and not penalties,
                        matcher=req.matchers[index])
        if not argmax:
            seq.generator = torch.Generator(device=dev)
            seed = p.seed if p.seed is not None else random.getrandbits(63)
            seq.generator.manual_seed(seed % (1 << 64))
        if bias:
            seq.bias_ids = torch.tensor(list(bias), dtype=torch.long, device=dev)
            seq.bias_values = torch.tensor(list(bias.values()), dtype=torch.float32, device=dev)
        if p.repetition_penalty != 1.0:
            seq.seen = torch.zeros(n, dtype=torch.bool, device=dev)
            ids = torch.tensor([t for t in req.prompt if 0 <= t < n], dtype=torch.long, device=dev)
            seq.seen[ids] = True
        if p.presence_penalty or p.frequency_penalty:
            seq.counts = torch.zeros(n, dtype=torch.float32, device=dev)
        return seq

    def _step(self, out: StepOutputs) -> None:
        prefilling = self._prefilling
        batch = self._batch
        keep = list(range(len(batch.seqs)))
        # 1. The next token of every running sequence, in one forward pass.
        if batch.seqs:
            try:
                logits = self._decode(batch)
            except Exception as exc:
                log.exception("decode step failed")
                err = EngineError(f"decode step failed: {exc}")
                for req in dict.fromkeys(s.request for s in batch.seqs):
                    req.sequences = []
                    out.end(req, err)
                self._batch = batch = _Batch()
                keep = []
            else:
                alive = self._sample(batch.seqs, logits, out)
                keep = [i for i, a in enumerate(alive) if a]

        # 2. Prompts: a piece per step while others run, as fast as possible otherwise.
        budget = self._prefill_chunk if keep else self._max_prefill
        joins: list[tuple[Any, list[_Sequence]]] = []
        for req in list(prefilling):
            if budget <= 0:
                break
            take = min(budget, len(req.prompt) - req.prefilled)
            try:
                logits = self._prefill(req, take)
            except Exception as exc:
                log.exception("prefill failed")
                prefilling.remove(req)
                self._pending.pop(req, None)
                req.sequences = []
                out.end(req, EngineError(f"prefill failed: {exc}"))
                continue
            budget -= take
            if req.prefilled < len(req.prompt):
                continue
            prefilling.remove(req)
            cache = self._pending.pop(req)
            req.sequences = [s for s in req.sequences if s.index not in req.cancelled]
            seqs = list(req.sequences)
            if not seqs:
                out.end(req)
                continue
            for seq in seqs:
                seq.n_past = len(req.prompt)
            alive = self._sample(seqs, logits.expand(len(seqs), -1), out)
            staying = [s for s, a in zip(seqs, alive, strict=True) if a]
            if staying:
                joins.append((cache, staying))

        # 3. Finished sequences leave, read prompts join: one new cache for both.
        self._rebuild(keep, joins)

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, cache) -> torch.Tensor:
        kwargs = {self._cache_kw: cache, "use_cache": True}
        if self._logits_to_keep:
            kwargs["logits_to_keep"] = 1
        out = self._model(input_ids=ids, attention_mask=mask, position_ids=positions, **kwargs)
        return out.logits[:, -1, :].float()

    def _decode(self, batch: _Batch) -> torch.Tensor:
        dev = self._device
        seqs = batch.seqs
        columns = _cache_length(batch.cache)
        n_past = torch.tensor([s.n_past for s in seqs], dtype=torch.long, device=dev)
        ids = torch.tensor([[s.next_token] for s in seqs], dtype=torch.long, device=dev)
        # Row r's real tokens are its last n_past columns, then the one fed now.
        cols = torch.arange(columns + 1, device=dev)
        mask = (cols[None, :] >= (columns - n_past)[:, None]).long()
        logits = self._forward(ids, n_past[:, None], mask, batch.cache)
        for seq in seqs:
            seq.n_past += 1
        return logits

    def _prefill(self, req: EngineRequest, take: int) -> torch.Tensor:
        dev = self._device
        cache = self._pending.get(req)
        if cache is None:
            cache = self._pending[req] = DynamicCache()
        start, end = req.prefilled, req.prefilled + take
        ids = torch.tensor([req.prompt[start:end]], dtype=torch.long, device=dev)
        positions = torch.arange(start, end, device=dev)[None, :]
        mask = torch.ones(1, end, dtype=torch.long, device=dev)
        logits = self._forward(ids, positions, mask, cache)
        req.prefilled = end
        return logits

    def _rebuild(self, keep: list[int], joins: list[tuple[Any, list[_Sequence]]]) -> None:
        """Keep rows `keep` of the batch and add the `joins` (a prompt's batch-1 cache and
        the sequences that share it), left-padding every part to the longest row."""
        batch = self._batch
        if len(keep) == len(batch.seqs) and not joins:
            return
        kept = [batch.seqs[i] for i in keep]
        seqs = kept + [s for _, group in joins for s in group]
        if not seqs:
            self._batch = _Batch()
            return
        if not kept and len(joins) == 1 and len(seqs) == 1:
            self._batch = _Batch(seqs, joins[0][0])  # a lone prompt's cache is the batch
            return
        columns = max(s.n_past for s in seqs)
        container = batch.cache if kept else joins[0][0]
        old = _cache_tensors(batch.cache) if kept else None
        parts = [_cache_tensors(cache) for cache, _ in joins]
        index = torch.tensor(keep, dtype=torch.long, device=self._device)
        layers = []
        for li in range(len(parts[0] if parts else old)):
            pair = []
            for kv in range(2):
                ref = old[li][kv] if old is not None else parts[0][li][kv]
                t = ref.new_zeros(len(seqs), ref.shape[1], columns, ref.shape[3])
                row = 0
                if old is not None:
                    src = old[li][kv]
                    span = min(src.shape[2], columns)  # drop columns that are padding everywhere
                    t[: len(kept), :, columns - span:] = src[:, :, src.shape[2] - span:].index_select(0, index)
                    row = len(kept)
                for part, (_, group) in zip(parts, joins, strict=True):
                    src = part[li][kv]  # [1, heads, prompt, dim]: one copy per choice
                    t[row: row + len(group), :, columns - src.shape[2]:] = src
                    row += len(group)
                pair.append(t)
            layers.append(pair)
        _set_cache_tensors(container, layers)
        self._batch = _Batch(seqs, container)

    # -- sampling --------------------------------------------------------------------------

    def _sample(self, seqs: list[_Sequence], logits: torch.Tensor, out: StepOutputs) -> list[bool]:
        """Sample the next token of each sequence from its row of raw `logits`; returns,
        per sequence, whether it goes on."""
        constrained = [i for i, s in enumerate(seqs) if s.matcher is not None]
        masks = {}
        if constrained:
            rows = self._grammars.fill([seqs[i].matcher for i in constrained])
            masks = dict(zip(constrained, rows, strict=True))
            logits = self._mask(logits, constrained, rows)
        argmax = logits.argmax(dim=-1).tolist() if any(s.greedy for s in seqs) else None
        want = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
        logprobs = torch.log_softmax(logits[want], dim=-1) if want else None
        alive = []
        for i, seq in enumerate(seqs):
            p = seq.params
            complete = False
            try:
                self.faults.before_sample(p.seed)
                if seq.matcher is not None:
                    grammar.check(seq.matcher, masks[i])
                token = argmax[i] if seq.greedy else self._pick(seq, logits[i])
                if seq.matcher is not None:
                    complete = grammar.advance(seq.matcher, token)
            except Exception as exc:  # noqa: BLE001 - this request's failure, not the engine's
                log.exception("sampling failed")
                seq.request.fail(exc)
                alive.append(True)  # leaves with its request at the next step's cancels
                continue
            logprob = top = None
            if logprobs is not None and i in want:
                row = logprobs[want.index(i)]
                logprob = float(row[token])
                top = ()
                k = min(p.logprobs, self._n_vocab)
                if k > 0:
                    values, ids = torch.topk(row, k)
                    # a grammar's forbidden tokens (-inf) are no alternative
                    top = tuple((t, v) for t, v in zip(ids.tolist(), values.tolist(), strict=True)
                                if v > float("-inf"))
            seq.generated += 1
            eog = token in self._end_tokens and not p.ignore_eos
            # The new token goes to position n_past next step: room is what is left after it.
            finish = "stop" if complete else finish_reason(
                p, generated=seq.generated, end_of_generation=eog,
                room_left=self._context_length - seq.n_past - 1,
            )
            out.add(seq.request, TokenOutput(seq.index, token, logprob, top, eog, finish))
            seq.next_token = token
            if seq.counts is not None:
                seq.counts[token] += 1
            if seq.seen is not None:
                seq.seen[token] = True
            if finish is not None:
                req = seq.request
                req.sequences.remove(seq)
                if not req.sequences:
                    out.end(req)
            alive.append(finish is None)
        return alive

    def _mask(self, logits: torch.Tensor, rows: list[int], masks) -> torch.Tensor:
        """`logits` with the tokens each constrained row's grammar forbids at -inf (a new
        tensor: `logits` may be one prompt's row expanded to its n choices)."""
        n, dev = logits.shape[-1], logits.device
        if dev.type == "cpu":
            ok = torch.from_numpy(grammar.allowed(masks, n))
        else:  # ship the bits (1/32 of the booleans) and unpack them there
            words = torch.from_numpy(masks).to(dev)
            shifts = torch.arange(32, dtype=torch.int32, device=dev)
            ok = ((words.unsqueeze(-1) >> shifts) & 1).view(len(rows), -1)[:, :n].bool()
        if len(rows) < logits.shape[0]:
            full = torch.ones(logits.shape, dtype=torch.bool, device=dev)
            full[torch.tensor(rows, dtype=torch.long, device=dev)] = ok
            ok = full
        return torch.where(ok, logits, float("-inf"))

    def _pick(self, seq: _Sequence, raw: torch.Tensor) -> int:
        """The llama.cpp engine's chain: logit bias, penalties, then greedy, or temperature,
        top-k, top-p, min-p and a draw from the sequence's own generator."""
        p = seq.params
        x = raw
        if seq.bias_ids is not None:
            x = x.index_add(0, seq.bias_ids, seq.bias_values)
        if seq.seen is not None:
            rp = p.repetition_penalty
            x = torch.where(seq.seen, torch.where(x > 0, x / rp, x * rp), x)
        if seq.counts is not None:
            x = x - p.frequency_penalty * seq.counts - p.presence_penalty * (seq.counts > 0).float()
        if p.temperature <= 0.0 or p.top_k == 1:
            return int(torch.argmax(x))
        x = x / p.temperature
        if 0 < p.top_k < x.shape[0]:
            kth = torch.topk(x, p.top_k).values[-1]
            x = x.masked_fill(x < kth, float("-inf"))
        probs = torch.softmax(x, dim=-1)
        if p.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            before = torch.cumsum(sorted_probs, dim=0) - sorted_probs
            probs[order[before >= p.top_p]] = 0.0  # keeps the token that reaches top_p
        if p.min_p > 0.0:
            probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
        return int(torch.multinomial(probs, 1, generator=seq.generator))


# -- loading -------------------------------------------------------------------------------


def _resolve_device(device: str | torch.device) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    resolved = getattr(torch, str(dtype), None)
    if isinstance(resolved, torch.dtype):
        return resolved
    raise ValueError(f"unknown dtype {dtype!r}")


def _check_files(path: Path, gguf_file: str | None) -> tuple[Path, str | None]:
    """The model directory and GGUF file name; FileNotFoundError naming what is missing."""
    if gguf_file is None and path.suffix == ".gguf" and not path.is_dir():
        path, gguf_file = path.parent, path.name  # a GGUF file given directly
    if not path.is_dir():
        raise FileNotFoundError(f"model directory not found: {path}")
    if gguf_file is not None:
        if not (path / gguf_file).is_file():
            raise FileNotFoundError(f"GGUF file not found: {path / gguf_file}")
        return path, gguf_file
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no config.json in model directory {path}")
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        raise FileNotFoundError(
            f"no tokenizer in model directory {path} (looked for {', '.join(_TOKENIZER_FILES)})"
        )
    return path, None


class HFTokenizer:
    """A Hugging Face tokenizer as the serving core uses it; loads without the weights, so
    the server process can tokenize while the engine runs in its own."""

    def __init__(self, path: str | Path, *, gguf_file: str | None = None,
                 trust_remote_code: bool = False) -> None:
        path, gguf_file = _check_files(Path(path), gguf_file)
        self.tokenizer = _load_tokenizer(path, gguf_file, trust_remote_code)
        self._bos_id: int | None = self.tokenizer.bos_token_id

    def tokenize(self, text: str, *, add_bos: bool) -> list[int]:
        # Added special tokens written in the text (`<|im_start|>`) become those tokens.
        ids = list(self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
        if add_bos and self._bos_id is not None:
            ids.insert(0, self._bos_id)
        return ids


def _load_tokenizer(path: Path, gguf_file: str | None, trust_remote_code: bool):
    kwargs: dict[str, Any] = {"local_files_only": True, "trust_remote_code": trust_remote_code}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    try:
        return AutoTokenizer.from_pretrained(path, **kwargs)
    except OSError as exc:
        raise FileNotFoundError(f"cannot load the tokenizer from {path}: {exc}") from exc


def _load_model(path: Path, gguf_file: str | None, dtype: torch.dtype, trust_remote_code: bool):
    if gguf_file:
        return _load_gguf_model(path, gguf_file, dtype, trust_remote_code)
    try:
        return AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, local_files_only=True, trust_remote_code=trust_remote_code
        )
    except OSError as exc:
        raise FileNotFoundError(f"cannot load the model from {path}: {exc}") from exc


def _load_gguf_model(path: Path, gguf_file: str, dtype: torch.dtype, trust_remote_code: bool):
    """A GGUF file, dequantized into a model built from its config.

    `from_pretrained(gguf_file=...)` wants `accelerate`; building the model from the GGUF's
    config and loading the dequantized tensors needs only transformers and gguf.
    """
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    file = path / gguf_file
    config = AutoConfig.from_pretrained(
        path, gguf_file=gguf_file, local_files_only=True, trust_remote_code=trust_remote_code
    )
    try:  # every weight is overwritten: skip the random init (135M weights: seconds)
        from transformers.initialization import no_init_weights
    except ImportError:
        no_init_weights = contextlib.nullcontext
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(
            config, dtype=dtype, trust_remote_code=trust_remote_code
        )
    tensors = load_gguf_checkpoint(str(file), return_tensors=True, model_to_load=model)["tensors"]
    result = model.load_state_dict(tensors, strict=False)
    model.tie_weights()
    loaded = {p.data_ptr() for name, p in model.named_parameters() if name in tensors}
    missing = [k for k in result.missing_keys if model.get_parameter(k).data_ptr() not in loaded]
    if missing:
        raise EngineError(f"{file} has no weights for {', '.join(missing[:5])}")
    return model


def _max_positions(config, tokenizer) -> int:
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    value = getattr(tokenizer, "model_max_length", None)
    if isinstance(value, int) and 0 < value < 10**7:
        return value
    return 2048


def _as_str(token: Any) -> str:
    if token is None:
        return ""
    return str(getattr(token, "content", token))


def _chat_template(tokenizer) -> str | None:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default") or next(iter(template.values()), None)
    return template or None


# -- token bytes ---------------------------------------------------------------------------


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-to-unicode table, reversed: the character a byte-level BPE vocabulary
    writes for each byte -> that byte."""
    visible = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(visible)
    extra = 0
    for b in range(256):
        if b not in visible:
            visible.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(visible, chars, strict=True)}


def _vocab_kind(tokenizer, tokens: list[str | None]) -> str:
    """'bytelevel' (GPT-2 style), 'sentencepiece' (▁ and <0xNN>) or 'plain'."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None) if backend is not None else None
    if decoder is not None:
        try:
            spec = json.dumps(json.loads(decoder.__getstate__()))
        except Exception:  # noqa: BLE001 - fall back to looking at the vocabulary
            spec = ""
        if '"ByteLevel"' in spec:
            return "bytelevel"
        if "ByteFallback" in spec or "Metaspace" in spec or "\\u2581" in spec:
            return "sentencepiece"
    bytelevel = sum(1 for t in tokens if t and "Ġ" in t)
    spm = sum(1 for t in tokens if t and "▁" in t)
    if bytelevel > spm:
        return "bytelevel"
    return "sentencepiece" if spm else "plain"


def _token_bytes_table(tokenizer, n_vocab: int) -> list[bytes]:
    n_tok = min(len(tokenizer), n_vocab)
    tokens = tokenizer.convert_ids_to_tokens(list(range(n_tok)))
    special = set(tokenizer.all_special_ids)
    added_text: dict[int, str] = {}
    for tid, added in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if getattr(added, "special", False):
            special.add(tid)
        else:
            added_text[tid] = str(added)  # written as plain text, not byte-level characters
    kind = _vocab_kind(tokenizer, tokens)
    byte_decoder = _byte_decoder()
    table: list[bytes] = []
    for tid, tok in enumerate(tokens):
        if tok is None or tid in special:
            table.append(b"")
        elif tid in added_text:
            table.append(added_text[tid].encode())
        elif kind == "bytelevel":
            try:
                table.append(bytes(byte_decoder[c] for c in tok))
            except KeyError:
                table.append(tok.encode())
        elif kind == "sentencepiece":
            m = _BYTE_FALLBACK.match(tok)
            table.append(bytes([int(m.group(1), 16)]) if m else tok.replace("▁", " ").encode())
        else:
            table.append(tokenizer.convert_tokens_to_string([tok]).encode())
    table.extend(b"" for _ in range(n_vocab - n_tok))  # model rows with no token
    return table


# -- DynamicCache tensors ------------------------------------------------------------------


def _cache_tensors(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache, strict=True))  # transformers < 4.56


def _set_cache_tensors(cache, tensors: list[list[torch.Tensor]]) -> None:
    if hasattr(cache, "layers"):
        for layer, (k, v) in zip(cache.layers, tensors, strict=True):
            layer.keys, layer.values = k, v
    else:
        cache.key_cache = [k for k, _ in tensors]
        cache.value_cache = [v for _, v in tensors]


def _cache_length(cache) -> int:
    return int(cache.get_seq_length()) if cache is not None else 0

