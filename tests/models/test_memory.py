"""The memory estimate: weights from the files, KV cache from the GGUF header or
config.json, against --memory-limit."""

from __future__ import annotations

import json
from pathlib import Path

from llmserve.config import Settings
from llmserve.models.memory import PROCESS_OVERHEAD, Budget, estimate_bytes, gguf_metadata, kv_shape
from llmserve.models.entries import ModelEntry
from llmserve.models import bundled_model_path
from llmserve.models.residency import Slot

GGUF = bundled_model_path()


def test_gguf_header_of_the_bundled_model():
    meta = gguf_metadata(GGUF, lambda k: k.startswith("llama.") or k == "general.architecture")
    assert meta["general.architecture"] == "llama"
    assert meta["llama.block_count"] == 30
    # SmolLM2-135M: 30 layers, 3 KV heads of 64, trained on 8192 tokens
    assert kv_shape(GGUF) == (30, 3, 64, 8192)


def test_config_json_shape(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
        "hidden_size": 896, "max_position_embeddings": 32768}))
    assert kv_shape(tmp_path) == (24, 2, 64, 32768)


def test_estimate_is_weights_plus_kv_cache_plus_process():
    settings = Settings(context_length=2048, max_sequences=4)
    kv = 2 * 30 * 3 * 64 * 2048 * 4 * 2
    got = estimate_bytes(ModelEntry(("m",), GGUF), settings)
    assert got == GGUF.stat().st_size + kv + PROCESS_OVERHEAD
    # the model's own settings count, not the server's
    own = ModelEntry(("m",), GGUF, max_sequences=1)
    assert estimate_bytes(own, own.settings(settings)) == got - kv * 3 // 4


def test_memory_limit_less_what_loaded_models_take():
    budget = Budget(Settings(memory_limit="1G", context_length=512, max_sequences=1))
    entry = ModelEntry(("m",), GGUF)
    need = budget.estimate(entry)
    loaded = Slot(ModelEntry(("other",), GGUF), state="running")
    assert budget.free([]) == 1024**3
    assert budget.free([loaded]) == 1024**3 - need
    assert budget.frees(loaded) == need
    message = budget.refusal(entry, need, 100 * 2**20, 0)
    assert f"needs about {need // 2**20} MiB" in message
    assert "--memory-limit 1024 MiB" in message and "only 100 MiB are free" in message


def test_without_a_limit_what_the_kernel_has():
    budget = Budget(Settings(), available=lambda: 5 * 2**30)
    loading = Slot(ModelEntry(("l",), Path("x")), state="loading", estimate=2**30)
    assert budget.free([loading]) == 4 * 2**30
