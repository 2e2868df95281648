"""Prometheus metrics of one app: vLLM's metric names under the `llmserve:` prefix (a vLLM
dashboard works once `vllm:` is replaced), labelled by `model_name`, kept in a registry of
the app's own, never in prometheus_client's global one.

Where they are taken:
- the gauges (running, waiting, KV-cache usage) are read from each model's `Scheduler` at
  scrape time, so they cost nothing between scrapes and can never drift;
- speculative decoding's counters (vLLM's `spec_decode_*`) are read from each engine at
  scrape time, for the engines that speculate;
- the models' loads, unloads, latest load time and memory are read from the registry at
  scrape time; the gauges and speculation's counters of a model appear while it is loaded;
- everything else is reported by the serving core (`Generation`, shared by chat and
  completions) to one `RequestStats` per prompt: one call when its slots are granted, one
  per engine step that gave it tokens, one when it ends.

As in vLLM, where each of a request's `n` samples is a request of its own in the engine, a
"request" here is one sequence (one choice): `num_requests_running` is the sequence slots in
use, and each choice gets its own time to first token, inter-token latencies, end-to-end
latency and `request_success_total` count. Token counters count what the usage of the
responses reports: a prompt once however many choices share it (they share its KV cache), and
every generated token.

`request_success_total` is labelled `finished_reason`: `stop` and `length` for the choices that
finished, `abort` for the ones the server gave up on (the client hung up, or no slot came free
within the queue timeout), and `error` for the ones an engine failure ended. vLLM declares
the same four (plus `repetition`, which nothing here produces) and creates every series at 0.
Latency histograms observe only what happened: queue time when slots are granted, time to
first token and inter-token latency as deltas reach the client, end-to-end latency only for
choices that finished (stop or length), so aborted and failed requests are counted but do not
pull the latency of answered ones.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Protocol, TypeVar

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from llmserve.engines.base import Engine
    from llmserve.models.registry import ModelStatus
    from llmserve.serving.scheduler import Scheduler

T = TypeVar("T")
PREFIX = "llmserve:"
LABELS = ("model_name",)
FINISHED_REASONS = ("stop", "length", "abort", "error")

# vLLM's bucket boundaries (vllm/v1/metrics/loggers.py), so quantiles compare across servers.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
               10.0, 20.0, 40.0, 80.0)
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
                           50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)

Clock = Callable[[], float]
Source = Mapping[str, T] | Callable[[], Mapping[str, T]]  # fixed, or read at each scrape


class StatusSource(Protocol):
    def status(self) -> list[ModelStatus]: ...


def _read(source: Source[T]) -> Mapping[str, T]:
    return source() if callable(source) else source


class Metrics:
    """The metrics of one app's models: `model(name)` is what its requests report to,
    `exposition()` the text a scrape gets."""

    def __init__(self, schedulers: Source[Scheduler], *,
                 engines: Source[Engine] | None = None, models: StatusSource | None = None,
                 clock: Clock = time.monotonic):
        self.registry = CollectorRegistry()
        self._clock = clock
        r = self.registry
        self.prompt_tokens = Counter(
            PREFIX + "prompt_tokens", "Number of prefill tokens processed.", LABELS, registry=r)
        self.generation_tokens = Counter(
            PREFIX + "generation_tokens", "Number of generation tokens processed.", LABELS,
            registry=r)
        self.request_success = Counter(
            PREFIX + "request_success",
            "Count of processed requests (sequences) by finished_reason: stop, length, or "
            "abort (client gone, queue timeout) and error (engine failure) for the unfinished.",
            (*LABELS, "finished_reason"), registry=r)
        self.time_to_first_token = Histogram(
            PREFIX + "time_to_first_token_seconds",
            "Histogram of time to first token in seconds (from admission, queue included, to "
            "the first text the client is sent).", LABELS, buckets=TTFT_BUCKETS, registry=r)
        self.inter_token_latency = Histogram(
            PREFIX + "inter_token_latency_seconds",
            "Histogram of inter-token latency in seconds (between successive deltas of a "
            "sequence).", LABELS, buckets=ITL_BUCKETS, registry=r)
        self.e2e_request_latency = Histogram(
            PREFIX + "e2e_request_latency_seconds",
            "Histogram of e2e request latency in seconds (finished requests).", LABELS,
            buckets=REQUEST_LATENCY_BUCKETS, registry=r)
        self.request_queue_time = Histogram(
            PREFIX + "request_queue_time_seconds",
            "Histogram of time spent waiting for a sequence slot, in seconds.", LABELS,
            buckets=REQUEST_LATENCY_BUCKETS, registry=r)
        self.streams_dropped_stalled = Counter(
            PREFIX + "streams_dropped_stalled",
            "Count of streams dropped because their client took no bytes for --write-timeout "
            "seconds (generation cancelled; a stored one's run goes on).", registry=r)
        r.register(_SchedulerCollector(schedulers))
        if engines:
            r.register(_SpecDecodeCollector(engines))
        if models is not None:
            r.register(_ModelsCollector(models))
        self._models = {name: ModelMetrics(self, name) for name in _read(schedulers)}

    def model(self, name: str) -> ModelMetrics:
        """A model's metrics, made at its first request (models load on demand)."""
        found = self._models.get(name)
        if found is None:
            found = self._models[name] = ModelMetrics(self, name)
        return found

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class ModelMetrics:
    """One model's children of every metric, bound to its label once."""

    def __init__(self, metrics: Metrics, name: str) -> None:
        self.clock = metrics._clock
        self.prompt_tokens = metrics.prompt_tokens.labels(name)
        self.generation_tokens = metrics.generation_tokens.labels(name)
        # Every reason's series exists from the start (at 0), as in vLLM: rate() needs it.
        self.success = {r: metrics.request_success.labels(name, r) for r in FINISHED_REASONS}
        self.time_to_first_token = metrics.time_to_first_token.labels(name)
        self.inter_token_latency = metrics.inter_token_latency.labels(name)
        self.e2e_request_latency = metrics.e2e_request_latency.labels(name)
        self.request_queue_time = metrics.request_queue_time.labels(name)

    def request(self, prompt_tokens: int, n: int, index_offset: int = 0) -> RequestStats:
        """The stats of one prompt with `n` choices, admitted now; its deltas are numbered
        from `index_offset`."""
        return RequestStats(self, prompt_tokens, n, index_offset)


class Released(Protocol):
    """What metrics read of a delta a step released (generation's `ChoiceDelta`): whose it
    is, and whether it ends that choice. A protocol, so that metrics need not import the
    generation that reports to them."""

    @property
    def index(self) -> int: ...

    @property
    def finish_reason(self) -> str | None: ...


class RequestStats:
    """What one prompt's generation reports, and when: `granted` once its slots are given,
    `step` per engine step that gave it tokens (with the deltas that step released), and
    `end` when it is over (choices still unfinished then are counted under the outcome
    given). Each choice is counted once, whatever is called twice."""

    __slots__ = ("_created", "_done", "_ended", "_last", "_m", "_offset", "_prompt_tokens",
                 "_read")

    def __init__(self, m: ModelMetrics, prompt_tokens: int, n: int, index_offset: int) -> None:
        self._m = m
        self._prompt_tokens = prompt_tokens
        self._offset = index_offset
        self._created = m.clock()
        self._last: list[float | None] = [None] * n  # each choice's last delta
        self._done = [False] * n
        self._read = False  # prompt counted
        self._ended = False

    def granted(self) -> None:
        waited = self._m.clock() - self._created
        for _ in self._last:
            self._m.request_queue_time.observe(waited)

    def step(self, tokens: int, deltas: Sequence[Released]) -> None:
        m = self._m
        if not self._read:  # the first tokens: the engine has read the prompt
            self._read = True
            m.prompt_tokens.inc(self._prompt_tokens)
        if tokens:
            m.generation_tokens.inc(tokens)
        if not deltas:
            return
        now = m.clock()
        for d in deltas:
            i = d.index - self._offset
            last = self._last[i]
            if last is None:
                m.time_to_first_token.observe(now - self._created)
            else:
                m.inter_token_latency.observe(now - last)
            self._last[i] = now
            if d.finish_reason is not None and not self._done[i]:
                self._done[i] = True
                # A choice that ended in tool calls stopped as the engine sees it (as in vLLM).
                reason = "stop" if d.finish_reason == "tool_calls" else d.finish_reason
                m.success[reason].inc()
                m.e2e_request_latency.observe(now - self._created)

    def end(self, outcome: str) -> None:
        """`abort` or `error` for every choice not finished yet; idempotent."""
        if self._ended:
            return
        self._ended = True
        unfinished = self._done.count(False)
        if unfinished:
            self._m.success[outcome].inc(unfinished)


class NoStats:
    """Reports nowhere: for a generation run without metrics (tests, benchmarks)."""

    __slots__ = ()

    def granted(self) -> None:
        pass

    def step(self, tokens: int, deltas: Sequence[Released]) -> None:
        pass

    def end(self, outcome: str) -> None:
        pass


class _SchedulerCollector(Collector):
    """The gauges, read from each model's scheduler when scraped."""

    def __init__(self, schedulers: Source[Scheduler]) -> None:
        self._schedulers = schedulers

    def collect(self) -> Iterator[GaugeMetricFamily]:
        running = GaugeMetricFamily(
            PREFIX + "num_requests_running",
            "Number of requests (sequences) holding a sequence slot.", labels=LABELS)
        waiting = GaugeMetricFamily(
            PREFIX + "num_requests_waiting",
            "Number of requests (sequences) waiting for a sequence slot.", labels=LABELS)
        usage = GaugeMetricFamily(
            PREFIX + "kv_cache_usage_perc",
            "KV-cache usage. 1 means 100 percent usage. Measured as the fraction of sequence "
            "slots in use: each sequence has a KV stream of its own of context-length cells "
            "(llama.cpp), so a slot in use is that much cache taken.", labels=LABELS)
        for name, s in _read(self._schedulers).items():
            running.add_metric([name], s.slots_in_use)
            waiting.add_metric([name], s.sequences_waiting)
            usage.add_metric([name], s.slots_in_use / s.capacity if s.capacity else 0.0)
        yield running
        yield waiting
        yield usage

    def describe(self) -> Iterator[GaugeMetricFamily]:
        return self.collect()  # the registry reserves the names (no clash possible)


class _SpecDecodeCollector(Collector):
    """Speculative decoding's counters, under vLLM's names, read from each engine that
    speculates when scraped (from 0 once it is configured, as vLLM has them)."""

    def __init__(self, engines: Source[Engine]) -> None:
        self._engines = engines

    def collect(self) -> Iterator[CounterMetricFamily]:
        drafts = CounterMetricFamily(
            PREFIX + "spec_decode_num_drafts", "Number of spec decoding drafts.",
            labels=LABELS)
        draft_tokens = CounterMetricFamily(
            PREFIX + "spec_decode_num_draft_tokens", "Number of draft tokens.", labels=LABELS)
        accepted = CounterMetricFamily(
            PREFIX + "spec_decode_num_accepted_tokens", "Number of accepted tokens.",
            labels=LABELS)
        per_pos = CounterMetricFamily(
            PREFIX + "spec_decode_num_accepted_tokens_per_pos",
            "Accepted tokens per draft position.", labels=(*LABELS, "position"))
        for name, engine in _read(self._engines).items():
            stats = engine.spec_decode_stats()
            if stats is None:
                continue
            drafts.add_metric([name], stats.drafts)
            draft_tokens.add_metric([name], stats.draft_tokens)
            accepted.add_metric([name], stats.accepted_tokens)
            for pos, n in enumerate(stats.accepted_per_pos):
                per_pos.add_metric([name, str(pos)], n)
        yield from (drafts, draft_tokens, accepted, per_pos)

    def describe(self) -> Iterator[CounterMetricFamily]:
        return self.collect()


class _ModelsCollector(Collector):
    """Every servable model's loads, unloads and latest load time, and the memory of the
    loaded ones, read from the registry when scraped."""

    def __init__(self, models: StatusSource) -> None:
        self._models = models

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        loads = CounterMetricFamily(
            PREFIX + "model_loads", "Number of times the model was loaded.", labels=LABELS)
        unloads = CounterMetricFamily(
            PREFIX + "model_unloads",
            "Number of times the model was unloaded (idle, evicted).", labels=LABELS)
        load_time = GaugeMetricFamily(
            PREFIX + "model_load_time_seconds",
            "Seconds its latest load took (process start to ready).", labels=LABELS)
        loaded = GaugeMetricFamily(
            PREFIX + "model_loaded", "1 while the model is loaded, else 0.", labels=LABELS)
        memory = GaugeMetricFamily(
            PREFIX + "model_memory_bytes",
            "Resident memory of the loaded model's engine process tree.", labels=LABELS)
        for s in self._models.status():
            loads.add_metric([s.id], s.loads)
            unloads.add_metric([s.id], s.unloads)
            load_time.add_metric([s.id], s.load_seconds)
            loaded.add_metric([s.id], 0.0 if s.state in ("unloaded", "loading", "failed") else 1.0)
            if s.memory_bytes is not None:
                memory.add_metric([s.id], s.memory_bytes)
        yield from (loads, unloads, load_time, loaded, memory)

    def describe(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        return iter(())
