"""The child side of an engine process: build the engine from its spec, say "ready" with
its facts, then run its decode loop, one message per step each way.

Messages are tuples over two `multiprocessing` pipes, one each way (pickled). To the server:
  ("ready", info)             loaded; `info` is EngineInfo (or a batch model's facts)
  ("failed", kind, message)   could not load (FileNotFoundError, ...)
  ("step", [(key, payload)])  one decode step: each request's new tokens, as tuples, or
                              its end (None: finished; an EngineError: failed)
  ("result", key, value)      batch model: one batch's answer, or an EngineError
  ("fatal", traceback)        the decode loop raised; the process exits right after
  ("pong", n)                 the answer to ping n, from the decode loop between two steps
                              (a batch model: between two batches)
  ("adapter", key, result)    the answer to an adapter change: a load's error (None: loaded),
                              an unload's whether there was one
and from it:
  ("add", key, prompt, params, adapter) | ("cancel", key, index) | ("run", key, inputs) |
  ("adapter", key, "load", (name, path, scale)) | ("adapter", key, "unload", (name,)) |
  ("ping", n) | ("stop",)

A child dies with its server: when its requests' pipe closes (the server exited, however) it
exits.
"""

from __future__ import annotations

import functools
import os
import signal
import threading
import traceback
from collections.abc import Hashable
from multiprocessing.connection import Connection

from llmserve.engines.base import EngineError, TokenOutput
from llmserve.engines.faults import Faults
from llmserve.engines.spec import BatchSpec, EngineSpec
from llmserve.engines.stepping import Payload, StepLoopEngine


def encode(payload: Payload) -> object:
    """Tokens as tuples of TokenOutput's fields: half the cost of pickling the dataclass."""
    if isinstance(payload, list):
        return [(o.index, o.token_id, o.logprob, o.top_logprobs, o.end_of_generation,
                 o.finish_reason) for o in payload]
    if payload is None or isinstance(payload, EngineError):
        return payload
    return EngineError(f"{type(payload).__name__}: {payload}")


def decode(payload: object) -> Payload:
    if isinstance(payload, list):
        return [TokenOutput(*t) for t in payload]
    return payload  # type: ignore[return-value]


def _child_setup() -> None:
    # Ctrl-C in a terminal reaches the whole process group: the server decides when we stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _load(replies: Connection, build):
    try:
        return build()
    except BaseException as exc:  # noqa: BLE001 - reported to the server, which decides
        replies.send(("failed", type(exc).__name__, str(exc)))
        os._exit(3)


def engine_main(requests: Connection, replies: Connection, spec: EngineSpec,
                fault: str | None, first: bool) -> None:
    _child_setup()
    engine: StepLoopEngine = _load(replies, spec.build)
    engine.faults = Faults(fault, first_process=first)
    send_lock = threading.Lock()

    def send(msg: tuple) -> None:
        with send_lock:
            replies.send(msg)

    send(("ready", engine.info))
    threading.Thread(target=_read_requests, args=(requests, engine, send), daemon=True,
                     name="engine-inbox").start()

    sent_stats = engine.spec_decode_stats()
    send(("spec", sent_stats))

    def deliver(items: list[tuple[Hashable, Payload]]) -> None:
        nonlocal sent_stats
        send(("step", [(key, encode(payload)) for key, payload in items]))
        stats = engine.spec_decode_stats()
        if stats != sent_stats:  # after the step it counts: a scrape then sees both
            sent_stats = stats
            send(("spec", stats))

    try:
        engine.serve(deliver)
    except BaseException:  # noqa: BLE001 - the server logs it, fails the requests, restarts us
        try:
            send(("fatal", traceback.format_exc()))
        finally:
            os._exit(1)
    engine.close()


def _read_requests(requests: Connection, engine: StepLoopEngine, send) -> None:
    try:
        _serve_requests(requests, engine, send)
    except BaseException:  # noqa: BLE001 - a child that cannot hear the server must not linger
        traceback.print_exc()
        os._exit(1)


def _serve_requests(requests: Connection, engine: StepLoopEngine, send) -> None:
    while True:
        try:
            msg = requests.recv()
        except (EOFError, OSError):
            os._exit(0)  # the server is gone: so are we
        kind = msg[0]
        if kind == "add":
            _, key, prompt, params, adapter = msg
            try:
                # grammars compiled off this thread: it must go on taking cancels and pings
                engine.submit(key, prompt, params, adapter=adapter, compile_later=True)
            except ValueError as exc:
                send(("step", [(key, EngineError(str(exc)))]))
        elif kind == "cancel":
            engine.cancel(msg[1], msg[2])
        elif kind == "ping":
            engine.between_steps(functools.partial(send, ("pong", msg[1])))
        elif kind == "adapter":
            # on the decode thread, between two steps: nothing else touches the model then
            engine.between_steps(functools.partial(_change_adapter, engine, send, *msg[1:]))
        elif kind == "stop":
            engine.shutdown()
            return


def _change_adapter(engine: StepLoopEngine, send, key: Hashable, op: str, args: tuple) -> None:
    result: object
    try:
        if op == "load":
            result = engine.load_adapter_now(*args)
        else:
            result = engine.unload_adapter_now(*args)
    except Exception as exc:  # noqa: BLE001 - that change fails, the engine serves on
        result = f"{type(exc).__name__}: {exc}" if op == "load" else False
    send(("adapter", key, result))


def batch_main(requests: Connection, replies: Connection, spec: BatchSpec) -> None:
    """A model that answers batches (an embedder, a cross-encoder): one batch at a time."""
    _child_setup()
    model = _load(replies, spec.build)
    replies.send(("ready", model.facts()))
    while True:
        try:
            msg = requests.recv()
        except (EOFError, OSError):
            os._exit(0)
        if msg[0] == "stop":
            return
        if msg[0] == "ping":
            replies.send(("pong", msg[1]))
            continue
        _, key, inputs = msg
        try:
            result: object = model.run(inputs)
        except Exception as exc:  # noqa: BLE001 - that batch fails, the model goes on
            result = EngineError(f"{type(exc).__name__}: {exc}")
        replies.send(("result", key, result))
