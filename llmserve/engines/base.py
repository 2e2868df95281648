"""What every engine offers the serving core: token ids in, token ids out.

Engines know nothing of text rules (stops, UTF-8, templates): they tokenize, give each
token's raw bytes, and decode many sequences together.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How one sequence (one choice) is sampled. Temperature 0 means greedy."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    logprobs: int | None = None  # None: no logprobs; k: the chosen token and k alternatives
    ignore_eos: bool = False
    # A serialized llguidance grammar (LLMatcher.grammar_from_json_schema / _lark / _regex):
    # every sampled token obeys it, and the sequence stops ("stop") once it is complete.
    grammar: str | None = None


@dataclass(frozen=True, slots=True)
class TokenOutput:
    """One generated token of one sequence.

    `end_of_generation` marks an end-of-generation token (EOS, end of turn): it counts as a
    generated token but carries no text. `finish_reason` is set on the sequence's last token.
    """

    index: int
    token_id: int
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] | None = None
    end_of_generation: bool = False
    finish_reason: FinishReason | None = None


class EngineError(RuntimeError):
    """The engine failed while generating (not the request's fault)."""


class EngineDown(EngineError):
    """The engine is not there: its process died, or is being restarted.

    `retry_after` is the seconds until it is expected back."""

    def __init__(self, message: str, *, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(frozen=True, slots=True)
class EngineInfo:
    """The facts of a loaded engine that the serving core reads; the same on every restart."""

    context_length: int
    max_sequences: int
    vocab_size: int
    end_tokens: frozenset[int]
    token_bytes: list[bytes]
    chat_template: str | None
    bos_token: str
    eos_token: str
    add_bos: bool
    # LoRA adapters by name: None where loaded, else why it failed (that adapter's requests
    # are refused with the reason; the engine and its other adapters serve on).
    adapters: dict[str, str | None] = field(default_factory=dict)


class EngineFacts:
    """The `Engine` protocol's facts, read from `self.info` (set once the model is loaded):
    one implementation for engines in this process and in a child process."""

    info: EngineInfo

    @property
    def context_length(self) -> int:
        return self.info.context_length

    @property
    def max_sequences(self) -> int:
        return self.info.max_sequences

    @property
    def vocab_size(self) -> int:
        return self.info.vocab_size

    @property
    def end_tokens(self) -> frozenset[int]:
        """End-of-generation tokens (EOS, end of turn)."""
        return self.info.end_tokens

    @property
    def chat_template(self) -> str | None:
        return self.info.chat_template

    @property
    def bos_token(self) -> str:
        return self.info.bos_token

    @property
    def eos_token(self) -> str:
        return self.info.eos_token

    @property
    def add_bos(self) -> bool:
        return self.info.add_bos

    def token_bytes(self, token_id: int) -> bytes:
        return self.info.token_bytes[token_id]

    @property
    def adapters(self) -> dict[str, str | None]:
        return self.info.adapters

    def spec_decode_stats(self) -> SpecDecodeStats | None:
        """Speculative decoding's counters; None where this engine does not speculate."""
        return None


@dataclass(frozen=True, slots=True)
class SpecDecodeStats:
    """Speculative decoding so far, counted as vLLM counts it: drafts proposed, tokens
    drafted, drafted tokens accepted, and accepted tokens by their position in the draft."""

    drafts: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0
    accepted_per_pos: tuple[int, ...] = ()

    def __add__(self, other: SpecDecodeStats) -> SpecDecodeStats:
        a, b = self.accepted_per_pos, other.accepted_per_pos
        n = max(len(a), len(b))
        a, b = a + (0,) * (n - len(a)), b + (0,) * (n - len(b))
        return SpecDecodeStats(self.drafts + other.drafts,
                               self.draft_tokens + other.draft_tokens,
                               self.accepted_tokens + other.accepted_tokens,
                               tuple(x + y for x, y in zip(a, b)))


class SpecCounter:
    """An engine's running `SpecDecodeStats` (decode-thread side)."""

    __slots__ = ("accepted_per_pos", "accepted_tokens", "draft_tokens", "drafts")

    def __init__(self) -> None:
        self.drafts = self.draft_tokens = self.accepted_tokens = 0
        self.accepted_per_pos: list[int] = []

    def record(self, drafted: int, accepted: int) -> None:
        """One draft of `drafted` tokens of which the first `accepted` were taken."""
        self.drafts += 1
        self.draft_tokens += drafted
        self.accepted_tokens += accepted
        if len(self.accepted_per_pos) < drafted:
            self.accepted_per_pos.extend([0] * (drafted - len(self.accepted_per_pos)))
        for i in range(accepted):
            self.accepted_per_pos[i] += 1

    def snapshot(self) -> SpecDecodeStats:
        return SpecDecodeStats(self.drafts, self.draft_tokens, self.accepted_tokens,
                               tuple(self.accepted_per_pos))


@dataclass(frozen=True, slots=True)
class EngineHealth:
    """`running`, `starting`, `stalled` (no progress: being killed, then `restarting`),
    `restarting`, `failed` (down for good) or `stopped`."""

    state: str
    reason: str | None = None
    pid: int | None = None
    restarts: int = 0

    @property
    def ok(self) -> bool:
        return self.state == "running"


def check_request(
    prompt: list[int], params: list[SamplingParams], *, max_sequences: int, context_length: int,
    adapter: str | None = None, adapters: Mapping[str, str | None] | None = None,
) -> None:
    """What every engine refuses before taking a request."""
    if adapter is not None:
        known = adapters or {}
        if adapter not in known:
            raise ValueError(f"no LoRA adapter named '{adapter}' is loaded")
        if known[adapter] is not None:
            raise ValueError(f"the LoRA adapter '{adapter}' failed to load: {known[adapter]}")
    if not prompt:
        raise ValueError("empty prompt")
    if not params:
        raise ValueError("no sequences requested")
    if len(params) > max_sequences:
        raise ValueError(f"{len(params)} sequences requested, at most {max_sequences}")
    if len(prompt) >= context_length:
        raise ValueError(
            f"prompt of {len(prompt)} tokens leaves no room in the context ({context_length})"
        )


class GenerationStream(Protocol):
    """The engine's side of one request: its tokens, step by step, and a way to stop it."""

    def __aiter__(self) -> AsyncIterator[list[TokenOutput]]: ...

    def cancel(self, index: int | None = None) -> None:
        """Stop one sequence (or all): its KV cache is freed at the start of the next step."""


class Engine(Protocol):
    """A model that decodes batches of sequences."""

    @property
    def context_length(self) -> int:
        """Tokens one sequence may hold: prompt plus generated."""

    @property
    def max_sequences(self) -> int:
        """Sequences decoded together; a request with n choices needs n of them."""

    @property
    def chat_template(self) -> str | None: ...

    @property
    def bos_token(self) -> str: ...

    @property
    def eos_token(self) -> str: ...

    @property
    def add_bos(self) -> bool:
        """Whether a raw prompt should start with BOS."""

    def tokenize(self, text: str, *, add_bos: bool) -> list[int]:
        """Tokens of `text`; special-token text (e.g. `<|im_start|>`) becomes special tokens."""

    def detokenize(self, ids: list[int]) -> str:
        """The text of `ids` (each within the vocabulary) as the model's tokenizer decodes
        it, special tokens written out (`<|im_start|>`)."""

    def token_strs(self, ids: list[int]) -> list[str]:
        """Each token as its vocabulary writes it (`Ġword`, `▁word`, `<0x0A>`)."""

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes a token stands for (may be part of a UTF-8 character)."""

    @property
    def adapters(self) -> dict[str, str | None]:
        """LoRA adapters by name: None where loaded, else why not."""

    @property
    def vocab_size(self) -> int: ...

    @property
    def end_tokens(self) -> frozenset[int]:
        """Tokens that end generation (EOS, end of turn)."""

    async def start(self) -> None:
        """Start the decode loop; called once from the event loop that will consume streams."""

    async def stop(self) -> None: ...

    def health(self) -> EngineHealth: ...

    def spec_decode_stats(self) -> SpecDecodeStats | None:
        """Speculative decoding's counters; None where this engine does not speculate."""

    def generate(
        self, prompt: list[int], params: list[SamplingParams], *, request_id: str | None = None,
        adapter: str | None = None,
    ) -> GenerationStream:
        """Generate one sequence per entry of `params`, all from the same prompt; raises
        EngineDown when the engine is not there. `request_id` names it in logs; `adapter`
        is the LoRA adapter to decode with (None: the base model)."""

    async def load_adapter(self, name: str, path: str, scale: float = 1.0) -> None:
        """Serve one more LoRA adapter, loaded now (between two steps); EngineError with
        the reason if it cannot be, and then nothing changed."""

    async def unload_adapter(self, name: str) -> bool:
        """Refuse `name`'s requests from now on; those under way finish under it, and it is
        freed after them. False: no adapter of that name."""
