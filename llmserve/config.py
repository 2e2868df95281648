"""Settings: CLI flags > environment (LLMSERVE_*) > .env file > defaults."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from llmserve.serving.reasoning import ReasoningParserName

_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}  # --store-ttl, --keep-alive suffixes
_BYTES = {"k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}  # --memory-limit suffixes


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="LLMSERVE_", env_file=".env", env_file_encoding="utf-8", extra="ignore"
    )

    host: str = "127.0.0.1"
    port: int = 8000
    model: str | None = Field(
        None, description="GGUF file or Hugging Face model directory; default: bundled SmolLM2"
    )
    engine: Literal["auto", "llamacpp", "transformers", "vllm"] = Field(
        "auto", description="auto: llama.cpp for .gguf files; for directories vLLM where it is "
        "installed and a GPU is present, else transformers"
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="transformers engine: auto is bf16 on CUDA, fp32 on CPU"
    )
    device: str = Field("auto", description="transformers engine: auto, cpu, cuda, cuda:N")
    trust_remote_code: bool = Field(False, description="transformers engine: run model code")
    served_model_name: str | None = Field(None, description="name clients use; default from the file")
    chat_template: str | None = Field(
        None, description="Jinja chat template file used instead of the model's own"
    )
    reasoning_parser: ReasoningParserName = Field(
        "auto", description="thinking models: <think> text as reasoning_content; auto: when "
        "the chat template writes <think>"
    )
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="accepted bearer keys; none: no auth"
    )
    max_request_bytes: int = Field(
        32 * 1024 * 1024, gt=0, description="largest request body accepted (then 413)"
    )
    allowed_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Host names served besides loopback ones; * any"
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="browser origins allowed by CORS; none: CORS off"
    )
    models: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="several models: PATH or NAME=PATH each (repeated "
        "--model; env: comma-separated)"
    )
    loras: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="LoRA adapters of the chat model, each served as a "
        "model of its own: NAME=PATH (repeated --lora; env: comma-separated)"
    )
    allow_runtime_lora: bool = Field(
        False, description="POST /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's): "
        "adapters loaded and unloaded while serving, from --lora-dir only"
    )
    lora_dir: str | None = Field(
        None, description="the folder runtime-loaded LoRA adapters must be in"
    )
    models_dir: str | None = Field(
        None, description="serve every GGUF file and model directory found in this directory"
    )
    models_file: str | None = Field(
        None, description="TOML file listing models with settings of their own"
    )
    max_loaded_models: int | None = Field(
        None, ge=1, description="models loaded at once at most (least recently used idle "
        "one unloaded first); default no limit"
    )
    keep_alive: float | None = Field(
        300.0, ge=0, description="seconds (or 5m, 1h) a model loaded on demand stays loaded "
        "with no request, or none: for ever; default 5m"
    )
    memory_limit: int | None = Field(
        None, gt=0, description="bytes (or 8G, 512M) the loaded models may take together; "
        "default: what /proc/meminfo says is available"
    )
    embedding_model: str | None = Field(
        None, description="sentence-transformers directory, or none; default: bundled all-MiniLM-L6-v2"
    )
    rerank_model: str | None = Field(
        None, description="cross-encoder directory for /v1/rerank and /v1/score, or none"
    )
    context_length: int | None = Field(
        None, ge=16, description="tokens per sequence; default min(model's, 4096)"
    )
    max_sequences: int = Field(16, ge=1, le=256, description="sequences decoded together")
    threads: int | None = Field(None, ge=1, description="CPU threads; default all cores")
    weight_repack: Literal["auto", "on", "off"] = Field(
        "auto", description="llama.cpp weight repacking; auto: off on CPUs where it crashes (AMX)"
    )
    batch_size: int = Field(512, ge=32, description="tokens per decode step at most")
    prefill_chunk: int = Field(
        64, ge=16, description="prompt tokens each waiting prompt reads per step while others "
        "decode"
    )
    speculative: Literal["auto", "ngram", "off"] = Field(
        "auto", description="auto: ngram on the llama.cpp engine (whose drafts are adaptive), "
        "off on the others; prompt-lookup (n-gram) speculative decoding (llama.cpp and "
        "transformers: of a sequence decoded alone; vllm: vLLM's own proposer); off: none"
    )
    speculative_tokens: int = Field(5, ge=1, le=64, description="tokens drafted per step")
    speculative_ngram: int = Field(
        3, ge=1, le=16, description="longest run of last tokens looked up for a draft"
    )
    speculative_adaptive: bool = Field(
        True, description="draft only as many tokens as pay, by the step costs measured at "
        "load and each sequence's record of right guesses; false: whenever a guess exists"
    )
    max_queue: int = Field(256, ge=0, description="requests waiting for a slot before 429")
    queue_timeout: float = Field(600.0, gt=0, description="seconds a request may wait for a slot")
    write_timeout: float = Field(
        30.0, gt=0, description="seconds a stream's client may accept no bytes before it is dropped"
    )
    shutdown_timeout: float = Field(
        30.0, ge=0, description="seconds in-flight requests get to finish on SIGTERM/SIGINT"
    )
    engine_stall_timeout: float = Field(
        60.0, ge=0, description="seconds an engine process may make no progress (a decode "
        "step, or an idle engine's answer to a ping) before it is killed and restarted; 0: never"
    )
    sse_keepalive: float = Field(
        15.0, ge=0, description="seconds of silence in a stream before a keep-alive comment; 0: none"
    )
    store: str | None = Field(
        None,
        description="SQLite file keeping stored responses and chat completions, or none; "
        "default: <user data dir>/llmserve/store.sqlite3",
    )
    store_ttl: float | None = Field(
        30 * 86400, gt=0,
        description="seconds (or 30d, 12h, 15m) a stored item is kept, or none: forever; "
        "default 30 days, as OpenAI keeps responses",
    )
    # vLLM's own flags, for --engine vllm only (None: vLLM's default)
    tensor_parallel_size: int = Field(1, ge=1, description="vllm: GPUs each model is split across")
    pipeline_parallel_size: int = Field(1, ge=1, description="vllm: pipeline stages (GPUs, nodes)")
    distributed_executor_backend: Literal["mp", "ray"] | None = Field(
        None, description="vllm: mp (one node) or ray (several nodes); default vLLM's choice"
    )
    nnodes: int = Field(1, ge=1, description="vllm: machines the model is split across (no Ray)")
    node_rank: int = Field(
        0, ge=0, description="vllm: this machine's rank among --nnodes; above 0 it runs its "
        "share of the model for the head (rank 0) and serves no HTTP")
    master_addr: str | None = Field(
        None, description="vllm: the head node's address (--nnodes > 1; default 127.0.0.1)")
    master_port: int | None = Field(
        None, ge=1, le=65535, description="vllm: the head node's port for its workers "
        "(--nnodes > 1; default 29501)")
    gpu_memory_utilization: float | None = Field(
        None, gt=0, le=1, description="vllm: share of each GPU's memory it may take (default 0.9)"
    )
    quantization: str | None = Field(
        None, description="vllm: quantization method (awq, gptq, fp8, ...); default the model's"
    )
    enable_prefix_caching: bool | None = Field(
        None, description="vllm: reuse the KV cache of shared prompt prefixes (default on)"
    )
    max_loras: int | None = Field(
        None, ge=1, description="vllm: LoRA adapters in one batch (default 1)"
    )
    max_lora_rank: int | None = Field(
        None, ge=1, description="vllm: the highest LoRA rank served (default 16)"
    )
    speculative_config: Annotated[dict[str, Any] | None, NoDecode] = Field(
        None, description="vllm: vLLM's speculative config (JSON), as given; wins over "
        "--speculative"
    )
    playground: bool = Field(True, description="the chat page at / and /playground")
    log_level: str = "info"
    # Test-only fault injection (engines/faults.py); deliberately not a CLI flag.
    test_fault: str | None = None

    @field_validator("api_keys", "allowed_hosts", "cors_origins", "models", "loras",
                     mode="before")
    @classmethod
    def _split_list(cls, value: object) -> object:
        if isinstance(value, str):
            return [k.strip() for k in value.split(",") if k.strip()]
        return value

    @model_validator(mode="after")
    def _runtime_lora_has_a_folder(self) -> Settings:
        # loading by HTTP whatever path a client names would read any file the server can
        if self.allow_runtime_lora and not self.lora_dir:
            raise ValueError("--allow-runtime-lora needs --lora-dir DIR: the folder adapters "
                             "may be loaded from")
        return self

    @field_validator("speculative_config", mode="before")
    @classmethod
    def _json_object(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        if value.strip().lower() in ("", "none"):
            return None
        try:
            return json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not JSON: {exc}") from None

    @field_validator("store_ttl", "keep_alive", mode="before")
    @classmethod
    def _duration(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        text = value.strip().lower()
        if text in ("", "none"):
            return None
        unit = _SECONDS.get(text[-1:])
        if unit is None:
            return text  # plain seconds, or pydantic's own error
        try:
            return float(text[:-1]) * unit
        except ValueError:
            raise ValueError(
                f"not a duration: {value!r} (seconds, or e.g. 30d, 12h, 15m)"
            ) from None

    @field_validator("memory_limit", mode="before")
    @classmethod
    def _size(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        text = value.strip().lower().removesuffix("ib").removesuffix("b")
        if text in ("", "none"):
            return None
        unit = _BYTES.get(text[-1:])
        if unit is None:
            return text  # plain bytes, or pydantic's own error
        try:
            return int(float(text[:-1]) * unit)
        except ValueError:
            raise ValueError(f"not a size: {value!r} (bytes, or e.g. 8G, 512M)") from None

    @field_validator("log_level")
    @classmethod
    def _level(cls, value: str) -> str:
        value = value.lower()
        if value not in {"critical", "error", "warning", "info", "debug", "trace"}:
            raise ValueError(f"unknown log level {value!r}")
        return value
