"""Metrics: what a scripted sequence of engine steps, waits and failures records."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing

import pytest
from prometheus_client.parser import text_string_to_metric_families

from llmserve.engines.base import EngineError, SamplingParams, TokenOutput
from llmserve.errors import EngineFailure, QueueTimeout
from llmserve.serving.generation import ChoiceDelta, Generation
from llmserve.serving.metrics import FINISHED_REASONS, Metrics
from llmserve.serving.scheduler import Scheduler

MODEL = "m"
PROMPT = [1, 2, 3, 4, 5]
TOKENS = {10: b"a", 11: b"b", 12: b"c", 13: b"STOP", 99: b""}


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class FakeStream:
    def __init__(self, steps: list[list[TokenOutput] | Exception], clock: Clock, tick: float):
        self._steps = steps
        self._clock = clock
        self._tick = tick
        self.cancelled: list[int | None] = []

    async def __aiter__(self) -> AsyncIterator[list[TokenOutput]]:
        for step in self._steps:
            await asyncio.sleep(0)
            self._clock.now += self._tick  # each step takes `tick` seconds
            if isinstance(step, Exception):
                raise step
            yield step

    def cancel(self, index: int | None = None) -> None:
        self.cancelled.append(index)


class FakeEngine:
    """Replays `steps` (token outputs per step), the clock moving `tick` per step."""

    def __init__(self, steps, clock: Clock, tick: float = 0.5) -> None:
        self.steps, self.clock, self.tick = steps, clock, tick

    def generate(self, prompt, params, *, request_id=None) -> FakeStream:
        return FakeStream(self.steps, self.clock, self.tick)

    def token_bytes(self, token_id: int) -> bytes:
        return TOKENS[token_id]


def out(index: int, token: int, finish: str | None = None, eog: bool = False) -> TokenOutput:
    return TokenOutput(index, token, finish_reason=finish, end_of_generation=eog)


def value(metrics: Metrics, name: str, **labels: str) -> float:
    v = metrics.registry.get_sample_value(name, {"model_name": MODEL, **labels})
    assert v is not None, name
    return v


def success(metrics: Metrics) -> dict[str, float]:
    return {r: value(metrics, "llmserve:request_success_total", finished_reason=r)
            for r in FINISHED_REASONS}


def count(metrics: Metrics, histogram: str) -> float:
    return value(metrics, f"llmserve:{histogram}_count")


def total(metrics: Metrics, histogram: str) -> float:
    return value(metrics, f"llmserve:{histogram}_sum")


def setup(steps, *, slots: int = 4, tick: float = 0.5):
    clock = Clock()
    scheduler = Scheduler(slots, max_queue=4, queue_timeout=None)
    metrics = Metrics({MODEL: scheduler}, clock=clock)
    return clock, scheduler, metrics, FakeEngine(steps, clock, tick)


def generation(engine, scheduler, metrics, n: int = 1, max_tokens: int = 8, stop=()) -> Generation:
    return Generation(engine, PROMPT, [SamplingParams(max_tokens=max_tokens)] * n, stop=stop,
                      reservation=scheduler.reserve(n), metrics=metrics.model(MODEL))


async def drain(gen: Generation) -> list[ChoiceDelta]:
    got = []
    async with aclosing(gen.deltas()) as it:
        async for batch in it:
            got.extend(batch)
    return got


def test_two_choices_record_tokens_latencies_and_finish_reasons():
    steps = [
        [out(0, 10), out(1, 11)],
        [out(0, 11), out(1, 12, "length")],
        [out(0, 99, "stop", eog=True)],
    ]
    clock, scheduler, metrics, engine = setup(steps)

    async def main():
        gen = generation(engine, scheduler, metrics, n=2)
        assert scheduler.slots_in_use == 2
        clock.now += 2.0  # admitted at 100, starts with its slots at 102
        await drain(gen)
        return gen

    gen = asyncio.run(main())
    assert gen.usage.prompt_tokens == 5 and gen.usage.completion_tokens == 5
    assert value(metrics, "llmserve:prompt_tokens_total") == 5  # once for both choices
    assert value(metrics, "llmserve:generation_tokens_total") == 5
    assert success(metrics) == {"stop": 1, "length": 1, "abort": 0, "error": 0}
    # Queue time: one per sequence, from admission until it runs with its slots.
    assert count(metrics, "request_queue_time_seconds") == 2
    assert total(metrics, "request_queue_time_seconds") == pytest.approx(4.0)
    # Steps end at 102.5, 103, 103.5. First text of both choices at 102.5.
    assert count(metrics, "time_to_first_token_seconds") == 2
    assert total(metrics, "time_to_first_token_seconds") == pytest.approx(2 * 2.5)
    # Choice 0: deltas at 102.5, 103, 103.5 (its finish) -> two gaps; choice 1: one gap.
    assert count(metrics, "inter_token_latency_seconds") == 3
    assert total(metrics, "inter_token_latency_seconds") == pytest.approx(1.5)
    assert count(metrics, "e2e_request_latency_seconds") == 2
    assert total(metrics, "e2e_request_latency_seconds") == pytest.approx(3.5 + 3.0)
    assert scheduler.slots_in_use == 0


def test_held_back_text_is_not_a_first_token_and_tokens_after_a_stop_are_not_counted():
    # "STOP" could start the stop string "STOP!": held back until it cannot.
    steps = [
        [out(0, 10)],                # "a"
        [out(0, 13)],                # "STOP" held back (a prefix of "STOP!")
        [out(0, 10)],                # "a": "STOPa" is no stop -> released
        [out(0, 13)],                # held back again
        [out(0, 11, "length")],      # ends: held text released with the finish
    ]
    _, scheduler, metrics, engine = setup(steps, tick=1.0)

    async def main():
        gen = generation(engine, scheduler, metrics, stop=["STOP!"])
        return gen, await drain(gen)

    gen, deltas = asyncio.run(main())
    assert [d.text for d in deltas] == ["a", "STOPa", "STOPb"]
    assert value(metrics, "llmserve:generation_tokens_total") == gen.usage.completion_tokens == 5
    assert total(metrics, "time_to_first_token_seconds") == pytest.approx(1.0)
    # Gaps between deltas as the client sees them: 101 -> 103 -> 105.
    assert count(metrics, "inter_token_latency_seconds") == 2
    assert total(metrics, "inter_token_latency_seconds") == pytest.approx(4.0)
    assert success(metrics)["length"] == 1


def test_stop_string_ending_a_choice_counts_as_stop_and_later_tokens_are_ignored():
    steps = [[out(0, 10), out(1, 10)], [out(0, 13), out(1, 11)], [out(0, 12), out(1, 12, "length")]]
    _, scheduler, metrics, engine = setup(steps)

    async def main():
        gen = generation(engine, scheduler, metrics, n=2, stop=["STOP"])
        return gen, await drain(gen)

    gen, _ = asyncio.run(main())
    # Choice 0 stopped at step 2; its token of step 3 is neither usage nor metrics.
    assert gen.usage.completion_tokens == 5
    assert value(metrics, "llmserve:generation_tokens_total") == 5
    assert success(metrics) == {"stop": 1, "length": 1, "abort": 0, "error": 0}


def test_a_consumer_that_stops_reading_aborts_the_unfinished_choices():
    steps = [[out(0, 10), out(1, 10)], [out(0, 11, "length"), out(1, 11)], [out(1, 12)]]
    _, scheduler, metrics, engine = setup(steps)

    async def main():
        gen = generation(engine, scheduler, metrics, n=2)
        async with aclosing(gen.deltas()) as it:
            async for batch in it:
                if any(d.finish_reason for d in batch):
                    break  # the client hung up after choice 0 finished
        gen.close()  # the route closes it too: still counted once

    asyncio.run(main())
    assert success(metrics) == {"stop": 0, "length": 1, "abort": 1, "error": 0}
    assert count(metrics, "e2e_request_latency_seconds") == 1  # only the finished choice
    assert value(metrics, "llmserve:generation_tokens_total") == 4
    assert scheduler.slots_in_use == 0


def test_a_cancelled_request_is_an_abort():
    steps = [[out(0, 10)]] * 50
    _, scheduler, metrics, engine = setup(steps)

    async def main():
        gen = generation(engine, scheduler, metrics)
        task = asyncio.create_task(drain(gen))
        for _ in range(5):
            await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert success(metrics)["abort"] == 1
    assert sum(success(metrics).values()) == 1


def test_an_engine_failure_is_an_error():
    steps = [[out(0, 10)], EngineError("boom")]
    _, scheduler, metrics, engine = setup(steps)

    async def main():
        with pytest.raises(EngineFailure):
            await drain(generation(engine, scheduler, metrics))

    asyncio.run(main())
    assert success(metrics) == {"stop": 0, "length": 0, "abort": 0, "error": 1}
    assert value(metrics, "llmserve:prompt_tokens_total") == 5  # the prompt was read
    assert count(metrics, "e2e_request_latency_seconds") == 0


def test_queue_wait_timeout_and_never_run_requests():
    steps = [[out(0, 10, "stop")]]
    clock = Clock()
    scheduler = Scheduler(1, max_queue=4, queue_timeout=0.01)
    metrics = Metrics({MODEL: scheduler}, clock=clock)
    engine = FakeEngine(steps, clock)

    async def main():
        holder = generation(engine, scheduler, metrics)  # takes the only slot
        waiter = generation(engine, scheduler, metrics, n=1)
        never_run = generation(engine, scheduler, metrics)
        assert scheduler.slots_in_use == 1 and scheduler.sequences_waiting == 2
        with pytest.raises(QueueTimeout):
            await drain(waiter)
        never_run.close()  # e.g. a stream whose response never started
        clock.now += 3.0
        await drain(holder)

    asyncio.run(main())
    assert success(metrics) == {"stop": 1, "length": 0, "abort": 2, "error": 0}
    # Only the request that got its slot has a queue time (it started 3 s after admission).
    assert count(metrics, "request_queue_time_seconds") == 1
    assert total(metrics, "request_queue_time_seconds") == pytest.approx(3.0)


def test_queue_time_runs_from_admission_to_the_grant():
    clock = Clock()
    scheduler = Scheduler(1, max_queue=4, queue_timeout=None)
    metrics = Metrics({MODEL: scheduler}, clock=clock)
    first = FakeEngine([[out(0, 10)], [out(0, 11, "length")]], clock, tick=1.5)

    async def main():
        a = generation(first, scheduler, metrics)
        b = generation(first, scheduler, metrics)  # waits for a's slot
        task = asyncio.create_task(drain(b))
        await drain(a)  # takes 3 s on the clock
        await task

    asyncio.run(main())
    assert count(metrics, "request_queue_time_seconds") == 2
    assert total(metrics, "request_queue_time_seconds") == pytest.approx(0 + 3.0)


def test_gauges_are_read_from_the_scheduler_at_scrape_time():
    scheduler = Scheduler(4, max_queue=8, queue_timeout=None)
    metrics = Metrics({MODEL: scheduler})

    def gauges() -> dict[str, float]:
        return {n: value(metrics, f"llmserve:{n}")
                for n in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc")}

    async def main():
        assert gauges() == {"num_requests_running": 0, "num_requests_waiting": 0,
                            "kv_cache_usage_perc": 0}
        a = scheduler.reserve(3)
        b = scheduler.reserve(2)  # waits: one slot free, two wanted
        assert gauges() == {"num_requests_running": 3, "num_requests_waiting": 2,
                            "kv_cache_usage_perc": 0.75}
        a.release()
        await b.wait()
        assert gauges() == {"num_requests_running": 2, "num_requests_waiting": 0,
                            "kv_cache_usage_perc": 0.5}
        b.release()
        assert gauges()["num_requests_running"] == 0

    asyncio.run(main())


def test_each_app_has_its_own_registry_and_the_text_parses():
    one = Metrics({MODEL: Scheduler(2, max_queue=1, queue_timeout=None)})
    two = Metrics({MODEL: Scheduler(2, max_queue=1, queue_timeout=None)})
    one.model(MODEL).prompt_tokens.inc(7)
    assert value(one, "llmserve:prompt_tokens_total") == 7
    assert value(two, "llmserve:prompt_tokens_total") == 0

    families = {f.name: f for f in text_string_to_metric_families(one.exposition().decode())}
    expected = {
        "llmserve:num_requests_running": "gauge",
        "llmserve:num_requests_waiting": "gauge",
        "llmserve:kv_cache_usage_perc": "gauge",
        "llmserve:time_to_first_token_seconds": "histogram",
        "llmserve:inter_token_latency_seconds": "histogram",
        "llmserve:e2e_request_latency_seconds": "histogram",
        "llmserve:request_queue_time_seconds": "histogram",
        "llmserve:prompt_tokens": "counter",
        "llmserve:generation_tokens": "counter",
        "llmserve:request_success": "counter",
    }
    for name, kind in expected.items():
        assert families[name].type == kind, name
        assert all(s.labels["model_name"] == MODEL for s in families[name].samples)
    reasons = {s.labels["finished_reason"] for s in families["llmserve:request_success"].samples
               if s.name.endswith("_total")}
    assert reasons == {"stop", "length", "abort", "error"}
