"""The models a server serves: the list of them (entries), loading one (loading), the
registry that loads and unloads them by name (registry, by residency's rules and memory's
estimate), and the status table `llmserve models` prints (table)."""

from llmserve.models.entries import served_name_for
from llmserve.models.loading import (
    ServedEmbedder,
    ServedModel,
    ServedReranker,
    bundled_embedding_path,
    bundled_model_path,
    engine_spec,
    load_engine,
    load_registry,
)

__all__ = [
    "ServedEmbedder", "ServedModel", "ServedReranker", "bundled_embedding_path",
    "bundled_model_path", "engine_spec", "load_engine", "load_registry", "served_name_for",
]
