"""Small LoRA adapters for the bundled model, built by the tests (no hub, no training): random
low-rank updates strong enough that greedy output changes, written as llama.cpp's GGUF LoRA
(what `convert_lora_to_gguf.py` writes: `general.type = adapter`, `adapter.lora.alpha`, and a
`<base tensor>.lora_a` / `.lora_b` pair per adapted weight)."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

TARGETS = ("attn_q", "attn_v", "ffn_up")


def write_gguf_lora(path: Path, base: Path, *, seed: int, rank: int = 8, alpha: float = 16.0,
                    std: float = 0.05, targets: tuple[str, ...] = TARGETS) -> Path:
    """An adapter of `base` (a GGUF model) at `path`: for every weight named `blk.N.<target>`,
    A (rank x in) and B (out x rank) with normal entries of `std`, seeded."""
    reader = gguf.GGUFReader(base)
    arch = str(bytes(reader.fields["general.architecture"].parts[-1]), "utf-8")
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    for tensor in reader.tensors:
        stem = tensor.name.removesuffix(".weight")
        if not (stem.startswith("blk.") and stem.split(".")[-1] in targets):
            continue
        n_in, n_out = (int(d) for d in tensor.shape[:2])  # GGUF order: ne[0] = inputs
        a = rng.normal(0.0, std, (rank, n_in)).astype(np.float32)
        b = rng.normal(0.0, std, (n_out, rank)).astype(np.float32)
        writer.add_tensor(f"{tensor.name}.lora_a", a)
        writer.add_tensor(f"{tensor.name}.lora_b", b)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
