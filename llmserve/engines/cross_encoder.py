"""Cross-encoders (rerankers) through sentence-transformers, loaded from local files only:
a query and a document read together, one relevance score out."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np

# Never reach for a model hub: weights come from disk or not at all.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


class Pair(NamedTuple):
    """A query and a document as the model reads them: `[CLS] q [SEP] d [SEP]` and, for
    models that take them (BERT), which segment each token belongs to."""

    ids: list[int]
    types: list[int] | None


def check_cross_encoder(path: Path) -> None:
    """A directory holding a sequence-classification model, or FileNotFoundError saying why
    not (an embedding model would load with a random scoring head and rank at random)."""
    config = path / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"no cross-encoder model in {path} (config.json is missing)")
    architectures = json.loads(config.read_text()).get("architectures") or []
    if not any(a.endswith("ForSequenceClassification") for a in architectures):
        raise FileNotFoundError(
            f"{path} is not a cross-encoder: its architectures are {architectures or 'not given'}, "
            "none of them ...ForSequenceClassification"
        )


class PairTokenizer:
    """The cross-encoder's tokenizer alone (no weights), for the server process."""

    def __init__(self, path: str | Path) -> None:
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self._types = "token_type_ids" in self.tokenizer.model_input_names

    def tokenize_pair(self, query: str, document: str) -> Pair:
        """As sentence-transformers' CrossEncoder tokenizes a pair, never truncated."""
        enc = self.tokenizer(query, document, add_special_tokens=True, truncation=False,
                             return_token_type_ids=self._types)
        return Pair(list(enc["input_ids"]), list(enc["token_type_ids"]) if self._types else None)


class CrossEncoderModel:
    """Pairs of token ids in, one score per pair out, with the model's own activation
    (sigmoid for one label unless the model says otherwise), as `CrossEncoder.predict`
    gives it. Thread-compatible: `run` is called one batch at a time."""

    def __init__(self, path: str | Path, *, device: str = "cpu") -> None:
        path = Path(path)
        check_cross_encoder(path)
        import torch
        from sentence_transformers import CrossEncoder

        self._torch = torch
        self._model = CrossEncoder(str(path), device=device, local_files_only=True)
        self._model.eval()
        if self._model.num_labels != 1:
            raise ValueError(f"{path} has {self._model.num_labels} labels; a reranker has one "
                             "(a relevance score)")
        tokenizer = self._model.tokenizer
        self._pad = tokenizer.pad_token_id or 0
        self._max_tokens = int(self._model.max_seq_length)

    @property
    def max_input_tokens(self) -> int:
        return self._max_tokens

    def facts(self) -> dict[str, int]:
        return {"max_input_tokens": self._max_tokens}

    def run(self, pairs: list[Pair]) -> list[float]:
        return self.score(pairs)

    def score(self, pairs: list[Pair]) -> list[float]:
        torch = self._torch
        width = max(len(p.ids) for p in pairs)
        ids = torch.full((len(pairs), width), self._pad, dtype=torch.long)
        mask = torch.zeros((len(pairs), width), dtype=torch.long)
        types = torch.zeros((len(pairs), width), dtype=torch.long)
        for row, pair in enumerate(pairs):
            ids[row, : len(pair.ids)] = torch.tensor(pair.ids, dtype=torch.long)
            mask[row, : len(pair.ids)] = 1
            if pair.types is not None:
                types[row, : len(pair.types)] = torch.tensor(pair.types, dtype=torch.long)
        features = {"input_ids": ids, "attention_mask": mask}
        if pairs[0].types is not None:
            features["token_type_ids"] = types
        device = self._model.device
        features = {k: v.to(device) for k, v in features.items()}
        with torch.inference_mode():
            scores = self._model(features)["scores"].float()
            if self._model.activation_fn is not None:
                scores = self._model.activation_fn(scores)
        return np.asarray(scores.reshape(len(pairs)).cpu().numpy(), dtype=np.float64).tolist()
