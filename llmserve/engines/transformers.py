"""Transformers engine: Hugging Face checkpoints (or GGUF files, dequantized) in PyTorch, with
continuous batching over a KV cache of one slot per sequence (engines/hf_cache.py).

One decode thread owns the model, as in the llama.cpp engine. Each step it takes new
requests and cancellations from its inbox, runs ONE forward pass holding the next token of
every running sequence, then one holding pieces of the prompts being read (while others
decode, up to `prefill_chunk` tokens for each prompt waiting; up to `max_prefill` in all),
samples every sequence that has new logits in one batched draw
(engines/hf_sampling.py), and hands all new tokens to the event loop with a single
`call_soon_threadsafe`.

A request is given its slots (one per choice) when it is admitted. Its prompt is read into
the first of them, in pieces, several prompts side by side in one forward pass; once read,
the other choices' slots get a copy of it. A slot's token at position p lives in column p,
so a decode step writes one column per sequence and nothing ever moves: a sequence that
joins or leaves touches only its own slot. Slots are taken lowest first, so the decode pass
runs over slots `[0, highest in use]`; a free slot among them is computed and ignored.

Rows with a grammar (`SamplingParams.grammar`, see engines/grammar.py) have their logits
masked, all in one tensor op, before sampling; forced tokens are sampled one per step here.

With `speculative="ngram"` a sequence decoding alone has a draft of its next tokens
(engines/ngram_draft.py, prompt lookup) read in the same forward pass as its next token,
with logits at every position; it is sampled row after row exactly as one token per step
would be, as long as what it samples is what was drafted (`_sample_drafted`).
"""

from __future__ import annotations

import heapq
import inspect
import itertools
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llmserve.engines import grammar, hf_loading
from llmserve.engines.base import EngineError, SamplingParams, SpecCounter, TokenOutput
from llmserve.engines.cpu import usable_cpus
from llmserve.engines.hf_cache import Placement, SlotCache, attention_masks
from llmserve.engines.hf_sampling import Sampler, draw_keys
from llmserve.engines.ngram_draft import NgramIndex, PromptLookup
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
_ATTENTION = ("sdpa", "eager")  # implementations that take our 4D masks as they are


@dataclass(eq=False)
class _Sequence:
    request: EngineRequest
    index: int
    params: SamplingParams
    slot: int  # its row of the KV cache and of the sampler's tables
    keys: tuple[int, int]  # its sampling noise's keys (engines.hf_sampling)
    n_past: int = 0  # tokens held in the KV cache: columns [0, n_past) of its slot
    generated: int = 0
    next_token: int = -1  # sampled, not in the KV cache yet: it goes to column n_past
    matcher: Any = None  # its grammar's llguidance matcher; None: unconstrained
    generated_ids: list[int] = field(default_factory=list)
    ngrams: NgramIndex | None = None  # its context, for drafting (built on first use)


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
        speculative: str = "off",
        speculative_tokens: int = 5,
        speculative_ngram: int = 3,
        speculative_ngram_min: int = 2,
        adapters: Mapping[str, tuple[str, float]] | None = None,
    ) -> None:
        if max_sequences < 1:
            raise ValueError("max_sequences must be at least 1")
        if speculative not in ("off", "ngram"):
            raise ValueError(f"speculative: ngram or off, not {speculative!r}")
        # Prompt-lookup speculation (engines/ngram_draft.py), for a sequence decoding alone.
        self._speculative = speculative == "ngram" and speculative_tokens > 0
        self._lookup = PromptLookup(speculative_tokens, speculative_ngram, speculative_ngram_min)
        self._spec = SpecCounter() if self._speculative else None
        # torch's default is the host's cores, even under a container's smaller CPU quota
        self._threads = threads = threads or min(torch.get_num_threads(), usable_cpus())
        torch.set_num_threads(threads)
        self._max_sequences = max_sequences
        self._prefill_chunk = max(1, prefill_chunk)
        self._max_prefill = max(self._prefill_chunk, max_prefill)
        self._device = hf_loading.resolve_device(device)
        self._dtype = hf_loading.resolve_dtype(dtype, self._device)

        path, gguf = hf_loading.check_files(Path(model_path), gguf_file)
        self.model_path = path
        self.gguf_file = gguf
        self._text = hf_loading.HFTokenizer(path, gguf_file=gguf, trust_remote_code=trust_remote_code)
        self._tokenizer = self._text.tokenizer
        self._model = hf_loading.load_model(path, gguf, self._dtype, trust_remote_code)
        self._model.to(self._device)
        self._model.eval()

        config = self._model.config
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        self._text_config = text_config
        self._layer_kinds, self._sliding_window = _attention_kinds(path, text_config)
        attn = getattr(config, "_attn_implementation", None) or "eager"
        if attn not in _ATTENTION:
            raise EngineError(f"{path}: attention implementation {attn!r} is not supported "
                              f"(one of {', '.join(_ATTENTION)})")
        self._additive_mask = self._dtype if attn == "eager" else None
        trained = hf_loading.max_positions(text_config, self._tokenizer)
        self._context_length = min(context_length or trained, trained)
        out_emb = self._model.get_output_embeddings()
        self._n_vocab = int(
            getattr(out_emb, "out_features", None) or getattr(text_config, "vocab_size", None)
            or len(self._tokenizer)
        )

        forward_params = inspect.signature(self._model.forward).parameters
        self._cache_kw = "cache" if "cache" in forward_params else "past_key_values"
        self._logits_to_keep = "logits_to_keep" in forward_params
        # LoRA adapters (PEFT directories): the model is wrapped in PEFT's PeftModel once one
        # loads, and every forward pass names each row's adapter (PEFT's mixed batches), so
        # base and adapter sequences share every step. One that fails is refused with why.
        self._peft: Any = None
        self._lora_names: dict[str, str] = {}  # served name -> PEFT's name
        self._lora_ids = itertools.count()
        self._adapters = {name: self._load_adapter(name, Path(path), scale)
                          for name, (path, scale) in (adapters or {}).items()}

        tok = self._tokenizer
        self._bos_id: int | None = tok.bos_token_id
        self._bos_token = hf_loading.as_str(tok.bos_token)
        self._eos_token = hf_loading.as_str(tok.eos_token)
        self._chat_template = hf_loading.chat_template(tok)
        probe = tok("a", add_special_tokens=True)["input_ids"]
        self._add_bos = self._bos_id is not None and bool(probe) and probe[0] == self._bos_id
        self._end_tokens = self._find_end_tokens()
        self._token_bytes = hf_loading.token_bytes_table(tok, self._n_vocab)
        self._grammars = grammar.Grammars(
            lambda: grammar.hf_tokenizer(self._tokenizer, self._n_vocab, self._end_tokens),
            self._n_vocab, engine_threads=threads,
        )

        self._cache = SlotCache(int(text_config.num_hidden_layers), max_sequences,
                                self._context_length)
        self._sampler = Sampler(max_sequences, self._n_vocab, self._device)
        self._allocate_cache()
        self._init_loop()
        # decode-thread state
        self._free: list[int] = list(range(max_sequences))  # a heap: lowest slot first
        self._slots: list[_Sequence | None] = [None] * max_sequences  # decoding, by slot

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

    def _allocate_cache(self) -> None:
        """Every layer's slots, allocated now by one forward pass of one token (their shapes
        are the model's own), so that a cache too big fails the load, not a request."""
        where = _placement([0], [0], [0], [0], 1, self._device)
        ids = torch.zeros(1, 1, dtype=torch.long, device=self._device)
        positions = torch.zeros(1, 1, dtype=torch.long, device=self._device)
        with torch.inference_mode():
            self._run(ids, positions, where)
        log.info("KV cache: %d slots x %d positions, %.0f MiB", self._max_sequences,
                 self._context_length, self._cache.bytes() / 2**20)

    # -- facts the serving core reads ----------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    def tokenize(self, text: str, *, add_bos: bool) -> list[int]:
        return self._text.tokenize(text, add_bos=add_bos)

    def detokenize(self, ids: list[int]) -> str:
        return self._text.detokenize(ids)

    def token_strs(self, ids: list[int]) -> list[str]:
        return self._text.token_strs(ids)

    # -- lifecycle -------------------------------------------------------------------------

    def _load_adapter(self, name: str, path: Path, scale: float) -> str | None:
        """Load one PEFT LoRA directory: None, or why it cannot be used."""
        for needed in ("adapter_config.json", "adapter_model.safetensors"):
            if not (path / needed).is_file():
                return f"not a PEFT adapter directory (no {needed}): {path}"
        # PEFT names its modules after adapters: a served name ("org/x-v1.2") may not be one
        inner = f"lora_{next(self._lora_ids)}"
        try:
            from peft import PeftConfig, PeftModel
            from peft.tuners.lora import LoraLayer
            from safetensors import safe_open

            config = PeftConfig.from_pretrained(str(path), local_files_only=True)
            if str(config.peft_type) not in ("LORA", "PeftType.LORA"):
                return f"{path}: a {config.peft_type} adapter, not LoRA"
            # a damaged file fails here, before PEFT has added any layer to the model
            with safe_open(str(path / "adapter_model.safetensors"), "pt") as weights:
                weights.keys()
            if self._peft is None:
                self._peft = PeftModel.from_pretrained(self._model, str(path), adapter_name=inner,
                                                       config=config, local_files_only=True)
                self._peft.eval()
            else:
                self._peft.load_adapter(str(path), adapter_name=inner, local_files_only=True)
            for module in self._peft.modules():
                if isinstance(module, LoraLayer):
                    module.set_scale(inner, scale)
        except Exception as exc:
            log.error("LoRA adapter %s (%s) failed to load: %s", name, path, exc)
            self._drop_adapter(inner)
            return f"{path} is not a LoRA adapter of this model: {exc}"
        self._lora_names[name] = inner
        return None

    def _free_adapter(self, name: str) -> None:
        inner = self._lora_names.pop(name, None)
        if inner is not None:
            self._drop_adapter(inner)

    def _drop_adapter(self, inner: str) -> None:
        """Remove an adapter, or what a failed load left of one (PEFT adds its layers before
        it reads weights); after the last, the model is unwrapped (PEFT cannot be left
        with none)."""
        if self._peft is None or inner not in self._peft.peft_config:
            return
        try:
            others = [n for n in self._peft.peft_config if n != inner]
            if not others:
                self._model = self._peft.unload()
                self._peft = None
                return
            self._peft.delete_adapter(inner)
            self._peft.set_adapter(others[0])  # PEFT reads the active one's config each pass
        except Exception:
            log.exception("could not remove adapter %s", inner)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._reset()
        self._model = None
        self._peft = None
        self._cache = None
        if self._device.type == "cuda":
            torch.cuda.empty_cache()

    # -- decode thread ---------------------------------------------------------------------

    def serve(self, deliver: Delivery) -> None:
        if self._threads:
            torch.set_num_threads(self._threads)  # OpenMP settings are per thread
        with torch.inference_mode():
            super().serve(deliver)

    def _running(self) -> bool:
        return any(s is not None for s in self._slots)

    def _decoding(self) -> list[_Sequence]:
        return [s for s in self._slots if s is not None]

    def _reset(self) -> None:
        self._slots = [None] * self._max_sequences
        self._free = list(range(self._max_sequences))
        self._prefilling.clear()

    def _release(self, seq: _Sequence) -> None:
        if self._slots[seq.slot] is seq:
            self._slots[seq.slot] = None
        heapq.heappush(self._free, seq.slot)

    def _leave(self, seq: _Sequence, out: StepOutputs) -> None:
        """A decoding sequence is done: its slot is free, its request ends with its last."""
        self._release(seq)
        req = seq.request
        req.sequences.remove(seq)
        if not req.sequences:
            out.end(req)

    def _apply_cancels(self, out: StepOutputs) -> None:
        prefilling = self._prefilling
        for req in [r for r in prefilling if self._all_cancelled(r)]:
            prefilling.remove(req)
            for seq in req.sequences:
                self._release(seq)
            req.sequences = []
            out.end(req)
        for seq in self._decoding():
            req = seq.request
            if req.cancel_all or seq.index in req.cancelled:
                self._leave(seq, out)

    def _admit(self) -> None:
        waiting, prefilling = self._waiting, self._prefilling
        # FIFO: a large request at the head waits for room rather than being overtaken forever.
        while waiting and len(waiting[0].params) <= len(self._free):
            req = waiting.popleft()
            req.prefilled = 0
            req.sequences = [self._new_sequence(req, i, p) for i, p in enumerate(req.params)]
            prefilling.append(req)

    def _new_sequence(self, req: EngineRequest, index: int, p: SamplingParams) -> _Sequence:
        slot = heapq.heappop(self._free)
        self._sampler.admit(slot, p, req.prompt)
        return _Sequence(req, index, p, slot, draw_keys(p.seed), matcher=req.matchers[index])

    def _step(self, out: StepOutputs) -> None:
        # 1. The next token of every decoding sequence, in one forward pass.
        rows: list[_Sequence] = []
        logits: list[torch.Tensor] = []
        decoding = self._decoding()
        # A sequence decoding alone reads a draft of its next tokens in the same pass (only
        # alone, as in the llama.cpp engine: with others every row would be as wide as the
        # longest draft, its padding computed for nothing).
        draft = (self._propose(decoding[0])
                 if self._speculative and len(decoding) == 1 else [])
        drafted: torch.Tensor | None = None
        if decoding:
            try:
                if draft:
                    drafted = self._decode_drafted(decoding[0], draft)
                else:
                    logits.append(self._decode(decoding))
                    rows += decoding
            except Exception as exc:
                log.exception("decode step failed")
                err = EngineError(f"decode step failed: {exc}")
                for seq in decoding:
                    self._release(seq)
                for req in dict.fromkeys(s.request for s in decoding):
                    req.sequences = []
                    out.end(req, err)
        if drafted is not None:
            self._sample_drafted(decoding[0], draft, drafted, out)
        # 2. Pieces of prompts, side by side (`_prefill_budget`); those read to the end join
        # the draw below.
        if self._prefilling:
            read, last = self._prefill(self._prefill_budget(bool(decoding), self._max_prefill),
                                       out)
            for req, row in zip(read, last, strict=True):
                for seq in self._join(req, out):
                    rows.append(seq)
                    logits.append(row[None])
        # 3. One draw for all of them.
        if rows:
            self._sample(rows, torch.cat(logits) if len(logits) > 1 else logits[0], out)

    def _join(self, req: EngineRequest, out: StepOutputs) -> list[_Sequence]:
        """A prompt is read: its choices' slots get a copy of it (read into the first), the
        cancelled ones' slots are freed, and the others start decoding."""
        home = req.sequences[0].slot
        staying = [s for s in req.sequences if s.index not in req.cancelled]
        n = len(req.prompt)
        others = [s.slot for s in staying if s.slot != home]
        if others:
            self._cache.copy_prefix(home, others, n)
        for seq in req.sequences:
            if seq not in staying:
                self._release(seq)
        req.sequences = staying
        if not staying:
            out.end(req)
        for seq in staying:
            seq.n_past = n
            self._slots[seq.slot] = seq
        return staying

    def _run(self, ids: torch.Tensor, positions: torch.Tensor, where: Placement,
             keep: int = 1, adapters: list[str | None] | None = None) -> torch.Tensor:
        """`_forward` over the cache placed as `where`; `adapters`: each row's LoRA adapter
        (None: the base; all base when not given)."""
        self._cache.place(where)
        mask = attention_masks(positions, where.length, kinds=self._layer_kinds,
                               sliding_window=self._sliding_window, additive=self._additive_mask)
        return self._forward(ids, positions, mask, self._cache, keep, adapters)

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, mask, cache,
                 keep: int = 1, adapters: list[str | None] | None = None) -> torch.Tensor:
        """The last position's logits of every row (float32), `[rows, vocab]`; with `keep`
        > 1 the last `keep` positions' logits, `[rows, keep, vocab]`."""
        kwargs: dict[str, Any] = {self._cache_kw: cache, "use_cache": True}
        if self._logits_to_keep:
            kwargs["logits_to_keep"] = keep
        model = self._model
        if self._peft is not None:
            model = self._peft
            names = self._lora_names
            kwargs["adapter_names"] = ([names[a] if a else "__base__" for a in adapters]
                                       if adapters else ["__base__"] * ids.shape[0])
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, **kwargs)
        if keep == 1:
            return out.logits[:, -1, :].float()
        return out.logits[:, -keep:, :].float()

    def _decode(self, seqs: list[_Sequence]) -> torch.Tensor:
        """Logits `[len(seqs), vocab]`. Rows are slots `[0, highest in use]`: a free slot
        among them reads column 0 and writes nothing."""
        dev = self._device
        top = seqs[-1].slot + 1
        ids = [0] * top
        pos = [0] * top
        names: list[str | None] = [None] * top
        for s in seqs:
            ids[s.slot] = s.next_token
            pos[s.slot] = s.n_past
            names[s.slot] = s.request.adapter
        slots = [s.slot for s in seqs]
        columns = [s.n_past for s in seqs]
        where = _placement(slots, [0] * len(seqs), slots, columns, max(columns) + 1, dev,
                           in_place=True)
        logits = self._run(torch.tensor(ids, device=dev)[:, None],
                           torch.tensor(pos, device=dev)[:, None], where, adapters=names)
        for s in seqs:
            s.n_past += 1
        if len(seqs) < top:
            logits = logits.index_select(0, torch.tensor(slots, device=dev))
        return logits

    def _decode_drafted(self, seq: _Sequence, draft: list[int]) -> torch.Tensor:
        """Logits `[1 + len(draft), vocab]` of `seq`'s next token and its draft, read in one
        pass into columns `n_past...` of its slot. Only its next token counts as held
        (`n_past` + 1): a drafted column becomes part of the sequence when its token is
        sampled, and one rejected is beyond `n_past`, masked from every query (each sees
        columns up to its own position) and overwritten before a later token reads it."""
        dev = self._device
        tokens = [seq.next_token, *draft]
        n = len(tokens)
        columns = list(range(seq.n_past, seq.n_past + n))
        # slot 0 is row 0: read in place; another slot is gathered
        where = _placement([0] * n, list(range(n)), [seq.slot] * n, columns, columns[-1] + 1,
                           dev, slots=[seq.slot], in_place=seq.slot == 0)
        logits = self._run(torch.tensor([tokens], device=dev), torch.tensor([columns], device=dev),
                           where, keep=n, adapters=[seq.request.adapter])
        seq.n_past += 1
        return logits[0]

    def _propose(self, seq: _Sequence) -> list[int]:
        """A draft of the tokens after `seq`'s next one: what followed the latest earlier
        occurrence of its last few tokens, no more than it may still generate, nor than the
        context holds (a token sampled in its last column ends the sequence unread)."""
        if seq.ngrams is None:
            seq.ngrams = self._lookup.new_index()
        room = min(seq.params.max_tokens - seq.generated - 1, self._context_length - seq.n_past - 2)
        return self._lookup.propose(seq.ngrams, seq.request.prompt, seq.generated_ids, room)

    def _prefill(self, budget: int, out: StepOutputs) -> tuple[list[EngineRequest], list[torch.Tensor]]:
        """Read up to `budget` prompt tokens, first come first served, each prompt's piece a
        row of one forward pass; returns the prompts read to the end and their last logits."""
        pieces: list[tuple[EngineRequest, int, int]] = []
        for req in self._prefilling:
            if budget <= 0:
                break
            take = min(budget, len(req.prompt) - req.prefilled)
            pieces.append((req, req.prefilled, take))
            budget -= take
        dev = self._device
        width = max(take for _, _, take in pieces)
        ids, pos = [], []
        at_row, at_token, at_slot, at_column = [], [], [], []
        for b, (req, start, take) in enumerate(pieces):
            # Left padding: every row's last token is the last column, where logits are kept.
            # A pad repeats the first token's position (it sees what that token sees) and is
            # written nowhere.
            pad = width - take
            ids.append([0] * pad + req.prompt[start:start + take])
            pos.append([start] * pad + list(range(start, start + take)))
            slot = req.sequences[0].slot
            at_row += [b] * take
            at_token += range(pad, width)
            at_slot += [slot] * take
            at_column += range(start, start + take)
        slots = [req.sequences[0].slot for req, _, _ in pieces]
        where = _placement(at_row, at_token, at_slot, at_column,
                           max(start + take for _, start, take in pieces), dev, slots=slots)
        try:
            logits = self._run(torch.tensor(ids, device=dev), torch.tensor(pos, device=dev), where,
                               adapters=[req.adapter for req, _, _ in pieces])
        except Exception as exc:
            log.exception("prefill failed")
            err = EngineError(f"prefill failed: {exc}")
            for req, _, _ in pieces:
                self._prefilling.remove(req)
                for seq in req.sequences:
                    self._release(seq)
                req.sequences = []
                out.end(req, err)
            return [], []
        read, last = [], []
        for b, (req, start, take) in enumerate(pieces):
            req.prefilled = start + take
            if req.prefilled == len(req.prompt):
                self._prefilling.remove(req)
                read.append(req)
                last.append(logits[b])
        return read, last

    # -- sampling --------------------------------------------------------------------------

    def _sample_drafted(self, seq: _Sequence, draft: list[int], logits: torch.Tensor,
                        out: StepOutputs) -> None:
        """`_sample` for a sequence whose draft was read after its next token: row after row,
        each by the same `_sample` call as one token per step (its sampler's state, its seeded
        noise, which is keyed by the tokens it has generated, its grammar, its logprobs), for
        as long as what it samples is what was drafted; the first token that differs, or the
        one after the whole draft, is emitted too and read next step. Only the logits differ
        from one token per step: they come from a wider pass."""
        accepted = 0
        try:
            for row in range(len(draft) + 1):
                if not self._sample([seq], logits[row:row + 1], out)[0]:
                    break  # finished, or failed
                if row == len(draft) or seq.next_token != draft[row]:
                    break
                accepted += 1  # its column, read as drafted, is right
                seq.n_past += 1
        finally:
            assert self._spec is not None
            self._spec.record(len(draft), accepted)

    def _sample(self, seqs: list[_Sequence], logits: torch.Tensor, out: StepOutputs) -> list[bool]:
        """The next token of each sequence from its row of raw `logits`, all in one draw;
        finished sequences leave. For each: whether it took a token and goes on."""
        constrained = [i for i, s in enumerate(seqs) if s.matcher is not None]
        failed: set[int] = set()
        if constrained:
            masks = self._grammars.fill([seqs[i].matcher for i in constrained])
            for i, row in zip(constrained, masks, strict=True):
                try:
                    grammar.check(seqs[i].matcher, row)
                except Exception as exc:  # noqa: BLE001 - this request's failure alone
                    seqs[i].request.fail(exc)
                    failed.add(i)
            logits = self._mask(logits, constrained, masks)
        for i, seq in enumerate(seqs):
            try:
                self.faults.before_sample(seq.params.seed)
            except Exception as exc:  # noqa: BLE001
                log.exception("sampling failed")
                seq.request.fail(exc)
                failed.add(i)
        draw = self._sampler.sample(logits, [s.slot for s in seqs], [s.params for s in seqs],
                                    [s.keys for s in seqs], [s.generated for s in seqs])
        going = [False] * len(seqs)
        for i, seq in enumerate(seqs):
            if i in failed:
                continue  # leaves with its request at the next step's cancels
            token = draw.tokens[i]
            p = seq.params
            complete = False
            if seq.matcher is not None:
                try:
                    complete = grammar.advance(seq.matcher, token)
                except Exception as exc:  # noqa: BLE001
                    log.exception("sampling failed")
                    seq.request.fail(exc)
                    continue
            seq.generated += 1
            eog = token in self._end_tokens and not p.ignore_eos
            # The new token goes to position n_past next step: room is what is left after it.
            finish = "stop" if complete else finish_reason(
                p, generated=seq.generated, end_of_generation=eog,
                room_left=self._context_length - seq.n_past - 1,
            )
            out.add(seq.request, TokenOutput(seq.index, token, draw.logprobs[i], draw.top[i],
                                             eog, finish))
            seq.next_token = token
            seq.generated_ids.append(token)
            if finish is not None:
                self._leave(seq, out)
            else:
                going[i] = True
        return going

    def _mask(self, logits: torch.Tensor, rows: list[int], masks) -> torch.Tensor:
        """`logits` with the tokens each constrained row's grammar forbids at -inf."""
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


def _placement(at_row: list[int], at_token: list[int], at_slot: list[int], at_column: list[int],
               length: int, device: torch.device, *, slots: list[int] | None = None,
               in_place: bool = False) -> Placement:
    def t(values):
        return torch.tensor(values, dtype=torch.long, device=device)

    return Placement(None if in_place or slots is None else t(slots), t(at_row), t(at_token),
                     t(at_slot), t(at_column), length)


def _attention_kinds(path: Path, config) -> tuple[frozenset[str], int | None]:
    """The model's attention layer types, and its sliding window when some layer slides;
    EngineError for layers whose cache is no `[batch, heads, tokens, dim]` tensor."""
    kinds = frozenset(getattr(config, "layer_types", None) or ())
    if kinds - {"full_attention", "sliding_attention"}:
        raise EngineError(
            f"{path}: layer types {sorted(kinds)} are not supported (only attention layers whose "
            "KV cache is a plain [batch, heads, tokens, dim] tensor)"
        )
    window = getattr(config, "sliding_window", None)
    if not kinds:  # no layer types (Mistral): every layer slides when there is a window
        kinds = frozenset({"sliding_attention" if window else "full_attention"})
    return kinds, (int(window) if "sliding_attention" in kinds else None)
