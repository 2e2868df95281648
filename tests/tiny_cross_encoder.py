"""A tiny cross-encoder built on the spot: a random-weight BertForSequenceClassification
with one label, saved with the bundled all-MiniLM-L6-v2's tokenizer. Nothing is downloaded;
weights spread wide enough (initializer_range) that its scores differ clearly."""

from __future__ import annotations

from pathlib import Path

MAX_POSITIONS = 64


def build_cross_encoder(directory: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from llmserve.models import bundled_embedding_path

    tokenizer = AutoTokenizer.from_pretrained(str(bundled_embedding_path()), local_files_only=True)
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=MAX_POSITIONS, num_labels=1,
        initializer_range=0.5,
    )
    torch.manual_seed(0)
    model = BertForSequenceClassification(config).eval()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
