"""GET /metrics on the real server: counters move by what the responses report, histograms
get their observations, the running gauge follows a stream's slot (none leaked), and a
speculating engine's spec_decode counters are there."""

from __future__ import annotations

import json
import time

import httpx
import pytest
from conftest import MODEL, Server, engine_flags, engines, run_server
from prometheus_client.parser import text_string_to_metric_families
from sse import parse_events

PATH = "/v1/chat/completions"
SHORT = {"model": MODEL, "temperature": 0, "max_tokens": 24,
         "messages": [{"role": "user", "content": "Name three fruits."}]}
LONG = {"model": MODEL, "temperature": 0, "max_tokens": 300, "ignore_eos": True, "stream": True,
        "messages": [{"role": "user", "content": "Write a very long story about a ship."}]}
HISTOGRAMS = ("time_to_first_token_seconds", "inter_token_latency_seconds",
              "e2e_request_latency_seconds", "request_queue_time_seconds")

Samples = dict[tuple[str, frozenset], float]


def scrape(server: Server) -> Samples:
    # No Authorization header: the server wants an API key everywhere else.
    r = httpx.get(server.url + "/metrics", timeout=30)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }


def get(samples: Samples, name: str, **labels: str) -> float:
    return samples[(f"llmserve:{name}", frozenset({"model_name": MODEL, **labels}.items()))]


def moved(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return get(after, name, **labels) - get(before, name, **labels)


def success(samples: Samples, reason: str) -> float:
    return get(samples, "request_success_total", finished_reason=reason)


def test_counters_and_histograms_move_by_what_the_responses_report(server, http):
    before = scrape(server)

    plain = http.post(PATH, json=SHORT)
    assert plain.status_code == 200, plain.text
    plain_usage = plain.json()["usage"]
    reasons = [plain.json()["choices"][0]["finish_reason"]]

    streamed = http.post(PATH, json={**SHORT, "stream": True,
                                     "stream_options": {"include_usage": True},
                                     "messages": [{"role": "user", "content": "Count to ten."}]})
    assert streamed.status_code == 200, streamed.text
    events = parse_events(streamed.content)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    stream_usage = chunks[-1]["usage"]
    reasons += [c["choices"][0]["finish_reason"] for c in chunks
                if c["choices"] and c["choices"][0]["finish_reason"]]

    # Completions share the serving core: two prompts are two sequences.
    text = http.post("/v1/completions", json={"model": MODEL, "temperature": 0, "max_tokens": 8,
                                              "prompt": ["Once upon a time", "The sea is"]})
    assert text.status_code == 200, text.text
    text_usage = text.json()["usage"]
    reasons += [c["finish_reason"] for c in text.json()["choices"]]

    after = scrape(server)
    usages = (plain_usage, stream_usage, text_usage)
    assert moved(before, after, "prompt_tokens_total") == sum(u["prompt_tokens"] for u in usages)
    assert moved(before, after, "generation_tokens_total") == (
        sum(u["completion_tokens"] for u in usages))
    for reason in ("stop", "length", "abort", "error"):
        assert moved(before, after, "request_success_total", finished_reason=reason) == (
            reasons.count(reason)), reason
    for h in ("time_to_first_token_seconds", "e2e_request_latency_seconds",
              "request_queue_time_seconds"):
        assert moved(before, after, h + "_count") == 4, h  # one per sequence
    # Every delta after a sequence's first is one inter-token gap.
    assert moved(before, after, "inter_token_latency_seconds_count") >= 4
    for h in HISTOGRAMS:
        assert moved(before, after, h + "_sum") >= 0, h
        assert get(after, h + "_bucket", le="+Inf") == get(after, h + "_count"), h
    assert moved(before, after, "e2e_request_latency_seconds_sum") > 0
    assert get(after, "num_requests_running") == 0
    assert get(after, "num_requests_waiting") == 0
    assert get(after, "kv_cache_usage_perc") == 0


def first_content(lines) -> None:
    """Read a stream's lines until its first generated text."""
    for line in lines:
        if line.startswith("data: {") and '"content":"' in line and '"content":""' not in line:
            return
    raise AssertionError("the stream ended before any text")


def wait_for(server: Server, check, timeout: float = 30) -> Samples:
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(server)
        if check(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(0.1)


def test_running_gauge_follows_a_stream_and_no_slot_is_leaked(server):
    before = scrape(server)
    assert get(before, "num_requests_running") == 0, "another request is running"

    # A stream read to its end: one slot while it runs, none after.
    with httpx.stream("POST", server.url + PATH, json=LONG, headers=server.headers(),
                      timeout=120) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        first_content(lines)
        during = scrape(server)
        assert get(during, "num_requests_running") == 1
        assert get(during, "num_requests_waiting") == 0
        assert get(during, "kv_cache_usage_perc") == pytest.approx(1 / 16)  # of 16 slots
        for _ in lines:
            pass
    after = scrape(server)
    assert get(after, "num_requests_running") == 0
    assert get(after, "kv_cache_usage_perc") == 0
    assert moved(before, after, "request_success_total", finished_reason="length") == 1
    assert moved(before, after, "generation_tokens_total") == LONG["max_tokens"]

    # A stream whose client hangs up: its slot comes back and it counts as aborted.
    longer = {**LONG, "max_tokens": 1500}  # far from done when the client leaves
    with httpx.stream("POST", server.url + PATH, json=longer, headers=server.headers(),
                      timeout=120) as r:
        lines = r.iter_lines()  # kept: a dropped iterator closes the connection at once
        first_content(lines)
        assert get(scrape(server), "num_requests_running") == 1
    gone = wait_for(server, lambda s: get(s, "num_requests_running") == 0
                    and success(s, "abort") > success(after, "abort"))
    assert get(gone, "num_requests_running") == 0
    assert moved(after, gone, "request_success_total", finished_reason="abort") == 1
    assert moved(after, gone, "request_success_total", finished_reason="length") == 0
    assert moved(after, gone, "e2e_request_latency_seconds_count") == 0
    assert 0 < moved(after, gone, "generation_tokens_total") < longer["max_tokens"]


COPY = {"model": MODEL, "temperature": 0, "max_tokens": 64, "messages": [{
    "role": "user", "content": "Repeat this text exactly: The old lighthouse stood at the edge "
    "of the cliff for more than a century, guiding ships through the narrow strait. Its "
    "keeper, a quiet man named Elias, climbed the spiral stairs every evening to light the "
    "lamp."}]}
SPEC = ("spec_decode_num_drafts_total", "spec_decode_num_draft_tokens_total",
        "spec_decode_num_accepted_tokens_total")


@pytest.mark.parametrize("engine", ["llamacpp", "vllm"])
def test_speculative_counters(tmp_path, engine):
    """A server started with --speculative ngram: vLLM's spec_decode series, from 0 (on vLLM
    every draft position's too, as vLLM creates them) until a copying request moves them."""
    if engine not in engines():
        pytest.skip(f"no {engine} engine here (vLLM: LLMSERVE_TEST_VLLM=1, make test-vllm)")
    with run_server(tmp_path, *engine_flags(engine), "--speculative", "ngram",
                    "--speculative-tokens", "4", "--max-sequences", "2") as server:
        before = scrape(server)
        for name in SPEC:
            assert get(before, name) == 0, name
        if engine == "vllm":
            for pos in range(4):
                assert get(before, "spec_decode_num_accepted_tokens_per_pos_total",
                           position=str(pos)) == 0
        r = httpx.post(server.base_url + "/chat/completions", json=COPY,
                       headers=server.headers(), timeout=300)
        assert r.status_code == 200, r.text
        after = scrape(server)
    drafts, draft_tokens, accepted = (get(after, name) for name in SPEC)
    assert drafts > 0 and draft_tokens >= drafts
    assert 0 < accepted <= draft_tokens
    per_pos = {dict(labels)["position"]: v for (name, labels), v in after.items()
               if name == "llmserve:spec_decode_num_accepted_tokens_per_pos_total"}
    assert set(per_pos) <= {"0", "1", "2", "3"}
    assert sum(per_pos.values()) == accepted and 0 < per_pos["0"] <= drafts
