"""The models a server can serve, as entries: from `--model` (once or repeated),
`--models-dir`, `--models-file` (TOML), or the one-model default (the bundled SmolLM2 and
the bundled embedder). Nothing is loaded here; names are checked once, at start."""

from __future__ import annotations

import dataclasses
import json
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from llmserve.config import Settings
from llmserve.errors import ModelListError

Kind = Literal["chat", "embedding", "rerank"]
KINDS: tuple[str, ...] = ("chat", "embedding", "rerank")

# Files that make a directory a sentence-transformers model (an embedder), not a chat model.
_SENTENCE_TRANSFORMERS = ("modules.json", "sentence_bert_config.json",
                          "config_sentence_transformers.json")


@dataclass(frozen=True)
class ModelEntry:
    """One servable model: the names clients send (the first is its id), where it is, and
    the settings of its own (None: the server's flag)."""

    names: tuple[str, ...]
    path: Path
    kind: Kind = "chat"
    load_at_start: bool = False
    engine: str | None = None
    context_length: int | None = None
    max_sequences: int | None = None
    dtype: str | None = None
    device: str | None = None
    chat_template: str | None = None
    threads: int | None = None
    reasoning_parser: str | None = None
    # A LoRA adapter: the chat model it adapts (`path` is the adapter), and its scale.
    base: str | None = None
    scale: float = 1.0

    @property
    def name(self) -> str:
        return self.names[0]

    @property
    def is_adapter(self) -> bool:
        return self.base is not None

    def settings(self, base: Settings) -> Settings:
        """The server's settings with this model's own on top (validated as flags are)."""
        own = {f: getattr(self, f) for f in _OVERRIDES if getattr(self, f) is not None}
        return Settings.model_validate({**base.model_dump(), **own}) if own else base


# The per-model settings that override the server's flags of the same name.
_OVERRIDES = ("engine", "context_length", "max_sequences", "dtype", "device", "chat_template",
              "threads", "reasoning_parser")


def served_name_for(path: Path) -> str:
    """`SmolLM2-135M-Instruct.Q4_1.gguf` -> `smollm2-135m-instruct`; a directory: its name."""
    stem = path.name.removesuffix(".gguf")
    stem = re.sub(r"[.-](?:[QqIi]Q?\d\w*|[Ff]16|[Ff]32|[Bb][Ff]16)$", "", stem)
    return stem.lower()


def parse_model_flag(value: str) -> ModelEntry:
    """`PATH` or `NAME=PATH` (a path that exists as given wins over a split at `=`)."""
    name, sep, rest = value.partition("=")
    if sep and name and "/" not in name and not Path(value).exists():
        path = Path(rest).expanduser()
        return ModelEntry((name,), path, kind=_kind_of(path))
    path = Path(value).expanduser()
    return ModelEntry((served_name_for(path),), path, kind=_kind_of(path))


def parse_lora_flag(value: str, base: str) -> ModelEntry:
    """`NAME=PATH`: an adapter of the model `base`."""
    name, sep, path = value.partition("=")
    if not (sep and name and path):
        raise ModelListError(f"--lora {value}: NAME=PATH (the adapter's served name, its file)")
    return ModelEntry((name,), Path(path).expanduser(), base=base)


def scan_models_dir(directory: Path) -> list[ModelEntry]:
    """Every GGUF file and model directory in `directory` (not below), by name."""
    if not directory.is_dir():
        raise ModelListError(f"--models-dir: not a directory: {directory}")
    found = []
    for path in sorted(directory.iterdir()):
        if path.name.startswith("."):
            continue
        is_gguf = path.is_file() and path.suffix.lower() == ".gguf"
        is_model_dir = path.is_dir() and any(
            (path / f).is_file() for f in ("config.json", *_SENTENCE_TRANSFORMERS))
        if is_gguf or is_model_dir:
            found.append(ModelEntry((served_name_for(path),), path, kind=_kind_of(path)))
    return found


def read_models_file(file: Path) -> list[ModelEntry]:
    """A TOML file of `[models.NAME]` tables: `path` (relative to the file), and optionally
    `aliases`, `kind`, `engine`, `context_length`, `max_sequences`, `dtype`, `device`,
    `chat_template`, `threads`, `reasoning_parser`, `load_at_start`. A table with `base`
    (a chat model's name) is a LoRA adapter of it: `path`, `aliases`, `scale`."""
    try:
        data = tomllib.loads(file.read_text())
    except OSError as exc:
        raise ModelListError(f"--models-file: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ModelListError(f"--models-file {file}: not TOML: {exc}") from None
    unknown = set(data) - {"models"}
    if unknown:
        raise ModelListError(f"--models-file {file}: unknown top-level key(s) "
                             f"{', '.join(sorted(unknown))} (models go in [models.NAME] tables)")
    models = data.get("models", {})
    if not isinstance(models, dict):
        raise ModelListError(f"--models-file {file}: `models` must be tables [models.NAME]")
    return [_file_entry(file, name, table) for name, table in models.items()]


_FILE_KEYS: dict[str, type | tuple[type, ...]] = {
    "path": str, "aliases": list, "kind": str, "engine": str, "context_length": int,
    "max_sequences": int, "dtype": str, "device": str, "chat_template": str, "threads": int,
    "load_at_start": bool, "reasoning_parser": str, "base": str, "scale": (int, float),
}
_ADAPTER_KEYS = ("path", "aliases", "base", "scale")


def _file_entry(file: Path, name: str, table: Any) -> ModelEntry:
    where = f"--models-file {file}, [models.{name}]"
    if not isinstance(table, dict):
        raise ModelListError(f"{where}: must be a table")
    for key, value in table.items():
        want = _FILE_KEYS.get(key)
        if want is None:
            raise ModelListError(f"{where}: unknown key `{key}` (known: "
                                 f"{', '.join(_FILE_KEYS)})")
        if not isinstance(value, want) or (want is int and isinstance(value, bool)):
            kind = want.__name__ if isinstance(want, type) else "number"
            raise ModelListError(f"{where}: `{key}` must be a {kind}")
    if "path" not in table:
        raise ModelListError(f"{where}: `path` is missing")
    if "base" in table and (extra := set(table) - set(_ADAPTER_KEYS)):
        raise ModelListError(f"{where}: a LoRA adapter (`base`) takes only "
                             f"{', '.join(_ADAPTER_KEYS)}, not {', '.join(sorted(extra))}")
    path = Path(table["path"]).expanduser()
    if not path.is_absolute():
        path = file.parent / path
    aliases = table.get("aliases", [])
    if not all(isinstance(a, str) and a for a in aliases):
        raise ModelListError(f"{where}: `aliases` must be names")
    kind = table.get("kind", _kind_of(path))
    if kind not in KINDS:
        raise ModelListError(f"{where}: `kind` must be one of {', '.join(KINDS)}")
    own = {k: table[k] for k in _OVERRIDES if k in table}
    if "chat_template" in own and not Path(own["chat_template"]).is_absolute():
        own["chat_template"] = str(file.parent / own["chat_template"])
    if "base" in table:
        return ModelEntry((name, *aliases), path, base=table["base"],
                          scale=float(table.get("scale", 1.0)))
    return ModelEntry((name, *aliases), path, kind=kind,
                      load_at_start=table.get("load_at_start", False), **own)


def _kind_of(path: Path) -> Kind:
    if not path.is_dir():
        return "chat"
    try:  # a sequence classifier reads pairs: a cross-encoder
        config = json.loads((path / "config.json").read_text())
        if any(a.endswith("ForSequenceClassification") for a in config.get("architectures", [])):
            return "rerank"
    except (OSError, ValueError, AttributeError, TypeError):
        pass
    if any((path / f).is_file() for f in _SENTENCE_TRANSFORMERS):
        return "embedding"
    return "chat"


def is_many(settings: Settings) -> bool:
    """Whether the model list comes from --model NAME=PATH / repeated --model, --models-dir
    or --models-file, rather than the one-model flags."""
    return bool(settings.models or settings.models_dir or settings.models_file)


def model_entries(settings: Settings, *, chat_default: Path | None,
                  embedding_default: tuple[str, Path] | None,
                  rerank_default: tuple[str, Path] | None = None) -> list[ModelEntry]:
    """Every servable model, names checked. In the one-model case (no list flags): `--model`
    (or `chat_default`, the bundled model) under --served-model-name, loaded at start; with
    a list, its models (a plain `--model PATH` beside it joins them). Either way the
    embedding model of --embedding-model and the reranker of --rerank-model (`*_default`,
    resolved by the caller)."""
    entries: list[ModelEntry] = []
    if not is_many(settings):
        path = Path(settings.model) if settings.model else chat_default
        if path is None:
            raise ModelListError("no model given (--model PATH)")
        entries.append(ModelEntry((settings.served_model_name or served_name_for(path),), path,
                                  load_at_start=True))
    else:
        if settings.served_model_name:
            raise ModelListError("--served-model-name names the one model; with several, "
                                 "name each: --model NAME=PATH or a models file")
        if settings.model:
            entries.append(parse_model_flag(settings.model))
        entries += [parse_model_flag(m) for m in settings.models]
        if settings.models_dir:
            entries += scan_models_dir(Path(settings.models_dir).expanduser())
        if settings.models_file:
            entries += read_models_file(Path(settings.models_file).expanduser())
    if settings.loras:
        chat = [e for e in entries if e.kind == "chat" and not e.is_adapter]
        if len(chat) != 1:
            raise ModelListError("--lora adapts the one chat model; with several, give each "
                                 "adapter its `base` in a models file")
        entries += [parse_lora_flag(v, chat[0].name) for v in settings.loras]
    if embedding_default is not None:
        name, path = embedding_default
        # loaded at start beside the one model, as ever; among many, on demand like the rest
        entries.append(ModelEntry((name,), path, kind="embedding",
                                  load_at_start=not is_many(settings)))
    if rerank_default is not None:  # --rerank-model, as the embedding model
        name, path = rerank_default
        entries.append(ModelEntry((name,), path, kind="rerank",
                                  load_at_start=not is_many(settings)))
    check_names(entries)
    ids = {n: e.name for e in entries if not e.is_adapter for n in e.names}
    return [dataclasses.replace(e, base=ids[e.base]) if e.base is not None else e
            for e in entries]


def check_names(entries: list[ModelEntry]) -> None:
    """Every name once, every path there (a broken file is its own requests' business)."""
    seen: dict[str, ModelEntry] = {}
    bases = {n: e for e in entries if not e.is_adapter for n in e.names}
    for entry in entries:
        if entry.is_adapter:  # a missing or broken file fails that adapter alone, when loaded
            base = bases.get(entry.base or "")
            if base is None or base.kind != "chat":
                raise ModelListError(f"LoRA adapter '{entry.name}': its base '{entry.base}' "
                                     "is not a chat model served here")
        elif not entry.path.exists():
            raise ModelListError(f"model file not found: {entry.path} (model '{entry.name}')")
        for name in entry.names:
            if name in seen:
                raise ModelListError(
                    f"two models are named '{name}': {seen[name].path} and {entry.path} "
                    "(name one of them: --model NAME=PATH, or in a models file)")
            seen[name] = entry
    if not entries:
        raise ModelListError("no model to serve: --models-dir found none, and no --model")

