"""A server with prompt-lookup speculation answers exactly as one without it: streamed and not,
greedy and seeded, with stop sequences and `n` > 1; and its drafts are counted in /metrics
under vLLM's spec_decode names.

The two servers get the same requests in the same order: a prompt found cached has its last
token read alone, and llama.cpp's logits for it then differ a little from a whole prompt's
(enough to change a seeded sample), so answers compare only between equal cache states."""

from __future__ import annotations

import json

import httpx
import pytest
from conftest import MODEL, Server, run_server
from prometheus_client.parser import text_string_to_metric_families
from speculation_cases import REPEAT
from sse import parse_events

PATH = "/v1/chat/completions"
COPY = [{"role": "user", "content": REPEAT}]


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> Server:
    with run_server(tmp_path_factory.mktemp("plain"), "--speculative", "off") as s:
        yield s


@pytest.fixture(scope="module")
def speculating(tmp_path_factory) -> Server:
    # drafting whenever a guess exists (not by this machine's costs): every answer verified
    with run_server(tmp_path_factory.mktemp("spec"), "--speculative", "ngram",
                    "--speculative-tokens", "6", "--no-speculative-adaptive") as s:
        yield s


def post(server: Server, body: dict) -> httpx.Response:
    r = httpx.post(server.url + PATH, json={"model": MODEL, **body}, headers=server.headers(),
                   timeout=120)
    assert r.status_code == 200, r.text
    return r


def answer(server: Server, body: dict) -> list[tuple[str, str]]:
    """Each choice's (text, finish_reason), streamed or not."""
    r = post(server, body)
    if not body.get("stream"):
        return [(c["message"]["content"], c["finish_reason"]) for c in r.json()["choices"]]
    n = body.get("n") or 1
    text, reasons = [""] * n, [""] * n
    events = parse_events(r.content)
    assert events[-1] == "[DONE]"
    for event in map(json.loads, events[:-1]):
        for c in event.get("choices", []):
            text[c["index"]] += c["delta"].get("content") or ""
            reasons[c["index"]] = c["finish_reason"] or reasons[c["index"]]
    return list(zip(text, reasons))


def spec_counts(server: Server) -> dict[str, float]:
    text = httpx.get(server.url + "/metrics", timeout=30).text
    return {s.name.removeprefix("llmserve:spec_decode_"): s.value
            for f in text_string_to_metric_families(text) for s in f.samples
            if s.name.startswith("llmserve:spec_decode_num_") and "position" not in s.labels}


@pytest.mark.parametrize("body", [
    {"temperature": 0, "max_tokens": 120},
    {"temperature": 0.8, "seed": 11, "max_tokens": 120},
    {"temperature": 0, "max_tokens": 120, "stop": ["spiral"]},
    {"temperature": 0.7, "seed": 5, "max_tokens": 60, "n": 3},
], ids=["greedy", "seeded", "stop", "n3"])
def test_speculation_changes_no_answer(plain, speculating, body):
    body = {**body, "messages": COPY}
    first = answer(plain, body)
    assert answer(speculating, body) == first
    streamed = answer(plain, {**body, "stream": True})
    assert answer(speculating, {**body, "stream": True}) == streamed
    if body["temperature"] == 0:
        assert streamed == first
    if "stop" in body:
        assert first[0][1] == "stop" and "spiral" not in first[0][0]
        assert "lighthouse" in first[0][0]


def test_drafts_are_counted_in_metrics(plain, speculating):
    assert not spec_counts(plain)  # not speculating: no series
    before = spec_counts(speculating)
    assert set(before) == {"num_drafts_total", "num_draft_tokens_total",
                           "num_accepted_tokens_total"}
    answer(speculating, {"temperature": 0, "max_tokens": 120, "messages": COPY})
    after = spec_counts(speculating)
    drafted = after["num_draft_tokens_total"] - before["num_draft_tokens_total"]
    accepted = after["num_accepted_tokens_total"] - before["num_accepted_tokens_total"]
    assert after["num_drafts_total"] > before["num_drafts_total"]
    assert 10 < accepted <= drafted
    text = httpx.get(speculating.url + "/metrics", timeout=30).text
    assert 'llmserve:spec_decode_num_accepted_tokens_per_pos_total{model_name="' in text
