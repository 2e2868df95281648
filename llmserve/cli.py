"""`llmserve serve | models`: builds Settings from flags (over env and .env) and runs uvicorn."""

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

log = logging.getLogger("llmserve")


def _serve_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a model over the OpenAI API",
                       argument_default=argparse.SUPPRESS)
    p.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default 8000)")
    p.add_argument("--model", help="GGUF file or Hugging Face model directory "
                                   "(default: the bundled SmolLM2-135M-Instruct)")
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
    p.add_argument("--context-length", type=int, help="tokens per sequence (default min(model, 4096))")
    p.add_argument("--max-sequences", type=int, help="sequences decoded together (default 16)")
    p.add_argument("--threads", type=int, help="CPU threads (default: all cores)")
    p.add_argument("--weight-repack", choices=["auto", "on", "off"],
                   help="llama.cpp weight repacking into CPU-specific layouts (default auto: "
                        "off on Intel AMX CPUs, where llama.cpp crashes with it)")
    p.add_argument("--batch-size", type=int, help="tokens per decode step at most (default 512)")
    p.add_argument("--prefill-chunk", type=int,
                   help="prompt tokens read per step while others decode (default 64)")
    p.add_argument("--speculative", choices=["auto", "ngram", "off"],
                   help="speculative decoding without a draft model, by prompt lookup (ngram: "
                        "the tokens that followed the latest earlier occurrence of the last "
                        "few; on llama.cpp and transformers for a sequence decoded alone, on "
                        "vllm vLLM's own proposer); output is unchanged (default off; auto: ngram "
                        "on llama.cpp, whose drafts are adaptive, off on the others)")
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
    vllm.add_argument("--gpu-memory-utilization", type=float,
                      help="share of each GPU's memory for weights and KV cache (default 0.9)")
    vllm.add_argument("--max-model-len", type=int, dest="context_length",
                      help="the same as --context-length")
    vllm.add_argument("--quantization", help="awq, gptq, fp8, ... (default: the model's own)")
    vllm.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
                      help="reuse the KV cache of shared prompt prefixes (default on)")
    vllm.add_argument("--speculative-config", metavar="JSON",
                      help="vLLM's speculative decoding config, passed as given (e.g. "
                           '\'{"method": "ngram", "num_speculative_tokens": 5, '
                           '"prompt_lookup_max": 3}\'); wins over --speculative')
    p.add_argument("--log-level", help="critical|error|warning|info|debug (default info)")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # its own parser: `llmserve bench --help`
        from llmserve.bench.run import main as bench_main

        return bench_main(argv[1:])
    parser = argparse.ArgumentParser(prog="llmserve", description=__doc__)
    parser.add_argument("--version", action="version", version=f"llmserve {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    sub.add_parser("models", help="print the bundled model's path")
    sub.add_parser("bench", help="benchmark serving speed against two baselines (see bench --help)")
    args = vars(parser.parse_args(argv))
    command = args.pop("command")

    if command == "models":
        from llmserve.models import bundled_model_path, served_name_for

        path = bundled_model_path()
        print(f"{served_name_for(path)}\t{path}")
        return 0

    try:
        settings = Settings(**args)
    except ValidationError as exc:
        parser.error(str(exc))
    return serve(settings)


def serve(settings: Settings) -> int:
    from llmserve.api.app import create_app
    from llmserve.engines.base import EngineError
    from llmserve.models import load_registry

    logging.basicConfig(
        level=settings.log_level.upper() if settings.log_level != "trace" else "DEBUG",
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        registry = load_registry(settings, show_progress=sys.stderr.isatty())
    except (FileNotFoundError, ValueError, EngineError) as exc:
        log.error("%s", exc)
        return 2
    for m in registry:
        log.info(
            "model %s: %d tokens per sequence, %d sequences together",
            m.name, m.engine.context_length, m.engine.max_sequences,
        )
    for card in registry.cards():
        log.info("serving %s", card.name)
    app = create_app(settings, registry)
    log.info("OpenAI API at http://%s:%d/v1", settings.host, settings.port)
    config = uvicorn.Config(app, host=settings.host, port=settings.port,
                            http=with_transport_in_state(AutoHTTPProtocol),
                            log_level=settings.log_level,
                            timeout_graceful_shutdown=settings.shutdown_timeout + 5)
    _DrainingServer(config, app.state.llmserve.inflight, settings.shutdown_timeout).run()
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
