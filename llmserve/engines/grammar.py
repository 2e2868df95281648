"""Constrained decoding with llguidance, the same for every engine: each token a sequence
with a grammar samples obeys it.

An engine holds one `Grammars`: its vocabulary as llguidance sees it (built on first use: it
takes up to a second), and a pool of threads. A request's `SamplingParams.grammar` becomes
one `LLMatcher` per choice when the request is submitted, off the decode thread. Each step
the engine asks `Grammars.fill` for the masks of all its constrained sequences at once
(filled in parallel, without the GIL), applies each to its logits row before its sampler
(`mask_logits` / `allowed`), and hands the sampled token to `advance`, which says whether the
grammar is complete (the sequence then finishes with "stop").
"""

from __future__ import annotations

import ctypes
import json
import threading
from collections.abc import Callable, Sequence

import llguidance
import llguidance.numpy
import numpy as np

from llmserve.engines.base import SamplingParams
from llmserve.engines.cpu import usable_cpus


class GrammarError(ValueError):
    """A grammar that cannot be used, or a sequence its grammar cannot continue."""


def as_lark(grammar: str) -> str:
    """`grammar` (serialized as serving/constraints builds them) as Lark source: the form an
    engine with an llguidance backend of its own (vLLM's `grammar`) takes."""
    if not grammar.lstrip().startswith("{"):
        return grammar  # Lark already
    parts = json.loads(grammar).get("grammars") or []
    if len(parts) == 1 and parts[0].get("lark_grammar"):
        return parts[0]["lark_grammar"]
    if len(parts) == 1 and parts[0].get("json_schema") is not None:
        # the schema carries its JSON style in "x-guidance", which %json honours
        return "start: %json " + json.dumps(parts[0]["json_schema"])
    raise GrammarError("this grammar has no single Lark form")


class Grammars:
    """One engine's llguidance state: its tokenizer, its mask threads, its masks' shape.

    `engine_threads`: the threads the model itself computes with. Masks are filled in
    parallel only where the machine has cores to spare beside those: on a 2-core machine a
    pool of mask threads contends with llama.cpp's own (measured with 16 constrained streams:
    masks 3.7x slower and decode steps 6% slower than filling them one after another)."""

    def __init__(
        self, build_tokenizer: Callable[[], llguidance.LLTokenizer], n_vocab: int,
        *, engine_threads: int | None = None,
    ) -> None:
        self._build = build_tokenizer
        cpus = usable_cpus()
        spare = cpus - (engine_threads or cpus)
        self._threads = spare if spare >= 2 else 0  # 0: one after another
        self.n_vocab = n_vocab
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._executor: llguidance.LLExecutor | None = None
        self._lock = threading.Lock()

    def tokenizer(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._tokenizer is None:
                self._tokenizer = self._build()
                if self._threads:
                    self._executor = llguidance.LLExecutor(self._threads)
            return self._tokenizer

    def matchers(self, params: Sequence[SamplingParams]) -> list[llguidance.LLMatcher | None]:
        """A fresh matcher for each choice that has a grammar (None for the others);
        GrammarError when a grammar is not valid for this vocabulary."""
        try:
            tok = self.tokenizer()
        except GrammarError:
            raise
        except Exception as exc:  # the request's error, never a crash of the caller
            raise GrammarError(f"grammars are not available: {type(exc).__name__}: {exc}") from exc
        built: dict[str, llguidance.LLMatcher] = {}
        out: list[llguidance.LLMatcher | None] = []
        for p in params:
            if p.grammar is None:
                out.append(None)
            elif p.grammar in built:  # n > 1: compile once, copy the compiled state
                out.append(built[p.grammar].deep_copy())
            else:
                m = llguidance.LLMatcher(tok, p.grammar, log_level=0)
                if m.is_error():
                    raise GrammarError(f"invalid grammar: {m.get_error()}")
                built[p.grammar] = m
                out.append(m)
        return out

    def fill(self, matchers: Sequence[llguidance.LLMatcher]) -> np.ndarray:
        """The next-token masks of `matchers`, row i for matcher i: int32 words, bit j of
        word w allowing token 32*w + j. Computed without the GIL, in parallel where there
        are cores to spare."""
        masks = llguidance.numpy.allocate_token_bitmask(len(matchers), self.n_vocab)
        if matchers:
            self.tokenizer()  # the executor
            if self._executor is not None:
                llguidance.numpy.fill_next_token_bitmask_par(
                    self._executor, [(m, i) for i, m in enumerate(matchers)], masks
                )
            else:
                for i, m in enumerate(matchers):
                    llguidance.numpy.fill_next_token_bitmask(m, masks, i)
        return masks


def check(matcher: llguidance.LLMatcher, mask: np.ndarray) -> None:
    """Raise GrammarError when `mask` (just filled) leaves the sequence nowhere to go."""
    if matcher.is_error():  # its mask then allows only EOS: fail instead
        raise GrammarError(f"grammar failed: {matcher.get_error()}")
    if not mask.any():
        raise GrammarError("the grammar allows no token here")


def allowed(masks: np.ndarray, n_vocab: int) -> np.ndarray:
    """Bitmask rows [k, words] as booleans [k, n_vocab]."""
    words = masks.astype("<i4", copy=False)  # bit j of a word is token j: little-endian bytes
    bits = np.unpackbits(words.view(np.uint8), axis=-1, count=n_vocab, bitorder="little")
    return bits.view(np.bool_)


_BIAS = np.array([-np.inf, 0.0], dtype=np.float32)  # by bit: forbidden, allowed


def mask_logits(logits: np.ndarray, mask: np.ndarray) -> None:
    """Set the logits of tokens `mask` (one bitmask row) forbids to -inf, in place."""
    bits = allowed(mask, logits.shape[-1]).view(np.uint8)
    # adding a looked-up bias has no branch: faster than putmask on ragged masks
    np.add(logits, _BIAS.take(bits), out=logits)


def advance(matcher: llguidance.LLMatcher, token: int) -> bool:
    """Feed the sampled token to the matcher; True when the grammar is complete (it takes
    nothing more but EOS)."""
    if not matcher.consume_token(token):
        raise GrammarError(f"token {token} breaks the grammar: {matcher.get_error()}")
    return matcher.is_stopped()


def llamacpp_tokenizer(
    vocab, token_piece: Callable[[int], bytes], n_vocab: int, end_tokens: frozenset[int]
) -> llguidance.LLTokenizer:
    """llguidance's tokenizer over a llama.cpp vocabulary (as `llguidance.llamacpp` builds it,
    without its deprecated per-token calls); `token_piece(t)` is t's text, special tokens
    written out. It tokenizes with llama.cpp itself, through `vocab`, which must outlive it."""
    import llama_cpp as lc

    special = lc.LLAMA_TOKEN_ATTR_CONTROL
    tokens = []
    for t in range(n_vocab):
        piece = token_piece(t)
        attr = lc.llama_vocab_get_attr(vocab, t)
        # Control tokens, and user-defined ones that look like them (`<|...|>`), are marked
        # with a leading 0xff: no text the grammar allows can produce them.
        if attr & special or (attr & lc.LLAMA_TOKEN_ATTR_USER_DEFINED
                              and piece.startswith(b"<") and piece.endswith(b">")):
            piece = b"\xff" + piece
        tokens.append(piece)
    tokenize = ctypes.cast(lc.llama_cpp._lib.llama_tokenize, ctypes.c_void_p).value
    return llguidance.LLTokenizer.from_llamacpp(
        tokens=tokens, vocab_ptr=vocab, tokenize_fptr=tokenize,
        eos_token=sorted(end_tokens) or None, slices=None,
    )


def hf_tokenizer(tokenizer, n_vocab: int, end_tokens: frozenset[int]) -> llguidance.LLTokenizer:
    import llguidance.hf

    try:
        return llguidance.hf.from_tokenizer(
            tokenizer, n_vocab=n_vocab, eos_token=sorted(end_tokens) or None
        )
    except ValueError as exc:  # a slow (Python) tokenizer
        raise GrammarError(f"grammars need a fast tokenizer: {exc}") from exc
