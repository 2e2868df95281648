"""How to build an engine, as plain data: the server process keeps the spec (and builds
the tokenizer from it), a child process builds the engine from it, again on a restart."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from llmserve.engines.stepping import StepLoopEngine

EngineKind = Literal["llamacpp", "transformers", "vllm"]


class Tokenizer(Protocol):
    def tokenize(self, text: str, *, add_bos: bool) -> list[int]: ...

    def detokenize(self, ids: list[int]) -> str: ...

    def token_strs(self, ids: list[int]) -> list[str]: ...


@dataclass(frozen=True)
class EngineSpec:
    kind: EngineKind
    path: Path
    options: dict[str, Any] = field(default_factory=dict)  # the engine class's keywords

    def build(self) -> StepLoopEngine:
        if self.kind == "llamacpp":
            from llmserve.engines.llamacpp import LlamaCppEngine

            return LlamaCppEngine(self.path, **self.options)
        if self.kind == "vllm":
            # not a StepLoopEngine: vLLM's AsyncLLM, served in the server process (engines/vllm.py)
            from llmserve.engines.vllm import VllmEngine

            return VllmEngine(self.path, **self.options)  # type: ignore[return-value]
        from llmserve.engines.transformers import TransformersEngine

        return TransformersEngine(self.path, **self.options)

    def tokenizer(self) -> Tokenizer:
        """The model's tokenizer without its weights."""
        if self.kind == "llamacpp":
            from llmserve.engines.llamacpp import LlamaCppVocab

            return LlamaCppVocab(self.path)
        from llmserve.engines.hf_loading import HFTokenizer

        if self.kind == "vllm":
            return HFTokenizer(self.path, trust_remote_code=self.options.get("trust_remote_code", False))
        return HFTokenizer(self.path, gguf_file=self.options.get("gguf_file"),
                           trust_remote_code=self.options.get("trust_remote_code", False))


class BatchModel(Protocol):
    """A model that answers batches in a child process (engines.worker.batch_main)."""

    def facts(self) -> dict[str, Any]: ...

    def run(self, inputs: list[Any]) -> Any: ...


class BatchSpec(Protocol):
    path: Path

    def build(self) -> BatchModel: ...


@dataclass(frozen=True)
class EmbedderSpec:
    path: Path

    def build(self) -> BatchModel:
        from llmserve.engines.sentence_embedder import SentenceEmbedder

        return SentenceEmbedder(self.path)


@dataclass(frozen=True)
class CrossEncoderSpec:
    path: Path

    def build(self) -> BatchModel:
        from llmserve.engines.cross_encoder import CrossEncoderModel

        return CrossEncoderModel(self.path)
