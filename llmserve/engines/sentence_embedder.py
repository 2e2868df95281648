"""Embedding models through sentence-transformers, loaded from local files only."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from llmserve.engines.base import EngineHealth

# Never reach for a model hub: weights come from disk or not at all.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


class EmbeddingTokenizer:
    """The embedding model's tokenizer alone (no weights), for the server process."""

    def __init__(self, path: str | Path) -> None:
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)

    def tokenize(self, text: str) -> list[int]:
        """With the model's own special tokens (e.g. [CLS] ... [SEP]) around the text."""
        return list(self.tokenizer(text, add_special_tokens=True, truncation=False)["input_ids"])


class SentenceEmbedder:
    """Token ids in, one vector per input out. Thread-compatible: `embed` runs off the
    event loop, one call at a time."""

    def __init__(self, path: str | Path, *, device: str = "cpu") -> None:
        path = Path(path)
        if not (path / "modules.json").is_file() and not (path / "config.json").is_file():
            raise FileNotFoundError(f"no sentence-transformers model in {path}")
        import torch
        from sentence_transformers import SentenceTransformer

        self._torch = torch
        self.path = path
        self._model = SentenceTransformer(str(path), device=device, local_files_only=True)
        self._model.eval()
        self._tokenizer = self._model.tokenizer
        dim = getattr(self._model, "get_embedding_dimension", None) or (
            self._model.get_sentence_embedding_dimension  # sentence-transformers < 6
        )
        self._dimensions = int(dim())
        self._max_tokens = int(self._model.max_seq_length)
        self._vocab_size = int(len(self._tokenizer))
        self._pad = self._tokenizer.pad_token_id or 0

    @property
    def dimensions(self) -> int:
        return self._dimensions

    @property
    def max_input_tokens(self) -> int:
        return self._max_tokens

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def tokenize(self, text: str) -> list[int]:
        """With the model's own special tokens (e.g. [CLS] ... [SEP]) around the text."""
        return list(self._tokenizer(text, add_special_tokens=True, truncation=False)["input_ids"])

    def facts(self) -> dict[str, int]:
        """What the server process needs to know, sent once loaded (engines.worker)."""
        return {"dimensions": self.dimensions, "max_input_tokens": self.max_input_tokens,
                "vocab_size": self.vocab_size}

    def run(self, inputs: list[list[int]]) -> np.ndarray:
        return self.embed(inputs)

    def health(self) -> EngineHealth:
        return EngineHealth("running")

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    def embed(self, inputs: list[list[int]]) -> np.ndarray:
        torch = self._torch
        width = max(len(ids) for ids in inputs)
        ids = torch.full((len(inputs), width), self._pad, dtype=torch.long)
        mask = torch.zeros((len(inputs), width), dtype=torch.long)
        for row, tokens in enumerate(inputs):
            ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            mask[row, : len(tokens)] = 1
        features = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self._tokenizer.model_input_names:
            features["token_type_ids"] = torch.zeros_like(ids)
        device = self._model.device
        features = {k: v.to(device) for k, v in features.items()}
        with torch.inference_mode():
            out = self._model(features)["sentence_embedding"]
        return out.float().cpu().numpy()
