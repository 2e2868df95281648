"""llmserve: open language models behind the OpenAI HTTP API, streaming first.

Any OpenAI client (the official SDKs, LangChain, curl) talks to it unchanged; it runs
GGUF models on llama.cpp (the default, CPU first), Hugging Face checkpoints on
transformers, and vLLM on GPUs. A small model comes bundled, so `llmserve chat` works
out of the box."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
from collections.abc import Iterator

import uvicorn
from pydantic import ValidationError
from uvicorn.protocols.http.auto import AutoHTTPProtocol

from llmserve import __version__
from llmserve.api.connection import with_transport_in_state
from llmserve.api.drain import Inflight
from llmserve.config import Settings
from llmserve.serving.reasoning import REASONING_PARSERS

log = logging.getLogger("llmserve")


def _serve_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve", help="serve a model over the OpenAI API (chat, completions, responses, ...)",
        description="Serve a model over the OpenAI HTTP API at http://HOST:PORT/v1.\n"
                    "Flags win over LLMSERVE_* environment variables, which win over a .env "
                    "file.",
        epilog=_examples(
            "llmserve serve                                   # the bundled model on :8000",
            "llmserve serve --model ./Qwen2.5-0.5B-Instruct-Q4_K_M.gguf --api-key secret",
            "llmserve serve --engine vllm --model ./Llama-3.1-8B-Instruct "
            "--tensor-parallel-size 2"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS)
    p.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default 8000)")
    p.add_argument("--model", action="append", metavar="[NAME=]PATH",
                   help="GGUF file or Hugging Face model directory (default: the bundled "
                        "SmolLM2-135M-Instruct); repeat for several models, each loaded on "
                        "its first request, named NAME or from its file")
    p.add_argument("--lora", action="append", dest="loras", metavar="NAME=PATH",
                   help="a LoRA adapter of the chat model (GGUF LoRA for llama.cpp, a PEFT "
                        "directory for transformers), served as the model NAME beside its "
                        "base; repeatable (with several chat models: `base` in a models file)")
    p.add_argument("--allow-runtime-lora", action="store_true",
                   help="serve POST /v1/load_lora_adapter and /v1/unload_lora_adapter "
                        "(vLLM's), for adapters in --lora-dir")
    p.add_argument("--lora-dir", metavar="DIR",
                   help="the folder adapters loaded while serving must be in")
    p.add_argument("--models-dir", metavar="DIR",
                   help="serve every GGUF file and model directory in DIR, each named from "
                        "its file or folder, loaded on its first request")
    p.add_argument("--models-file", metavar="TOML",
                   help="models with settings of their own ([models.NAME] tables: path, "
                        "aliases, kind, engine, context_length, max_sequences, dtype, device, "
                        "chat_template, threads, reasoning_parser, load_at_start; a LoRA "
                        "adapter: base, path, scale); see the README")
    p.add_argument("--max-loaded-models", type=int, metavar="N",
                   help="models loaded at once at most: the least recently used idle one is "
                        "unloaded to make room (default: no limit)")
    p.add_argument("--keep-alive", metavar="DURATION",
                   help="how long a model loaded on demand stays loaded with no request: "
                        "seconds, or 5m, 1h, or `none` for ever (default 5m)")
    p.add_argument("--memory-limit", metavar="SIZE",
                   help="memory the loaded models may take together, e.g. 8G, 512M; a model "
                        "that would not fit is refused with 503 (default: MemAvailable)")
    p.add_argument("--engine", choices=["auto", "llamacpp", "transformers", "vllm"],
                   help="auto (default): llama.cpp for .gguf files; for directories vLLM where "
                        "it is installed and a GPU is present, else transformers")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"],
                   help="transformers engine weights (auto: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--device", help="transformers engine: auto (default), cpu, cuda, cuda:N")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="transformers engine: allow the model directory's own code (off by default)")
    p.add_argument("--served-model-name", help="name clients send as `model`")
    p.add_argument("--chat-template", metavar="PATH",
                   help="Jinja chat template file used instead of the model's own (its tool "
                        "syntax, if any, decides the tool-call format)")
    p.add_argument("--reasoning-parser", choices=REASONING_PARSERS,
                   help="thinking models: the text between <think> and </think> goes to "
                        "reasoning_content, apart from the answer (auto, the default: when "
                        "the chat template writes <think>; deepseek_r1: the output always "
                        "starts inside the reasoning; none: off)")
    p.add_argument("--api-key", dest="api_keys", action="append",
                   help="accepted bearer key; repeat for several (env: comma-separated)")
    p.add_argument("--max-request-bytes", type=int,
                   help="largest request body accepted, in bytes (default 32 MiB; then 413)")
    p.add_argument("--allowed-hosts",
                   help="comma-separated Host names served besides loopback ones when bound "
                        "to a loopback address (`*`: any)")
    p.add_argument("--cors-origins",
                   help="comma-separated browser origins allowed by CORS (default: CORS off)")
    p.add_argument("--embedding-model",
                   help="sentence-transformers directory for /v1/embeddings, or `none` "
                        "(default: the bundled all-MiniLM-L6-v2 when installed)")
    p.add_argument("--rerank-model", metavar="DIR",
                   help="cross-encoder directory (sentence-transformers CrossEncoder, "
                        "...ForSequenceClassification) for /v1/rerank and /v1/score (default "
                        "none: those score with the embedding model, by cosine similarity)")
    p.add_argument("--context-length", type=int, help="tokens per sequence (default min(model, 4096))")
    p.add_argument("--max-sequences", type=int, help="sequences decoded together (default 16)")
    p.add_argument("--threads", type=int, help="CPU threads (default: all cores)")
    p.add_argument("--weight-repack", choices=["auto", "on", "off"],
                   help="llama.cpp weight repacking into CPU-specific layouts (default auto: "
                        "off on Intel AMX CPUs, where llama.cpp crashes with it)")
    p.add_argument("--batch-size", type=int, help="tokens per decode step at most (default 512)")
    p.add_argument("--prefill-chunk", type=int,
                   help="prompt tokens each waiting prompt reads per step while others "
                        "decode (default 64)")
    p.add_argument("--speculative", choices=["auto", "ngram", "off"],
                   help="speculative decoding without a draft model, by prompt lookup (ngram: "
                        "the tokens that followed the latest earlier occurrence of the last "
                        "few; on llama.cpp and transformers for a sequence decoded alone, on "
                        "vllm vLLM's own proposer); output is unchanged (default auto: ngram on "
                        "llama.cpp, whose drafts are adaptive, off on the others)")
    p.add_argument("--speculative-tokens", type=int,
                   help="tokens drafted per step with --speculative ngram (default 5)")
    p.add_argument("--speculative-ngram", type=int,
                   help="longest run of last tokens looked up for a draft (default 3)")
    p.add_argument("--speculative-adaptive", action=argparse.BooleanOptionalAction,
                   help="draft only as many tokens as pay, by the step costs measured at load "
                        "and each sequence's record of right guesses (default); --no-...: "
                        "whenever a guess exists")
    p.add_argument("--max-queue", type=int, help="requests waiting for a slot before 429 (default 256)")
    p.add_argument("--queue-timeout", type=float, help="seconds a request may wait (default 600)")
    p.add_argument("--write-timeout", type=float,
                   help="seconds a stream's client may accept no bytes before it is dropped "
                        "and its generation cancelled (default 30)")
    p.add_argument("--shutdown-timeout", type=float,
                   help="on SIGTERM or SIGINT, seconds in-flight requests get to finish before "
                        "they are ended with an error (default 30)")
    p.add_argument("--engine-stall-timeout", type=float,
                   help="seconds an engine or embedder process may make no progress (finish "
                        "no decode step, answer no ping) before it is killed and restarted as "
                        "after a crash; must exceed the slowest step (default 60; 0: never)")
    p.add_argument("--sse-keepalive", type=float,
                   help="seconds of silence in a stream before a `: keep-alive` comment "
                        "(default 15; 0: never)")
    p.add_argument("--store", metavar="PATH",
                   help="SQLite file keeping responses and chat completions created with "
                        "`store: true`, or `none` (default: <user data dir>/llmserve/"
                        "store.sqlite3, the data dir being $XDG_DATA_HOME or ~/.local/share)")
    p.add_argument("--store-ttl", metavar="DURATION",
                   help="how long a stored item is kept: seconds, or with a unit such as "
                        "30d, 12h, 15m, or `none` for ever (default 30d)")
    vllm = p.add_argument_group("vLLM's own flags (--engine vllm)")
    vllm.add_argument("--tensor-parallel-size", type=int, help="GPUs each model is split across")
    vllm.add_argument("--pipeline-parallel-size", type=int, help="pipeline stages (GPUs or nodes)")
    vllm.add_argument("--distributed-executor-backend", choices=["mp", "ray"],
                      help="mp: one node; ray: several (a Ray cluster already started)")
    vllm.add_argument("--nnodes", type=int,
                      help="machines the model is split across, without Ray (default 1)")
    vllm.add_argument("--node-rank", type=int,
                      help="this machine's rank: 0 serves the API; above 0 runs its share of "
                           "the model for rank 0 (the same flags otherwise)")
    vllm.add_argument("--master-addr", help="rank 0's address (--nnodes > 1)")
    vllm.add_argument("--master-port", type=int, help="rank 0's port for the other ranks")
    vllm.add_argument("--gpu-memory-utilization", type=float,
                      help="share of each GPU's memory for weights and KV cache (default 0.9)")
    vllm.add_argument("--max-model-len", type=int, dest="context_length",
                      help="the same as --context-length")
    vllm.add_argument("--quantization", help="awq, gptq, fp8, ... (default: the model's own)")
    vllm.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
                      help="reuse the KV cache of shared prompt prefixes (default on)")
    vllm.add_argument("--max-loras", type=int,
                      help="LoRA adapters decoded in one batch (default 1)")
    vllm.add_argument("--max-lora-rank", type=int,
                      help="the highest rank of the LoRA adapters served (default 16)")
    vllm.add_argument("--speculative-config", metavar="JSON",
                      help="vLLM's speculative decoding config, passed as given (e.g. "
                           '\'{"method": "ngram", "num_speculative_tokens": 5, '
                           '"prompt_lookup_max": 3}\'); wins over --speculative')
    p.add_argument("--playground", action=argparse.BooleanOptionalAction,
                   help="the chat page in the browser at / and /playground (default on; "
                        "with --api-key the page loads without it and asks for it)")
    p.add_argument("--log-level", help="critical|error|warning|info|debug (default info)")


def _examples(*lines: str) -> str:
    return "examples:\n" + "\n".join("  " + line for line in lines)


def _chat_parser(sub: argparse._SubParsersAction) -> None:
    from llmserve.client.local_server import DEFAULT_BASE_URL

    p = sub.add_parser(
        "chat", help="chat in the terminal with llmserve or any OpenAI-compatible server",
        description=(
            "An interactive chat over the OpenAI API: answers stream as they come, Ctrl-C\n"
            "stops one, Ctrl-D or /exit leaves, /help lists the commands. Against llmserve\n"
            "an answer whose connection drops is resumed where it was, not generated again.\n"
            "With no --base-url and nothing listening on the default, it starts a server on\n"
            "the bundled model for the chat's length. Piped input is answered once, and only\n"
            "the answer is printed."),
        epilog=_examples(
            "llmserve chat",
            "llmserve chat --base-url http://gpu-box:8000/v1 --model qwen2.5-7b-instruct",
            "echo 'Name three rivers.' | llmserve chat --temperature 0"),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", help=f"the API's address, ending in /v1 (default "
                                      f"$LLMSERVE_BASE_URL, else {DEFAULT_BASE_URL})")
    p.add_argument("--model", help="model to talk to (default: the first the server lists)")
    p.add_argument("--api-key", help="bearer key (default $LLMSERVE_API_KEY)")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--temperature", type=float, help="sampling temperature (server default)")
    p.add_argument("--max-tokens", type=int, help="longest answer in tokens (server default)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llmserve", description=__doc__,
        epilog=_examples("llmserve serve", "llmserve chat", "llmserve serve --help"),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"llmserve {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, title="commands",
                                metavar="COMMAND")
    _serve_parser(sub)
    _chat_parser(sub)
    models = sub.add_parser(
        "models", help="list a running server's models and their state",
        description="Print each model of a running server (GET /v1/models/status): its "
                    "kind, state, memory, slots in use, loads. Without a server at the default "
                    "address, the bundled model's served name and path.",
        epilog=_examples("llmserve models", "llmserve models --base-url http://host:8000"),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    models.add_argument("--base-url", help="the server (default http://127.0.0.1:8000)")
    models.add_argument("--api-key", help="its API key (default: $LLMSERVE_API_KEY)")
    # Parsed by llmserve.bench.run (see main); here for the list of commands.
    sub.add_parser("bench", help="measure serving speed against baselines, in one run "
                                 "(bench --help)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # its own parser: `llmserve bench --help`
        from llmserve.bench.run import main as bench_main

        return bench_main(argv[1:])
    parser = _parser()
    args = vars(parser.parse_args(argv))
    command = args.pop("command")

    if command == "models":
        from llmserve.models.table import print_models

        return print_models(args.get("base_url"), args.get("api_key"))
    if command == "chat":
        return chat(args)

    given = args.pop("model", None)
    if given:  # one plain PATH: the one-model flag as ever; else the list
        if len(given) == 1 and "=" not in given[0]:
            args["model"] = given[0]
        else:
            args["models"] = given

    try:
        settings = Settings(**args)
    except ValidationError as exc:
        parser.error(str(exc))
    return serve(settings)


def chat(args: dict) -> int:
    import os

    from llmserve.client.app import run
    from llmserve.client.local_server import default_base_url
    from llmserve.client.terminal import ChatOptions

    options = ChatOptions(
        base_url=args["base_url"] or default_base_url(),
        api_key=args["api_key"] or os.environ.get("LLMSERVE_API_KEY") or None,
        model=args["model"], system=args["system"], temperature=args["temperature"],
        max_tokens=args["max_tokens"])
    return run(options, base_url_given=args["base_url"] is not None)


def serve(settings: Settings) -> int:
    from llmserve.api.app import create_app
    from llmserve.engines.base import EngineError
    from llmserve.models import load_registry

    logging.basicConfig(
        level=settings.log_level.upper() if settings.log_level != "trace" else "DEBUG",
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if settings.node_rank > 0:
        return serve_node(settings)
    try:
        registry = load_registry(settings, show_progress=sys.stderr.isatty())
    except (FileNotFoundError, ValueError, EngineError) as exc:
        log.error("%s", exc)
        return 2
    for name, m in registry.loaded().items():
        engine = getattr(m, "engine", None)
        if engine is not None:
            log.info("model %s: %d tokens per sequence, %d sequences together",
                     name, engine.context_length, engine.max_sequences)
    for entry in registry.entries():
        where = (f"LoRA adapter of {entry.base}" if entry.is_adapter
                 else "loaded" if entry.name in registry.loaded() else "loaded on demand")
        log.info("serving %s%s (%s, %s)", entry.name,
                 "".join(f", alias {a}" for a in entry.names[1:]), entry.kind, where)
    app = create_app(settings, registry)
    log.info("OpenAI API at http://%s:%d/v1", settings.host, settings.port)
    config = uvicorn.Config(app, host=settings.host, port=settings.port,
                            http=with_transport_in_state(AutoHTTPProtocol),
                            log_level=settings.log_level,
                            timeout_graceful_shutdown=settings.shutdown_timeout + 5)
    _DrainingServer(config, app.state.llmserve.inflight, settings.shutdown_timeout).run()
    return 0


def serve_node(settings: Settings) -> int:
    """A machine of rank above 0 among --nnodes: its share of the model's workers, for rank 0
    (which serves the API), joining again each time rank 0's engine starts anew."""
    from llmserve.engines.base import EngineError
    from llmserve.models.loading import node_engine

    try:
        engine = node_engine(settings)
    except (FileNotFoundError, ValueError, EngineError) as exc:
        log.error("%s", exc)
        return 2
    engine.serve_node()  # type: ignore[attr-defined]
    return 0


class _DrainingServer(uvicorn.Server):
    """uvicorn, draining on SIGTERM or SIGINT: it stops accepting, gives the requests in
    flight (queued ones too) up to `drain` seconds to finish, ends what remains with an
    error (a stream: an error event and [DONE]), stops the engines, and exits 0."""

    def __init__(self, config: uvicorn.Config, inflight: Inflight, drain: float) -> None:
        super().__init__(config)
        self._inflight = inflight
        self._drain = drain

    async def shutdown(self, sockets=None) -> None:
        if len(self._inflight):
            log.info("draining: %d request(s) in flight get up to %g s",
                     len(self._inflight), self._drain)
        deadline = asyncio.get_running_loop().call_later(self._drain, self._abort)
        try:
            await super().shutdown(sockets)
        finally:
            deadline.cancel()

    def _abort(self) -> None:
        ended = self._inflight.abort_all("The server is shutting down.")
        if ended:
            log.warning("shutdown: ended %d request(s) still running after %g s",
                        ended, self._drain)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        with super().capture_signals():
            yield
            # uvicorn raises the handled signal again on the way out (exit -15); a drained
            # shutdown is a clean exit.
            self._captured_signals.clear()


if __name__ == "__main__":
    sys.exit(main())
