"""How the bench runs its blocks: a warm block sends its prompts once, untimed, before the
timed pass; a cold one sends nothing ahead; every block of every system gets conversations
of its own, in the palindromic order. A recording system stands in for a server."""

from __future__ import annotations

import asyncio
import time
from contextlib import asynccontextmanager

from llmserve.bench.load import Timing, metric_totals
from llmserve.bench.run import SPEC_METRICS, SpecCounts, System, measure_interleaved, run_block
from llmserve.bench.workloads import PROBE, PromptMaker, workload_prompts


class Recorder(System):
    """Answers every request with `max_tokens` tokens after a short wait, noting each
    request (its nonce, its max_tokens, when it started and ended) and each reading of the
    counters, in order, into `events` (shared by several recorders)."""

    def __init__(self, name: str, events: list[tuple]) -> None:
        self.name = name
        self.events = events

    @asynccontextmanager
    async def connect(self, concurrency: int):
        async def stream(conversation, max_tokens: int) -> Timing:
            t = Timing(start=time.perf_counter())
            await asyncio.sleep(0.002)
            t.arrivals.append(time.perf_counter())
            t.tokens, t.end = max_tokens, time.perf_counter()
            self.events.append(("request", self.name, conversation[0]["content"].split()[0],
                                conversation[1]["content"], max_tokens, t.start, t.end))
            return t

        yield stream

    def cpu_s(self):
        self.events.append(("cpu", self.name))
        return time.process_time(), None

    async def spec_counts(self):
        self.events.append(("counters", self.name))
        return SpecCounts(0, 0)


def _requests(events, max_tokens=None):
    return [e for e in events if e[0] == "request" and (max_tokens is None or e[4] == max_tokens)]


def test_a_warm_block_sends_its_prompts_once_untimed_before_the_timed_pass():
    events: list[tuple] = []
    system = Recorder("s", events)
    maker = PromptMaker(seed=1)
    conversations = maker.block(workload_prompts("free"), 6)
    run = asyncio.run(run_block(system, conversations, maker.conversation(PROBE), 2, 8,
                                warm=True))
    kinds = [e[0] if e[0] != "request" else e[4] for e in events]
    # the probe (4 tokens), the warm pass (1 token each), counters and CPU read, the timed
    # pass (8 tokens each), counters and CPU read again
    assert kinds == [4] + [1] * 6 + ["counters", "cpu"] + [8] * 6 + ["cpu", "counters"]
    warm, timed = _requests(events, 1), _requests(events, 8)
    nonces = [c[0]["content"].split()[0] for c in conversations]
    assert sorted(e[2] for e in warm) == sorted(e[2] for e in timed) == sorted(nonces)
    assert _requests(events, 4)[0][3] == PROBE and _requests(events, 4)[0][2] not in nonces
    # what is timed starts after the warm pass ended, and is all that is timed
    assert min(t.start for t in run.timings) > max(e[6] for e in warm)
    assert len(run.timings) == 6 and all(t.tokens == 8 for t in run.timings)
    assert run.spec == SpecCounts(0, 0)


def test_a_cold_block_sends_nothing_ahead():
    events: list[tuple] = []
    maker = PromptMaker(seed=2)
    asyncio.run(run_block(Recorder("s", events), maker.block(workload_prompts("free"), 3),
                          maker.conversation(PROBE), 1, 8, warm=False))
    assert [e[4] for e in _requests(events)] == [4, 8, 8, 8]


def test_blocks_run_palindromically_each_with_conversations_of_its_own():
    events: list[tuple] = []
    systems = [Recorder("a", events), Recorder("b", events), Recorder("c", events)]
    prompts = workload_prompts("grounded")
    results = asyncio.run(measure_interleaved(
        systems, PromptMaker(seed=3), prompts, 2, 8, 8, workload="grounded", cache="warm"))
    # the lead-in block (cold, unmeasured), then a, b, c, c, b, a, each probed then warmed
    probes = [e[1] for e in _requests(events, 4)]
    assert probes == ["a", "a", "b", "c", "c", "b", "a"]
    assert len(_requests(events, 1)) == 6 * 4  # 8 requests over 2 blocks: 4 per block
    timed = _requests(events, 8)
    assert len(timed) == 2 + 6 * 4  # the lead-in's (a request per stream), every system's
    # every conversation is timed once, and warmed (once) only in its own block just before
    nonces = [e[2] for e in timed]
    assert len(set(nonces)) == len(nonces)
    warmed = {e[2]: e for e in _requests(events, 1)}
    for e in timed[2:]:
        assert warmed[e[2]][1] == e[1] and warmed[e[2]][6] < e[5]
    # every block asks the same questions, in order
    asked = [e[3] for e in timed[2:]]
    assert asked == [prompts[i % len(prompts)] for i in range(4)] * 6
    assert [(r.system, r.workload, r.cache, r.requests) for r in results] == [
        (s, "grounded", "warm", 8) for s in "abc"]
    assert all(r.spec_draft_tokens == 0 for r in results)


def test_spec_counters_read_from_metrics_text():
    text = """\
# HELP llmserve:spec_decode_num_draft_tokens_total Number of draft tokens.
# TYPE llmserve:spec_decode_num_draft_tokens_total counter
llmserve:spec_decode_num_draft_tokens_total{model_name="a"} 40.0
llmserve:spec_decode_num_draft_tokens_total{model_name="b"} 2.0
llmserve:spec_decode_num_accepted_tokens_total{model_name="a"} 30.0
llmserve:spec_decode_num_accepted_tokens_per_pos_total{model_name="a",position="0"} 9.0
llmserve:num_requests_running 3.0
"""
    assert metric_totals(text, SPEC_METRICS) == {SPEC_METRICS[0]: 42.0, SPEC_METRICS[1]: 30.0}
    assert metric_totals(text, ("llmserve:num_requests_running",)) == {
        "llmserve:num_requests_running": 3.0}
