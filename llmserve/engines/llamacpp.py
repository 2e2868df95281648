"""llama.cpp engine: GGUF models, continuous batching on llama-cpp-python's low-level API.

One decode thread owns the model. Each step it takes new requests and cancellations from
its inbox, builds one batch holding the next token of every running sequence plus pieces
of the prompts being read (up to `prefill_chunk` tokens for each), calls `llama_decode` once,
samples every sequence with its own llama.cpp sampler chain, and hands all new tokens to the
event loop with a single `call_soon_threadsafe`.

A sequence with a grammar (`SamplingParams.grammar`, see engines/grammar.py) has its logits
masked before its sampler; the tokens its grammar then forces are handed out at once, without
sampling, and decoded together in its next step's share of the batch.

Each sequence owns a KV stream of `context_length` cells (`kv_unified=False`): a request
admitted never runs out of cache, and attention reads only its own cells. A finished
sequence's cells are kept: a new prompt starts from the free slot holding the longest common
prefix (the chat template's system preamble, an earlier turn of the same conversation) and
only the rest of it is read. Running sequences are kept on consecutive slots, in order in
the batch: llama.cpp decodes such a batch in one pass (engines/slots.py).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import sys
import time
from collections import Counter
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field
from os.path import commonprefix
from pathlib import Path
from typing import Any

import llama_cpp as lc
import numpy as np

from llmserve.engines import grammar, slots
from llmserve.engines.base import (
    EngineError,
    FinishReason,
    SamplingParams,
    SpecCounter,
    TokenOutput,
)
from llmserve.engines.cpu import usable_cpus
from llmserve.engines.draft_policy import Acceptance, DraftPolicy
from llmserve.engines.ngram_draft import NgramIndex, PromptLookup
from llmserve.engines.stepping import EngineRequest, StepLoopEngine, StepOutputs, finish_reason

log = logging.getLogger(__name__)

_NO_SEED = 0xFFFFFFFF  # LLAMA_DEFAULT_SEED: llama.cpp picks a random seed


@dataclass(eq=False)
class _Sequence:
    request: EngineRequest
    index: int
    seq_id: int
    params: SamplingParams
    sampler: lc.llama_sampler_p
    n_past: int = 0  # positions held in the KV cache
    generated: int = 0
    generated_ids: list[int] = field(default_factory=list)
    pending: list[int] = field(default_factory=list)  # to decode next step: sampled, then forced
    logits_at: int = -1  # batch index of this sequence's logits in the current step
    matcher: Any = None  # its grammar's llguidance matcher; None: unconstrained
    mask: np.ndarray | None = None  # the matcher's token bitmask for this step
    draft: list[int] = field(default_factory=list)  # guessed tokens decoded after `pending`
    ngrams: NgramIndex | None = None  # its context, for drafting (built on first use)
    acceptance: Acceptance | None = None  # how often its guesses were right (adaptive drafts)
    guess: int | None = None  # its next token as guessed but not drafted: scored when sampled


class _Lora:
    """A loaded LoRA adapter, as llama_set_adapters_lora takes it."""

    def __init__(self, adapter: lc.llama_adapter_lora_p, scale: float) -> None:
        self.adapter = adapter
        self.pointers = (lc.llama_adapter_lora_p_ctypes * 1)(adapter)
        self.scales = (ctypes.c_float * 1)(scale)


class LlamaCppEngine(StepLoopEngine):
    """A GGUF model decoded by llama.cpp, many sequences per step."""

    thread_name = "llama-decode"

    def __init__(
        self,
        model_path: str | Path,
        *,
        context_length: int | None = None,
        max_sequences: int = 16,
        threads: int | None = None,
        batch_size: int = 512,
        prefill_chunk: int = 64,
        weight_repack: bool = False,
        speculative: str = "off",
        speculative_tokens: int = 5,
        speculative_ngram: int = 3,
        speculative_ngram_min: int = 2,
        speculative_adaptive: bool = True,
        adapters: Mapping[str, tuple[str, float]] | None = None,
        show_progress: bool = False,
    ) -> None:
        self.model_path = Path(model_path)
        if not self.model_path.is_file():
            raise FileNotFoundError(f"model file not found: {self.model_path}")
        self._max_sequences = max_sequences
        self._prefill_chunk = max(1, min(prefill_chunk, batch_size - max_sequences))
        self._batch_size = batch_size
        # Tokens a grammar forces are decoded together, up to this many per sequence per step
        # (every running sequence's share of the batch).
        self._max_forced = max(0, batch_size // max_sequences - 1)
        threads = threads or usable_cpus()
        if speculative not in ("off", "ngram"):
            raise ValueError(f"speculative: ngram or off, not {speculative!r}")
        # Prompt-lookup speculation (engines/ngram_draft.py), for a sequence alone in a step.
        self._speculative = speculative == "ngram" and speculative_tokens > 0
        self._lookup = PromptLookup(min(speculative_tokens, batch_size - 2), speculative_ngram,
                                    speculative_ngram_min)
        self._spec = SpecCounter() if self._speculative else None
        # Adaptive: draft only as many tokens as pay, by this machine's step costs (measured
        # once the context exists) and the sequence's record; else whenever a guess exists.
        self._policy: DraftPolicy | None = None

        _route_llama_logs()
        lc.llama_backend_init()
        model_params = lc.llama_model_default_params()
        # Repacking into CPU-specific layouts (llama-server's --repack): see engines/cpu.py.
        model_params.use_extra_bufts = weight_repack
        if show_progress:
            self._progress_cb = lc.llama_progress_callback(_print_progress)
            model_params.progress_callback = self._progress_cb
        self._model = lc.llama_model_load_from_file(str(self.model_path).encode(), model_params)
        if not self._model:
            raise EngineError(f"llama.cpp could not load {self.model_path}")
        self._vocab = lc.llama_model_get_vocab(self._model)
        # LoRA adapters (GGUF), applied per context: each step decodes its sequences in one
        # batch per adapter (see _step). One that fails to load is refused with its reason.
        self._loras: dict[str, _Lora] = {}
        self._adapters = {name: self._load_adapter(name, Path(path), scale)
                          for name, (path, scale) in (adapters or {}).items()}
        self._lora_set: str | None = None  # the adapter the context applies now
        n_ctx_train = lc.llama_model_n_ctx_train(self._model)
        ctx_len = min(context_length or n_ctx_train, n_ctx_train)

        ctx_params = lc.llama_context_default_params()
        ctx_params.n_ctx = ctx_len * max_sequences
        ctx_params.n_batch = batch_size
        ctx_params.n_ubatch = batch_size
        ctx_params.n_seq_max = max_sequences
        ctx_params.n_threads = threads
        ctx_params.n_threads_batch = threads
        ctx_params.kv_unified = False
        ctx_params.no_perf = True
        self._ctx = lc.llama_init_from_model(self._model, ctx_params)
        if not self._ctx:
            raise EngineError("llama.cpp could not create a context (out of memory?)")
        self._mem = lc.llama_get_memory(self._ctx)
        self._context_length = lc.llama_n_ctx_seq(self._ctx)
        self._n_vocab = lc.llama_vocab_n_tokens(self._vocab)
        self._token_bytes = [self._piece(t) for t in range(self._n_vocab)]
        self._end_tokens = frozenset(
            t for t in range(self._n_vocab) if lc.llama_vocab_is_eog(self._vocab, t)
        )
        self._batch = lc.llama_batch_init(batch_size, 0, 1)
        self._slot_tokens: list[list[int]] = [[] for _ in range(max_sequences)]  # KV contents
        self._slot_used = [-1] * max_sequences  # release stamp of each slot's cache (-1: empty)
        self._slot_adapter: list[str | None] = [None] * max_sequences  # what computed its cache
        self._releases = 0
        self._seqs: list[_Sequence] = []  # running
        self._free_ids = list(range(max_sequences))
        if self._speculative and speculative_adaptive and self._lookup.tokens:
            self._policy = DraftPolicy(self._measure_step_costs())
            log.info("speculative decoding: a step with 1..%d drafted tokens costs %s x one "
                     "without", self._lookup.tokens,
                     " ".join(f"{r:.2f}" for r in self._policy.cost_ratio[1:]))

        template = lc.llama_model_chat_template(self._model, None)
        self._chat_template = template.decode() if template else None
        self._bos_token = self._special_text(lc.llama_vocab_bos(self._vocab))
        self._eos_token = self._special_text(lc.llama_vocab_eos(self._vocab))
        self._add_bos = bool(lc.llama_vocab_get_add_bos(self._vocab))
        self._grammars = grammar.Grammars(
            lambda: grammar.llamacpp_tokenizer(
                self._vocab, lambda t: self._piece(t, special=True), self._n_vocab,
                self._end_tokens,
            ),
            self._n_vocab, engine_threads=threads,
        )

        self._init_loop()

    # -- what the serving core reads (the rest comes from StepLoopEngine) ----------------

    def tokenize(self, text: str, *, add_bos: bool) -> list[int]:
        return _tokenize(self._vocab, text, add_bos)

    def detokenize(self, ids: list[int]) -> str:
        return _detokenize(self._vocab, ids)

    def token_strs(self, ids: list[int]) -> list[str]:
        return _token_strs(self._vocab, ids)

    def _piece(self, token: int, special: bool = False) -> bytes:
        return _piece(self._vocab, token, special)

    def _special_text(self, token: int) -> str:
        return self._piece(token, special=True).decode("utf-8", "replace") if token >= 0 else ""

    # -- lifecycle -------------------------------------------------------------------------

    def _load_adapter(self, name: str, path: Path, scale: float) -> str | None:
        """Load one LoRA adapter: None, or why it cannot be used."""
        if not path.is_file():
            return f"file not found: {path}"
        with _llama_errors() as errors:
            adapter = lc.llama_adapter_lora_init(self._model, str(path).encode())
        if not adapter:
            why = "; ".join(errors) or "see the server log"
            log.error("LoRA adapter %s (%s) failed to load: %s", name, path, why)
            return f"llama.cpp could not load {path} as a LoRA adapter of this model: {why}"
        self._loras[name] = _Lora(adapter, scale)
        return None

    def _free_adapter(self, name: str) -> None:
        lora = self._loras.pop(name, None)
        if lora is None:
            return
        if self._lora_set == name:
            self._use_adapter(None)
        for sid, adapter in enumerate(self._slot_adapter):
            if adapter == name:  # a prefix computed under it: a later adapter of its name differs
                self._clear_slot(sid)
                self._slot_adapter[sid] = None
        lc.llama_adapter_lora_free(lora.adapter)

    def _use_adapter(self, name: str | None) -> None:
        """Make the context apply `name`'s adapter (None: none) to the next decode."""
        if name == self._lora_set:
            return
        if name is None:
            rc = lc.llama_set_adapters_lora(self._ctx, None, 0, None)
        else:
            lora = self._loras[name]
            rc = lc.llama_set_adapters_lora(self._ctx, lora.pointers, 1, lora.scales)
        if rc != 0:
            raise EngineError(f"llama.cpp could not switch to LoRA adapter {name!r} ({rc})")
        self._lora_set = name

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        lc.llama_batch_free(self._batch)
        lc.llama_free(self._ctx)
        for lora in self._loras.values():
            lc.llama_adapter_lora_free(lora.adapter)
        lc.llama_model_free(self._model)

    # -- decode thread ---------------------------------------------------------------------

    def _running(self) -> bool:
        return bool(self._seqs)

    def _reset(self) -> None:
        for seq in self._seqs:
            lc.llama_sampler_free(seq.sampler)
        for req in self._prefilling:
            for seq in req.sequences:
                lc.llama_sampler_free(seq.sampler)
        self._seqs = []
        self._prefilling.clear()

    def _apply_cancels(self, out: StepOutputs) -> None:
        for req in [r for r in self._prefilling if r.cancel_all]:
            self._prefilling.remove(req)
            for seq in req.sequences:  # its KV and samplers are held
                self._release(seq)
            req.sequences = []
            out.end(req)
        kept = []
        for seq in self._seqs:
            req = seq.request
            if req.cancel_all or seq.index in req.cancelled:
                self._release(seq)
                req.sequences.remove(seq)
                if not req.sequences:
                    out.end(req)
            else:
                kept.append(seq)
        self._seqs = kept

    def _admit(self) -> None:
        waiting, free_ids = self._waiting, self._free_ids
        # FIFO: a large request at the head waits for room rather than being overtaken forever.
        admitted: list[EngineRequest] = []
        room = len(free_ids)
        while waiting and len(waiting[0].params) <= room:
            admitted.append(waiting.popleft())
            room -= len(admitted[-1].params)
        if not admitted:
            return
        # Sequences of one adapter are decoded together (see _step), so theirs are the runs
        # of consecutive ids a new one should join: slots are planned adapter by adapter.
        by_adapter: dict[str | None, list[EngineRequest]] = {}
        for req in admitted:
            by_adapter.setdefault(req.adapter, []).append(req)
        for adapter, group in by_adapter.items():
            busy = {seq.seq_id for seq in self._seqs if seq.request.adapter == adapter}
            busy.update(seq.seq_id for req in self._prefilling if req.adapter == adapter
                        for seq in req.sequences)
            # The last prompt token is decoded again, for its logits: at most the rest is
            # reused; and only a cache computed under the same adapter (or none) holds it.
            wants = [({sid: min(len(commonprefix([self._slot_tokens[sid], req.prompt])),
                                len(req.prompt) - 1)
                       if self._slot_adapter[sid] == adapter else 0
                       for sid in free_ids}, len(req.params))
                     for req in group]
            caches = slots.SlotCaches(used={s: self._slot_used[s] for s in free_ids})
            planned = slots.plan(free_ids, wants, busy, caches=caches)
            for req, (choice, others) in zip(group, planned, strict=True):
                first, reused = self._take(choice)
                for sid in others:  # overwritten by a copy of the first once its prompt is read
                    free_ids.remove(sid)
                    self._clear_slot(sid)
                for sid in (first, *others):
                    self._slot_adapter[sid] = adapter
                req.prefilled = reused
                req.sequences = [
                    _Sequence(req, i, sid, p, self._make_sampler(p, req.prompt),
                              matcher=req.matchers[i])
                    for i, (sid, p) in enumerate(zip([first, *others], req.params, strict=True))
                ]
        self._prefilling.extend(admitted)  # read in the order they came

    def _take(self, choice: slots.SlotChoice) -> tuple[int, int]:
        """Take the chosen slot (engines/slots.py), with the cached prefix it starts from
        trimmed to what the prompt shares; returns it and how many prompt tokens need not be
        read again."""
        sid, keep = choice.slot, choice.reused
        self._free_ids.remove(sid)
        if choice.source != sid:
            # Across KV streams llama.cpp copies the whole stream, at the next decode (before
            # the batch is written); the source keeps its cache.
            lc.llama_memory_seq_cp(self._mem, choice.source, sid, -1, -1)
            self._slot_tokens[sid] = list(self._slot_tokens[choice.source])
        cached = self._slot_tokens[sid]
        if keep == 0 or not lc.llama_memory_seq_rm(self._mem, sid, keep, -1):
            self._clear_slot(sid)
            return sid, 0
        del cached[keep:]
        # The cache must end where this engine's note of it does (llama.cpp refuses a batch
        # whose positions do not follow on, failing every request in it): a slip read again.
        if lc.llama_memory_seq_pos_max(self._mem, sid) != keep - 1:
            log.warning("slot %d: the KV cache does not hold the %d tokens noted; read again",
                        sid, keep)
            self._clear_slot(sid)
            return sid, 0
        return sid, keep

    def _step(self, out: StepOutputs) -> None:
        prefill = self._prefill_budget(bool(self._seqs), self._batch_size)
        if not self._loras:
            self._seqs = self._decode(self._seqs, self._prefilling, prefill, out)
            return
        # llama.cpp applies LoRA adapters to a whole context: one decode per adapter, each
        # sampled before the next overwrites the logits (the adapter set now goes first).
        groups: dict[str | None, tuple[list[_Sequence], list[EngineRequest]]] = {
            self._lora_set: ([], [])}
        for seq in self._seqs:
            groups.setdefault(seq.request.adapter, ([], []))[0].append(seq)
        for req in self._prefilling:
            groups.setdefault(req.adapter, ([], []))[1].append(req)
        kept: list[_Sequence] = []
        for adapter, (running, prefilling) in groups.items():
            if not running and not (prefilling and prefill > 0):
                continue
            self._use_adapter(adapter)
            before = sum(req.prefilled for req in prefilling)
            kept += self._decode(running, prefilling, prefill, out)
            prefill -= sum(req.prefilled for req in prefilling) - before
        self._seqs = kept

    def _decode(self, running: list[_Sequence], prefilling: Collection[EngineRequest],
                prefill: int, out: StepOutputs) -> list[_Sequence]:
        """One llama_decode: the next token of each of `running` and up to `prefill` tokens of
        the prompts of `prefilling` (in order), then sampling; the sequences still running
        (the prompts read to the end join them)."""
        batch = self._batch
        n = 0

        def add(token: int, pos: int, seq_id: int, logits: bool) -> None:
            nonlocal n
            batch.token[n] = token
            batch.pos[n] = pos
            batch.n_seq_id[n] = 1
            batch.seq_id[n][0] = seq_id
            batch.logits[n] = logits
            n += 1

        # A sequence alone gets a draft of its next tokens decoded after its pending ones, read
        # at every position (only alone: llama.cpp splits a batch whose sequences have
        # unequal token counts into several passes, see _sample).
        if self._speculative and len(running) == 1 and self._alone():
            running[0].draft = self._draft(running[0])
        # Each sequence's tokens: (seq_id, first position, tokens, whose logits the last gives
        # (and each drafted one)).
        rows: list[tuple[int, int, list[int], _Sequence | None]] = [
            (seq.seq_id, seq.n_past, seq.pending + seq.draft, seq) for seq in running
        ]
        budget = min(prefill, self._batch_size - sum(len(row[2]) for row in rows))
        completed: list[EngineRequest] = []
        touched: list[EngineRequest] = []
        for req in prefilling:
            if budget <= 0:
                break
            touched.append(req)
            first = req.sequences[0]
            take = min(budget, len(req.prompt) - req.prefilled)
            done = req.prefilled + take == len(req.prompt)
            rows.append((first.seq_id, req.prefilled,
                         req.prompt[req.prefilled:req.prefilled + take], first if done else None))
            req.prefilled += take
            budget -= take
            if done:
                completed.append(req)

        # In ascending seq_id order: with a KV stream per sequence, llama.cpp decodes a batch in
        # one pass only over consecutive seq ids in batch order, and splits it at every break
        # (16 sequences in shuffled order took 1.8x as long as in order).
        rows.sort(key=lambda row: row[0])
        for seq_id, pos, tokens, reader in rows:
            read_from = len(tokens) - 1 - (len(reader.draft) if reader is not None else 0)
            for j, token in enumerate(tokens):
                add(token, pos + j, seq_id, reader is not None and j >= read_from)
            if reader is not None:
                reader.logits_at = n - 1 - len(reader.draft)

        batch.n_tokens = n
        start = time.perf_counter()
        rc = lc.llama_decode(self._ctx, batch)
        if self._policy is not None and len(rows) == 1 and rc == 0 and rows[0][3] is not None:
            self._policy.observe(len(rows[0][3].draft), time.perf_counter() - start)
        if rc != 0:
            # Every request in this batch fails; their slots' contents are unknown now.
            err = EngineError(f"llama_decode failed with code {rc}")
            reqs = {s.request for s in running} | set(touched)
            for req in reqs:
                for seq in req.sequences:
                    self._release(seq, keep_cache=False)
                req.sequences = []
                out.end(req, err)
                if req in self._prefilling:
                    self._prefilling.remove(req)
            return []
        for req in completed:
            self._prefilling.remove(req)

        for seq in running:
            seq.n_past += len(seq.pending)
        for req in completed:
            first = req.sequences[0]
            for seq in req.sequences:
                seq.n_past = len(req.prompt)
                seq.logits_at = first.logits_at
                if seq is not first:  # n > 1: share the prompt's KV instead of reading it again
                    lc.llama_memory_seq_cp(self._mem, first.seq_id, seq.seq_id, -1, -1)
            running.extend(req.sequences)

        self._fill_masks(running)
        # A row of logits read by several sequences (the n choices of a prompt, on their
        # first step): a grammar's mask on it must be undone for the next reader.
        readers = Counter(s.logits_at for s in running)
        shared = {at for at, k in readers.items() if k > 1}
        kept = []
        for seq in running:
            try:
                if seq.draft:
                    going_on = self._sample_drafted(seq, out)
                else:
                    going_on = self._sample(seq, out, seq.logits_at in shared)
            except Exception as exc:  # noqa: BLE001 - this request's failure, not the engine's
                log.exception("sampling failed")
                seq.request.fail(exc)
                going_on = True  # leaves with its request at the next step's cancels
            if going_on:
                kept.append(seq)
            else:
                self._release(seq)
                req = seq.request
                req.sequences.remove(seq)
                if not req.sequences:
                    out.end(req)
        return kept

    def _fill_masks(self, seqs: list[_Sequence]) -> None:
        """The grammar masks of every constrained sequence, all at once."""
        constrained = [s for s in seqs if s.matcher is not None]
        if constrained:
            masks = self._grammars.fill([s.matcher for s in constrained])
            for seq, mask in zip(constrained, masks, strict=True):
                seq.mask = mask

    def _sample(self, seq: _Sequence, out: StepOutputs, shared_row: bool = False) -> bool:
        """Sample the next token of `seq` (whose logits row others read too when
        `shared_row`); False when the sequence has finished."""
        token, logprob, top, complete = self._pick(seq, seq.logits_at, shared_row)
        seq.pending = []
        finish = self._emit(seq, token, logprob, top, complete, out)
        if finish is None and seq.matcher is not None and self._max_forced and self._alone():
            # Tokens the grammar forces need no sampling: out now, decoded together next step.
            # Only for a sequence alone in the batch: llama.cpp splits a batch in which one
            # sequence has more tokens than the others into several passes (its KV cache is
            # one stream per sequence), and with 16 streams that cost more than it saved
            # (measured: 140 tok/s against 161 without). With others, a forced token is
            # sampled as any other, from a mask that allows it alone.
            finish = self._force(seq, seq.matcher.compute_ff_tokens(), out)
        return finish is None

    def _sample_drafted(self, seq: _Sequence, out: StepOutputs) -> bool:
        """`_sample` for a sequence alone whose draft was decoded after its pending tokens:
        sample row after row with its own sampler (and grammar) for as long as what it samples
        is what was drafted, and emit each; the first token that differs, or the one after the
        whole draft, is emitted too and pending next step. Sampling is the same sequence of
        calls on the same chain as one token per step, so the output is the same, greedy or
        seeded; only the logits come from a wider batch. The cells of drafted tokens not
        taken leave the KV cache."""
        draft, seq.draft = seq.draft, []
        accepted = 0
        try:
            while True:
                token, logprob, top, complete = self._pick(seq, seq.logits_at + accepted)
                seq.pending = []
                finish = self._emit(seq, token, logprob, top, complete, out)
                if finish is not None:
                    break
                if seq.matcher is not None and self._max_forced:
                    # as _sample: what the grammar forces next is not sampled
                    forced = seq.matcher.compute_ff_tokens()
                    if forced:
                        finish = self._force(seq, forced, out)
                        break
                if accepted == len(draft) or token != draft[accepted]:
                    break
                accepted += 1  # its cell, decoded as drafted, is right
                seq.n_past += 1
                if seq.matcher is not None:
                    seq.mask = self._grammars.fill([seq.matcher])[0]
        finally:
            assert self._spec is not None
            self._spec.record(len(draft), accepted)
            if seq.acceptance is not None:
                seq.acceptance.update(accepted, int(accepted < len(draft)))
            if accepted < len(draft) and not lc.llama_memory_seq_rm(
                self._mem, seq.seq_id, seq.n_past, -1
            ):
                raise EngineError("llama.cpp could not drop the rejected draft's cells")
        return finish is None

    def _pick(self, seq: _Sequence, at: int, shared_row: bool = False
              ) -> tuple[int, float | None, Any, bool]:
        """Sample `seq` from batch row `at`: its token, logprob and top logprobs (when asked
        for), and whether its grammar is then complete."""
        self.faults.before_sample(seq.params.seed)
        p = seq.params
        logprob = top = None
        complete = False
        if seq.matcher is None:
            token = lc.llama_sampler_sample(seq.sampler, self._ctx, at)
            if p.logprobs is not None:
                logprob, top = self._logprobs(at, token, p.logprobs)
        else:
            grammar.check(seq.matcher, seq.mask)
            # The sampler reads the context's logits: mask them there (a shared row is put
            # back after).
            row = self._logits_row(at)
            saved = row.copy() if shared_row else None
            grammar.mask_logits(row, seq.mask)
            try:
                token = lc.llama_sampler_sample(seq.sampler, self._ctx, at)
                if p.logprobs is not None:  # of the distribution sampled from
                    logprob, top = self._logprobs(at, token, p.logprobs)
            finally:
                if saved is not None:
                    row[:] = saved
            complete = grammar.advance(seq.matcher, token)
        return token, logprob, top, complete

    def _force(self, seq: _Sequence, forced: list[int], out: StepOutputs) -> FinishReason | None:
        """Emit the tokens `seq`'s grammar forces (up to `_max_forced`), unsampled."""
        finish = None
        for token in forced[: self._max_forced]:
            complete = grammar.advance(seq.matcher, token)
            lc.llama_sampler_accept(seq.sampler, token)  # penalties count it too
            logprob = top = None
            if seq.params.logprobs is not None:
                logprob, top = 0.0, ((token, 0.0),)[: seq.params.logprobs]
            finish = self._emit(seq, token, logprob, top, complete, out)
            if finish is not None:
                break
        return finish

    def _propose(self, seq: _Sequence) -> list[int]:
        """A draft of the tokens after `seq`'s pending ones: what followed the latest earlier
        occurrence of its last few tokens, no more than it may still generate."""
        if seq.ngrams is None:
            seq.ngrams = self._lookup.new_index()
        room = min(seq.params.max_tokens - seq.generated - 1,
                   self._context_length - seq.n_past - len(seq.pending) - 1)
        return self._lookup.propose(seq.ngrams, seq.request.prompt, seq.generated_ids, room)

    def _draft(self, seq: _Sequence) -> list[int]:
        """What `seq`, alone in this step, verifies: its guess, cut to the length that pays
        (nothing when none does; then the guess's first token is still scored)."""
        guess = self._propose(seq)
        if self._policy is None or not guess:
            return guess
        if seq.acceptance is None:
            seq.acceptance = Acceptance(self.ACCEPTANCE_PRIOR)
        d = self._policy.length(seq.acceptance.p, len(guess))
        if d == 0:
            seq.guess = guess[0]
        return guess[:d]

    # Before its first guess is scored a sequence is taken to be right half the time: where
    # verifying costs nearly a step per token that drafts nothing, where it is almost free
    # it drafts at once.
    ACCEPTANCE_PRIOR = 0.5

    def _measure_step_costs(self) -> list[float]:
        """Seconds of a step decoding 1 to 1 + draft length tokens of one sequence (the
        fastest of four tries each, the sizes taken in turn so that a burst of other work on
        the machine skews no size alone), in slot 0 while it is still empty."""
        batch, n_max = self._batch, self._lookup.tokens + 1

        def decode(n: int) -> float:
            for j in range(n):
                batch.token[j] = 0
                batch.pos[j] = j
                batch.n_seq_id[j] = 1
                batch.seq_id[j][0] = 0
                batch.logits[j] = True
            batch.n_tokens = n
            start = time.perf_counter()
            rc = lc.llama_decode(self._ctx, batch)
            took = time.perf_counter() - start
            lc.llama_memory_seq_rm(self._mem, 0, -1, -1)
            if rc != 0:
                raise EngineError(f"llama_decode failed with code {rc} measuring step costs")
            return took

        decode(n_max)  # the first decode sets up buffers: not a step's cost
        best = [float("inf")] * n_max
        for _ in range(4):
            for n in range(1, n_max + 1):
                best[n - 1] = min(best[n - 1], decode(n))
        return best

    def _alone(self) -> bool:
        return len(self._seqs) <= 1 and not self._prefilling

    def _emit(self, seq: _Sequence, token: int, logprob: float | None, top, complete: bool,
              out: StepOutputs) -> FinishReason | None:
        """Hand out the next token of `seq` and queue it for decoding; why `seq` ends, if it
        does (`complete`: its grammar is)."""
        p = seq.params
        if seq.guess is not None:  # the guess not drafted, scored against what came
            assert seq.acceptance is not None
            right = token == seq.guess
            seq.acceptance.update(int(right), int(not right))
            seq.guess = None
        seq.generated += 1
        eog = token in self._end_tokens and not p.ignore_eos
        # The token goes to position n_past + len(pending) next step: room is what is left
        # after it.
        finish: FinishReason | None = "stop" if complete else finish_reason(
            p, generated=seq.generated, end_of_generation=eog,
            room_left=self._context_length - seq.n_past - len(seq.pending) - 1,
        )
        out.add(seq.request, TokenOutput(seq.index, token, logprob, top, eog, finish))
        seq.pending.append(token)
        seq.generated_ids.append(token)
        return finish

    def _logits_row(self, at: int) -> np.ndarray:
        """The context's logits of batch index `at`, as a writable view."""
        ptr = lc.llama_get_logits_ith(self._ctx, at)
        return np.ctypeslib.as_array(ptr, shape=(self._n_vocab,))

    def _logprobs(self, at: int, token: int, k: int) -> tuple[float, tuple[tuple[int, float], ...]]:
        logits = self._logits_row(at)
        peak = logits.max()
        lse = peak + np.log(np.exp(logits - peak, dtype=np.float64).sum())
        top: tuple[tuple[int, float], ...] = ()
        if k > 0:
            idx = np.argpartition(logits, -k)[-k:]
            idx = idx[np.argsort(-logits[idx], kind="stable")]
            # a grammar's forbidden tokens (-inf) are no alternative
            top = tuple((int(i), float(logits[i] - lse)) for i in idx if logits[i] > -np.inf)
        return float(logits[token] - lse), top

    def _make_sampler(self, p: SamplingParams, prompt: list[int]) -> lc.llama_sampler_p:
        chain = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())

        def add(s) -> None:
            lc.llama_sampler_chain_add(chain, s)

        if p.logit_bias:
            arr = (lc.llama_logit_bias * len(p.logit_bias))(
                *(lc.llama_logit_bias(t, b) for t, b in p.logit_bias.items())
            )
            add(lc.llama_sampler_init_logit_bias(self._n_vocab, len(p.logit_bias), arr))
        # Penalties as vLLM and HF count them: repetition over prompt and answer, presence
        # and frequency over the answer only. Two samplers, since one counts what it is fed.
        if p.repetition_penalty != 1.0:
            repeat = lc.llama_sampler_init_penalties(
                self._n_vocab, self._context_length, p.repetition_penalty, 0.0, 0.0
            )
            for token in prompt[-self._context_length:]:
                lc.llama_sampler_accept(repeat, token)
            add(repeat)
        if p.presence_penalty or p.frequency_penalty:
            add(lc.llama_sampler_init_penalties(
                self._n_vocab, self._context_length, 1.0, p.frequency_penalty, p.presence_penalty
            ))
        if p.temperature <= 0.0 or p.top_k == 1:
            add(lc.llama_sampler_init_greedy())
            return chain
        # Temperature first, then the filters: the order OpenAI, vLLM and HF use.
        add(lc.llama_sampler_init_temp(p.temperature))
        if p.top_k > 0:
            add(lc.llama_sampler_init_top_k(p.top_k))
        if p.top_p < 1.0:
            add(lc.llama_sampler_init_top_p(p.top_p, 1))
        if p.min_p > 0.0:
            add(lc.llama_sampler_init_min_p(p.min_p, 1))
        add(lc.llama_sampler_init_dist(_NO_SEED if p.seed is None else p.seed & 0xFFFFFFFF))
        return chain

    def _release(self, seq: _Sequence, *, keep_cache: bool = True) -> None:
        """Free a sequence's slot; its cells stay cached for a later prompt to reuse."""
        req = seq.request
        if seq.n_past:
            held = (req.prompt + seq.generated_ids)[: seq.n_past]
        elif seq is req.sequences[0]:
            held = req.prompt[: req.prefilled]  # cancelled while its prompt was being read
        else:
            held = []
        if keep_cache and held:
            self._slot_tokens[seq.seq_id] = held
            self._releases += 1
            self._slot_used[seq.seq_id] = self._releases
        else:
            self._clear_slot(seq.seq_id)
        lc.llama_sampler_free(seq.sampler)
        self._free_ids.append(seq.seq_id)

    def _clear_slot(self, seq_id: int) -> None:
        lc.llama_memory_seq_rm(self._mem, seq_id, -1, -1)
        self._slot_tokens[seq_id] = []
        self._slot_used[seq_id] = -1

class LlamaCppVocab:
    """The model's vocabulary alone (no weights): tokenizing in the server process while
    the engine runs in its own."""

    def __init__(self, model_path: str | Path) -> None:
        _route_llama_logs()
        lc.llama_backend_init()
        params = lc.llama_model_default_params()
        params.vocab_only = True
        self._model = lc.llama_model_load_from_file(str(model_path).encode(), params)
        if not self._model:
            raise EngineError(f"llama.cpp could not read the vocabulary of {model_path}")
        self._vocab = lc.llama_model_get_vocab(self._model)

    def tokenize(self, text: str, *, add_bos: bool) -> list[int]:
        return _tokenize(self._vocab, text, add_bos)

    def __del__(self) -> None:
        # llama.cpp's memory, not Python's: a server that loads and unloads models on demand
        # would otherwise keep every vocabulary it ever read
        model, self._model = getattr(self, "_model", None), None
        if model:
            lc.llama_model_free(model)

    def detokenize(self, ids: list[int]) -> str:
        return _detokenize(self._vocab, ids)

    def token_strs(self, ids: list[int]) -> list[str]:
        return _token_strs(self._vocab, ids)


def _tokenize(vocab, text: str, add_bos: bool) -> list[int]:
    data = text.encode()
    size = len(data) + 2
    while True:
        buf = (lc.llama_token * size)()
        n = lc.llama_tokenize(vocab, data, len(data), buf, size, add_bos, True)
        if n >= 0:
            return buf[:n]
        size = -n


def _detokenize(vocab, ids: list[int]) -> str:
    """The text of `ids` (ids checked by the caller), special tokens written out, as a
    tokenizer's decode: a SentencePiece vocabulary's leading space dropped, cut characters
    replaced."""
    tokens = (lc.llama_token * len(ids))(*ids)
    size = 4 * len(ids) + 16
    while True:
        buf = ctypes.create_string_buffer(size)
        n = lc.llama_detokenize(vocab, tokens, len(ids), buf, size, False, True)
        if n >= 0:
            return buf.raw[:n].decode("utf-8", "replace")
        size = -n


def _token_strs(vocab, ids: list[int]) -> list[str]:
    """Each token as the vocabulary writes it (`Ġword`, `▁word`, `<0x0A>`), as Hugging Face's
    convert_ids_to_tokens."""
    return [(lc.llama_vocab_get_text(vocab, t) or b"").decode("utf-8", "replace") for t in ids]


def _piece(vocab, token: int, special: bool) -> bytes:
    buf = ctypes.create_string_buffer(64)
    n = lc.llama_token_to_piece(vocab, token, buf, len(buf), 0, special)
    if n < 0:
        buf = ctypes.create_string_buffer(-n)
        n = lc.llama_token_to_piece(vocab, token, buf, len(buf), 0, special)
    return buf.raw[:n]


# -- llama.cpp logging and progress ----------------------------------------------------------

_llama_log = logging.getLogger("llama_cpp")


_GGML_LOG_ERROR = 4  # ggml_log_level: none, debug, info, warn, error, cont
# llama.cpp's error lines while an adapter loads (on the thread that loads it), for its reason.
_errors_seen: list[str] | None = None


@lc.llama_log_callback
def _log_callback(level: int, text: bytes, _user: ctypes.c_void_p) -> None:
    if level == _GGML_LOG_ERROR and _errors_seen is not None:
        _errors_seen.append(text.decode("utf-8", "replace").strip())
    if _llama_log.isEnabledFor(logging.DEBUG):
        _llama_log.debug(text.decode("utf-8", "replace").rstrip())


@contextlib.contextmanager
def _llama_errors() -> Iterator[list[str]]:
    global _errors_seen
    _errors_seen = seen = []
    try:
        yield seen
    finally:
        _errors_seen = None


def _route_llama_logs() -> None:
    lc.llama_log_set(_log_callback, ctypes.c_void_p(0))


def _print_progress(progress: float, _user: ctypes.c_void_p) -> bool:
    width = 30
    done = int(progress * width)
    sys.stderr.write(f"\rloading model [{'#' * done}{'.' * (width - done)}] {progress:4.0%}")
    if progress >= 1.0:
        sys.stderr.write("\n")
    sys.stderr.flush()
    return True

