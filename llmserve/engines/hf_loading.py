"""Loading a Hugging Face model for the transformers engine: the files checked, the
tokenizer (also loaded alone, without the weights, by the server process), the weights (a
checkpoint directory, or a GGUF file dequantized), and the facts read from them: positions,
chat template, and the raw bytes of every token."""

from __future__ import annotations

import llmserve.engines.hf_offline  # noqa: F401 - before transformers

# isort: split

import contextlib
import json
import re
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from llmserve.engines.base import EngineError

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def resolve_device(device: str | torch.device) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    resolved = getattr(torch, str(dtype), None)
    if isinstance(resolved, torch.dtype):
        return resolved
    raise ValueError(f"unknown dtype {dtype!r}")


def check_files(path: Path, gguf_file: str | None) -> tuple[Path, str | None]:
    """The model directory and GGUF file name; FileNotFoundError naming what is missing."""
    if gguf_file is None and path.suffix == ".gguf" and not path.is_dir():
        path, gguf_file = path.parent, path.name  # a GGUF file given directly
    if not path.is_dir():
        raise FileNotFoundError(f"model directory not found: {path}")
    if gguf_file is not None:
        if not (path / gguf_file).is_file():
            raise FileNotFoundError(f"GGUF file not found: {path / gguf_file}")
        return path, gguf_file
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no config.json in model directory {path}")
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        raise FileNotFoundError(
            f"no tokenizer in model directory {path} (looked for {', '.join(_TOKENIZER_FILES)})"
        )
    return path, None


class HFTokenizer:
    """A Hugging Face tokenizer as the serving core uses it; loads without the weights, so
    the server process can tokenize while the engine runs in its own."""

    def __init__(self, path: str | Path, *, gguf_file: str | None = None,
                 trust_remote_code: bool = False) -> None:
        path, gguf_file = check_files(Path(path), gguf_file)
        self.tokenizer = load_tokenizer(path, gguf_file, trust_remote_code)
        self._bos_id: int | None = self.tokenizer.bos_token_id

    def tokenize(self, text: str, *, add_bos: bool) -> list[int]:
        # Added special tokens written in the text (`<|im_start|>`) become those tokens.
        ids = list(self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
        if add_bos and self._bos_id is not None:
            ids.insert(0, self._bos_id)
        return ids

    def detokenize(self, ids: list[int]) -> str:
        # special tokens written out, and no space "cleaned up": the text that tokenizes back
        return self.tokenizer.decode(ids, skip_special_tokens=False,
                                     clean_up_tokenization_spaces=False)

    def token_strs(self, ids: list[int]) -> list[str]:
        # a model's vocabulary may be larger than its tokenizer's: such ids have no string
        return [t if t is not None else "" for t in self.tokenizer.convert_ids_to_tokens(ids)]


def load_tokenizer(path: Path, gguf_file: str | None, trust_remote_code: bool):
    kwargs: dict[str, Any] = {"local_files_only": True, "trust_remote_code": trust_remote_code}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    try:
        return AutoTokenizer.from_pretrained(path, **kwargs)
    except OSError as exc:
        raise FileNotFoundError(f"cannot load the tokenizer from {path}: {exc}") from exc


def load_model(path: Path, gguf_file: str | None, dtype: torch.dtype, trust_remote_code: bool):
    if gguf_file:
        return load_gguf_model(path, gguf_file, dtype, trust_remote_code)
    try:
        return AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, local_files_only=True, trust_remote_code=trust_remote_code
        )
    except OSError as exc:
        raise FileNotFoundError(f"cannot load the model from {path}: {exc}") from exc


def load_gguf_model(path: Path, gguf_file: str, dtype: torch.dtype, trust_remote_code: bool):
    """A GGUF file, dequantized into a model built from its config.

    `from_pretrained(gguf_file=...)` wants `accelerate`; building the model from the GGUF's
    config and loading the dequantized tensors needs only transformers and gguf.
    """
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    file = path / gguf_file
    config = AutoConfig.from_pretrained(
        path, gguf_file=gguf_file, local_files_only=True, trust_remote_code=trust_remote_code
    )
    try:  # every weight is overwritten: skip the random init (135M weights: seconds)
        from transformers.initialization import no_init_weights
    except ImportError:
        no_init_weights = contextlib.nullcontext
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(
            config, dtype=dtype, trust_remote_code=trust_remote_code
        )
    tensors = load_gguf_checkpoint(str(file), return_tensors=True, model_to_load=model)["tensors"]
    result = model.load_state_dict(tensors, strict=False)
    model.tie_weights()
    loaded = {p.data_ptr() for name, p in model.named_parameters() if name in tensors}
    missing = [k for k in result.missing_keys if model.get_parameter(k).data_ptr() not in loaded]
    if missing:
        raise EngineError(f"{file} has no weights for {', '.join(missing[:5])}")
    return model


def max_positions(config, tokenizer) -> int:
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    value = getattr(tokenizer, "model_max_length", None)
    if isinstance(value, int) and 0 < value < 10**7:
        return value
    return 2048


def as_str(token: Any) -> str:
    if token is None:
        return ""
    return str(getattr(token, "content", token))


def chat_template(tokenizer) -> str | None:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default") or next(iter(template.values()), None)
    return template or None


# -- token bytes ---------------------------------------------------------------------------


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-to-unicode table, reversed: the character a byte-level BPE vocabulary
    writes for each byte -> that byte."""
    visible = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(visible)
    extra = 0
    for b in range(256):
        if b not in visible:
            visible.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(visible, chars, strict=True)}


def _vocab_kind(tokenizer, tokens: list[str | None]) -> str:
    """'bytelevel' (GPT-2 style), 'sentencepiece' (▁ and <0xNN>) or 'plain'."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None) if backend is not None else None
    if decoder is not None:
        try:
            spec = json.dumps(json.loads(decoder.__getstate__()))
        except Exception:  # noqa: BLE001 - fall back to looking at the vocabulary
            spec = ""
        if '"ByteLevel"' in spec:
            return "bytelevel"
        if "ByteFallback" in spec or "Metaspace" in spec or "\\u2581" in spec:
            return "sentencepiece"
    bytelevel = sum(1 for t in tokens if t and "Ġ" in t)
    spm = sum(1 for t in tokens if t and "▁" in t)
    if bytelevel > spm:
        return "bytelevel"
    return "sentencepiece" if spm else "plain"


def token_bytes_table(tokenizer, n_vocab: int) -> list[bytes]:
    n_tok = min(len(tokenizer), n_vocab)
    tokens = tokenizer.convert_ids_to_tokens(list(range(n_tok)))
    special = set(tokenizer.all_special_ids)
    added_text: dict[int, str] = {}
    for tid, added in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if getattr(added, "special", False):
            special.add(tid)
        else:
            added_text[tid] = str(added)  # written as plain text, not byte-level characters
    kind = _vocab_kind(tokenizer, tokens)
    byte_decoder = _byte_decoder()
    table: list[bytes] = []
    for tid, tok in enumerate(tokens):
        if tok is None or tid in special:
            table.append(b"")
        elif tid in added_text:
            table.append(added_text[tid].encode())
        elif kind == "bytelevel":
            try:
                table.append(bytes(byte_decoder[c] for c in tok))
            except KeyError:
                table.append(tok.encode())
        elif kind == "sentencepiece":
            m = _BYTE_FALLBACK.match(tok)
            table.append(bytes([int(m.group(1), 16)]) if m else tok.replace("▁", " ").encode())
        else:
            table.append(tokenizer.convert_tokens_to_string([tok]).encode())
    table.extend(b"" for _ in range(n_vocab - n_tok))  # model rows with no token
    return table
