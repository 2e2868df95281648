"""End-to-end: POST /v1/chat/completions against the real server (bundled SmolLM2 model),
through the official openai client and through raw SSE bytes.

Every response body and every stream chunk received is validated against OpenAI's schema,
and every stream is checked for OpenAI's chunk order (see `check_stream`)."""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time

import httpx
import openai
import pytest
from conftest import MODEL, Server, engine_flags, run_server
from engine_fixtures import *  # engine, server, client, async_client, http
from greedy import assert_same_greedy
from openai_schema import validate
from sse import EventStream, parse_events, stream_post

# -- every test here runs on each engine: the serving core must make them behave alike ------

PATH = "/v1/chat/completions"

ESSAY = "Write a long essay about the history of Rome."
STORY = "Tell me a story about a cat."
REPEATY = "Use lots of emoji like 😀🎉🍕 in a short birthday message."
ZH_SEA = "请用中文写一句关于大海的话。"
ZH_TRANSLATE = "Translate to Chinese: I love the sea."
ZH_SYSTEM = [
    {"role": "system", "content": "你是一个只用中文回答的助手。"},
    {"role": "user", "content": "你好！请介绍一下你自己。"},
]
EMOJI_FOOD = "Reply with five emoji about food."


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


# -- helpers: non-streamed ------------------------------------------------------------------


def check_completion(data: dict, n: int = 1) -> dict:
    """Schema and invariants of a whole chat.completion body."""
    validate("CreateChatCompletionResponse", data)
    assert data["object"] == "chat.completion"
    assert data["id"].startswith("chatcmpl-")
    assert data["model"] == MODEL
    assert isinstance(data["created"], int)
    assert [c["index"] for c in data["choices"]] == list(range(n))
    for c in data["choices"]:
        assert c["message"]["role"] == "assistant"
        assert isinstance(c["message"]["content"], str)
        assert c["finish_reason"] in ("stop", "length")
    u = data["usage"]
    assert u["prompt_tokens"] > 0
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
    return data


def chat(http: httpx.Client, messages: list[dict] | str, n: int = 1, **body) -> dict:
    """A non-streamed chat completion over raw HTTP, checked for status and schema."""
    if isinstance(messages, str):
        messages = user(messages)
    if n != 1:
        body["n"] = n
    r = http.post(PATH, json={"model": MODEL, "messages": messages, **body})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/json")
    return check_completion(r.json(), n)


def sdk_chat(client: openai.OpenAI, messages: list[dict] | str, n: int = 1, **kw):
    """A non-streamed chat completion through the official client; the raw body is
    validated, the parsed object returned."""
    if isinstance(messages, str):
        messages = user(messages)
    if n != 1:
        kw["n"] = n
    raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=messages, **kw)
    assert raw.http_response.status_code == 200
    body = raw.http_response.json()
    check_completion(body, n)
    parsed = raw.parse()
    assert parsed.id == body["id"]
    for pc, bc in zip(parsed.choices, body["choices"]):
        assert pc.message.content == bc["message"]["content"]
    return parsed


def text_of(data: dict, i: int = 0) -> str:
    return data["choices"][i]["message"]["content"]


def token_entries(data: dict, i: int = 0) -> list[dict]:
    return data["choices"][i]["logprobs"]["content"]


# -- helpers: streamed ----------------------------------------------------------------------


def check_stream(chunks: list[dict], *, n: int = 1, include_usage: bool = False) -> dict[int, dict]:
    """Validate every chunk against the schema and OpenAI's chunk order; returns, per choice
    index, its content, deltas, finish_reason and logprobs entries.

    Order per choice: first chunk has delta.role "assistant", then content deltas, then
    one chunk with finish_reason that closes the choice. With include_usage, one last chunk
    with `choices: []` and the usage, every earlier chunk carrying `"usage": null`;
    without, no chunk carries a usage value. One id/created/model for the whole stream."""
    assert chunks, "a stream needs at least one chunk"
    for c in chunks:
        assert "error" not in c, c
        validate("CreateChatCompletionStreamResponse", c)
        assert c["object"] == "chat.completion.chunk"
        assert c["model"] == MODEL
    assert len({c["id"] for c in chunks}) == 1, "one id per stream"
    assert len({c["created"] for c in chunks}) == 1, "one created per stream"
    assert chunks[0]["id"].startswith("chatcmpl-")

    body = chunks
    if include_usage:
        *body, last = chunks
        assert last["choices"] == [], "the usage chunk has no choices"
        u = last["usage"]
        assert isinstance(u, dict)
        assert u["prompt_tokens"] > 0
        assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
        for c in body:
            assert "usage" in c and c["usage"] is None, f"expected \"usage\": null in {c}"
    else:
        for c in chunks:
            assert c.get("usage") is None, f"usage without include_usage: {c}"

    out: dict[int, dict] = {}
    for c in body:
        assert c["choices"], f"only the usage chunk may have no choices: {c}"
        for ch in c["choices"]:
            i = ch["index"]
            delta = ch["delta"]
            if i not in out:
                assert delta.get("role") == "assistant", f"first chunk of choice {i}: {ch}"
                out[i] = {"content": "", "deltas": [], "finish_reason": None, "logprobs": [],
                          "usage": None}
            else:
                assert "role" not in delta or delta["role"] is None, f"role repeated: {ch}"
            o = out[i]
            assert o["finish_reason"] is None, f"choice {i} continued after finishing: {ch}"
            content = delta.get("content")
            if content is not None:
                assert isinstance(content, str)
                o["content"] += content
                o["deltas"].append(content)
            if ch.get("logprobs"):
                o["logprobs"].extend(ch["logprobs"]["content"] or [])
            if ch.get("finish_reason") is not None:
                assert ch["finish_reason"] in ("stop", "length")
                o["finish_reason"] = ch["finish_reason"]
    assert sorted(out) == list(range(n)), f"choices seen: {sorted(out)}"
    for i, o in out.items():
        assert o["finish_reason"] is not None, f"choice {i} was never closed"
    if include_usage:
        for o in out.values():
            o["usage"] = chunks[-1]["usage"]
    return out


def raw_stream(http: httpx.Client, messages: list[dict] | str, *, n: int = 1,
               include_usage: bool = False, **body) -> tuple[EventStream, dict[int, dict]]:
    """A streamed chat completion over raw SSE bytes, every chunk checked."""
    if isinstance(messages, str):
        messages = user(messages)
    if n != 1:
        body["n"] = n
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    s = stream_post(http, PATH, {"model": MODEL, "messages": messages, "stream": True, **body})
    assert s.status == 200, s.raw[:500]
    assert s.headers["content-type"].startswith("text/event-stream")
    assert s.done, s.events[-3:]
    assert s.events.count("[DONE]") == 1
    assert s.raw.endswith(b"data: [DONE]\n\n")
    return s, check_stream(s.chunks(), n=n, include_usage=include_usage)


def sdk_stream(client: openai.OpenAI, messages: list[dict] | str, *, n: int = 1,
               include_usage: bool = False, **kw) -> dict[int, dict]:
    """A streamed chat completion through the official client, every chunk checked."""
    if isinstance(messages, str):
        messages = user(messages)
    if n != 1:
        kw["n"] = n
    if include_usage:
        kw["stream_options"] = {"include_usage": True}
    with client.chat.completions.create(model=MODEL, messages=messages, stream=True, **kw) as s:
        chunks = [c.to_dict() for c in s]
    return check_stream(chunks, n=n, include_usage=include_usage)


def only(choices: dict[int, dict]) -> dict:
    [c] = choices.values()
    return c


# -- non-streamed basics --------------------------------------------------------------------


def test_nonstream_length_limit_raw(http):
    data = chat(http, ESSAY, max_tokens=5, temperature=0, logprobs=True)
    [c] = data["choices"]
    assert c["finish_reason"] == "length"
    assert data["usage"]["completion_tokens"] == 5
    assert len(token_entries(data)) == 5
    assert c["message"]["content"]
    assert c["message"].get("refusal") is None
    assert c["message"].get("tool_calls") is None


def test_nonstream_basics_via_openai_client(client):
    r = sdk_chat(client, STORY, max_tokens=48, temperature=0, logprobs=True)
    [c] = r.choices
    assert c.index == 0
    assert c.message.role == "assistant"
    assert isinstance(c.message.content, str) and c.message.content
    assert c.finish_reason in ("stop", "length")
    assert r.object == "chat.completion"
    assert r.model == MODEL
    assert r.usage.prompt_tokens > 0
    # completion_tokens counts the tokens sampled, one logprobs entry each.
    assert r.usage.completion_tokens == len(c.logprobs.content) <= 48
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    if c.finish_reason == "length":
        assert r.usage.completion_tokens == 48


def test_no_logprobs_unless_asked(http):
    data = chat(http, STORY, max_tokens=3, temperature=0)
    assert data["choices"][0]["logprobs"] is None


def test_prompt_tokens_grow_with_prompt(http):
    short = chat(http, "Hi", max_tokens=1, temperature=0)
    long = chat(http, "Hi " * 50, max_tokens=1, temperature=0)
    assert long["usage"]["prompt_tokens"] >= short["usage"]["prompt_tokens"] + 40


# -- stream order ---------------------------------------------------------------------------


@pytest.mark.parametrize("include_usage", [False, True])
def test_stream_order_raw(http, include_usage):
    s, choices = raw_stream(http, STORY, max_tokens=12, temperature=0,
                            include_usage=include_usage)
    chunks = s.chunks()
    # The first chunk announces the role (content "" or absent), then content deltas.
    first = chunks[0]["choices"][0]
    assert first["delta"]["role"] == "assistant"
    assert first["finish_reason"] is None
    assert not first["delta"].get("content")
    c = only(choices)
    assert c["content"]
    assert c["finish_reason"] in ("stop", "length")
    # The chunk with finish_reason is the last with choices.
    body = chunks[:-1] if include_usage else chunks
    assert body[-1]["choices"][0]["finish_reason"] == c["finish_reason"]
    assert all(ch["choices"][0]["finish_reason"] is None for ch in body[:-1])
    # Raw key presence: "usage":null exactly when include_usage, in every chunk but the last.
    raw_events = [e for e in s.events if e != "[DONE]"]
    if include_usage:
        assert all('"usage":null' in e.replace(" ", "") for e in raw_events[:-1])
        assert chunks[-1]["usage"]["completion_tokens"] == 12 or c["finish_reason"] == "stop"
    else:
        assert not any('"usage":{' in e.replace(" ", "") for e in raw_events)


@pytest.mark.parametrize("include_usage", [False, True])
def test_stream_order_via_openai_client(client, include_usage):
    choices = sdk_stream(client, STORY, max_tokens=12, temperature=0,
                         include_usage=include_usage)
    c = only(choices)
    assert c["content"]
    if include_usage:
        assert c["usage"]["completion_tokens"] <= 12


def test_stream_length_finish_and_usage(http):
    _, choices = raw_stream(http, ESSAY, max_tokens=5, temperature=0, include_usage=True)
    c = only(choices)
    assert c["finish_reason"] == "length"
    assert c["usage"]["completion_tokens"] == 5


# -- greedy: stream == non-stream -----------------------------------------------------------


@pytest.mark.parametrize("messages", [user(STORY), user(ESSAY), user(ZH_TRANSLATE), ZH_SYSTEM],
                         ids=["story", "essay", "zh-translate", "zh-system"])
def test_greedy_stream_equals_nonstream_raw(http, messages):
    whole = chat(http, messages, max_tokens=48, temperature=0)
    _, choices = raw_stream(http, messages, max_tokens=48, temperature=0, include_usage=True)
    c = only(choices)
    assert c["content"].encode() == text_of(whole).encode()
    assert c["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert c["usage"] == whole["usage"]


def test_greedy_stream_equals_nonstream_via_openai_client(client):
    whole = sdk_chat(client, STORY, max_tokens=48, temperature=0)
    c = only(sdk_stream(client, STORY, max_tokens=48, temperature=0, include_usage=True))
    assert c["content"] == whole.choices[0].message.content
    assert c["finish_reason"] == whole.choices[0].finish_reason
    assert c["usage"] == whole.usage.model_dump(exclude_unset=True)


# -- multi-byte text: CJK and emoji ---------------------------------------------------------


MULTIBYTE_CASES = [
    (user(ZH_SEA), 1), (user(ZH_SEA), 2), (user(ZH_SEA), 4),
    (ZH_SYSTEM, 1), (ZH_SYSTEM, 2), (ZH_SYSTEM, 5),
    (user(ZH_TRANSLATE), 2), (user(ZH_TRANSLATE), 6),
    (user(EMOJI_FOOD), 1), (user(EMOJI_FOOD), 3),
    (user(REPEATY), 1), (user(REPEATY), 2), (user(REPEATY), 3),
]


def test_multibyte_stream_never_splits_a_character(http):
    """Byte-level tokens split CJK and emoji characters; the stream must only ever send whole
    characters. Per (prompt, seed): the token bytes (from a non-streamed run with logprobs and
    the same seed) decoded as a whole are exactly the streamed text, every SSE event is UTF-8
    (stream_post decodes strictly), and where the model's bytes are valid UTF-8 no delta holds
    U+FFFD. (The model itself sometimes samples byte sequences that are not UTF-8: there, and
    only there, U+FFFD is the right text.)"""
    split_tokens = 0
    clean_cases = 0
    for messages, seed in MULTIBYTE_CASES:
        body = dict(max_tokens=40, temperature=0.8, seed=seed)
        whole = chat(http, messages, logprobs=True, **body)
        data = b"".join(bytes(e["bytes"]) for e in token_entries(whole))
        expected = data.decode("utf-8", errors="replace")
        assert text_of(whole) == expected, (messages, seed)
        s, choices = raw_stream(http, messages, **body)
        c = only(choices)
        assert c["content"] == expected, (messages, seed, c["deltas"])
        assert c["finish_reason"] == whole["choices"][0]["finish_reason"]
        for raw_event in s.raw.split(b"\n\n")[:-1]:
            raw_event.decode("utf-8")  # each event on its own is valid UTF-8
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        clean_cases += 1
        assert not any("\ufffd" in d for d in c["deltas"]), (messages, seed, c["deltas"])
        for e in token_entries(whole):
            try:
                bytes(e["bytes"]).decode("utf-8")
            except UnicodeDecodeError:
                split_tokens += 1
    # The cases must really exercise characters split across tokens.
    assert clean_cases >= 3, clean_cases
    assert split_tokens >= 5, split_tokens


def test_multibyte_stream_with_logprobs_bytes_match(http):
    """Streamed logprobs: the entries' bytes join to the streamed text's bytes (for a
    seed whose output is valid UTF-8 with split characters)."""
    checked = 0
    for messages, seed in MULTIBYTE_CASES:
        _, choices = raw_stream(http, messages, max_tokens=40, temperature=0.8, seed=seed,
                                logprobs=True)
        c = only(choices)
        data = b"".join(bytes(e["bytes"]) for e in c["logprobs"])
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        assert len(c["logprobs"]) >= 1
        assert text == c["content"]
        assert "\ufffd" not in c["content"]
        checked += 1
        if checked >= 3:
            break
    assert checked >= 1


def test_greedy_chinese_stream_equals_nonstream_via_openai_client(client):
    whole = sdk_chat(client, ZH_TRANSLATE, max_tokens=40, temperature=0)
    text = whole.choices[0].message.content
    assert any(ord(ch) > 0x2E80 for ch in text), f"precondition: CJK output, got {text!r}"
    c = only(sdk_stream(client, ZH_TRANSLATE, max_tokens=40, temperature=0))
    assert c["content"] == text


# -- stop strings ---------------------------------------------------------------------------


def boundary_stop(entries: list[dict], text: str, min_pos: int = 4) -> str:
    """A stop string spanning a token boundary: the last 2 chars of token k + the first 2
    chars of token k+1, for a k in the middle of the output."""
    tokens = [bytes(e["bytes"]).decode("utf-8") for e in entries]
    assert "".join(tokens) == text
    pos = 0
    for k in range(len(tokens) - 1):
        pos += len(tokens[k])
        a, b = tokens[k], tokens[k + 1]
        if pos >= min_pos and len(a) >= 2 and len(b) >= 2:
            stop = a[-2:] + b[:2]
            if stop.strip():
                return stop
    raise AssertionError(f"no token boundary to stop at in {tokens}")


@pytest.fixture(scope="module")
def greedy_story(http) -> tuple[dict, str]:
    data = chat(http, STORY, max_tokens=40, temperature=0, logprobs=True)
    text = text_of(data)
    assert text.isascii() and len(text) > 40, f"precondition: a long ASCII answer: {text!r}"
    return data, text


def test_stop_across_token_boundary(http, client, greedy_story):
    data, text = greedy_story
    stop = boundary_stop(token_entries(data), text, min_pos=10)
    cut = text.index(stop)
    assert cut > 0
    expected = text[:cut]

    stopped = chat(http, STORY, max_tokens=40, temperature=0, stop=[stop])
    assert text_of(stopped) == expected
    assert stopped["choices"][0]["finish_reason"] == "stop"
    assert stopped["usage"]["completion_tokens"] < data["usage"]["completion_tokens"]

    _, choices = raw_stream(http, STORY, max_tokens=40, temperature=0, stop=[stop],
                            include_usage=True)
    c = only(choices)
    assert c["content"] == expected
    assert c["finish_reason"] == "stop"
    assert stop not in c["content"]
    assert not any(stop in d for d in c["deltas"])
    assert c["usage"] == stopped["usage"]

    c = only(sdk_stream(client, STORY, max_tokens=40, temperature=0, stop=stop))
    assert c["content"] == expected
    assert c["finish_reason"] == "stop"
    assert not any(stop in d for d in c["deltas"])


def test_several_stop_strings(http, greedy_story):
    data, text = greedy_story
    entries = token_entries(data)
    early = boundary_stop(entries, text, min_pos=10)
    late = boundary_stop(entries, text, min_pos=text.index(early) + 15)
    stops = [late, "never-occurs-xyz", early]
    # The text is cut where the stop string completed first (ties: the one starting first),
    # whatever the order of the list.
    cut = min((text.index(s) + len(s), text.index(s)) for s in stops if s in text)[1]
    expected = text[:cut]

    stopped = chat(http, STORY, max_tokens=40, temperature=0, stop=stops)
    assert text_of(stopped) == expected
    assert stopped["choices"][0]["finish_reason"] == "stop"
    _, choices = raw_stream(http, STORY, max_tokens=40, temperature=0, stop=stops)
    c = only(choices)
    assert c["content"] == expected
    assert c["finish_reason"] == "stop"
    for s in stops:
        assert s not in c["content"]
        assert not any(s in d for d in c["deltas"])


def test_stop_that_never_occurs_changes_nothing(http, greedy_story):
    data, text = greedy_story
    stops = ["never-occurs-xyz", "QQQ"]
    assert not any(s in text for s in stops)
    again = chat(http, STORY, max_tokens=40, temperature=0, stop=stops)
    assert text_of(again) == text
    assert again["choices"][0]["finish_reason"] == data["choices"][0]["finish_reason"]
    assert again["usage"] == data["usage"]
    _, choices = raw_stream(http, STORY, max_tokens=40, temperature=0, stop=stops)
    assert only(choices)["content"] == text


def test_stop_prefix_at_the_end_is_released(http, greedy_story):
    """A stop string whose beginning ends the output is held back while it might match;
    when generation ends without the match, the held text must still be sent."""
    data, text = greedy_story
    stop = text[-3:] + "\u2603never"
    assert stop not in text
    again = chat(http, STORY, max_tokens=40, temperature=0, stop=stop)
    assert text_of(again) == text
    assert again["choices"][0]["finish_reason"] == data["choices"][0]["finish_reason"]
    _, choices = raw_stream(http, STORY, max_tokens=40, temperature=0, stop=stop)
    c = only(choices)
    assert c["content"] == text
    assert c["finish_reason"] == data["choices"][0]["finish_reason"]


def test_cjk_stop_across_split_characters(http):
    """A CJK stop string whose characters arrive as byte pieces of several tokens."""
    data = chat(http, ZH_TRANSLATE, max_tokens=40, temperature=0, logprobs=True)
    text = text_of(data)
    assert any(not _utf8(e["bytes"]) for e in token_entries(data)), "precondition: split chars"
    cjk = [i for i in range(2, len(text) - 1)
           if ord(text[i]) > 0x2E80 and ord(text[i + 1]) > 0x2E80]
    assert cjk, f"precondition: two CJK characters in a row in {text!r}"
    stop = text[cjk[0]:cjk[0] + 2]
    expected = text[:text.index(stop)]
    stopped = chat(http, ZH_TRANSLATE, max_tokens=40, temperature=0, stop=[stop])
    assert text_of(stopped) == expected
    assert stopped["choices"][0]["finish_reason"] == "stop"
    _, choices = raw_stream(http, ZH_TRANSLATE, max_tokens=40, temperature=0, stop=[stop])
    c = only(choices)
    assert c["content"] == expected
    assert c["finish_reason"] == "stop"
    assert not any(stop in d or "\ufffd" in d for d in c["deltas"])


def test_stop_with_n_stream(http):
    body = dict(max_tokens=12, temperature=1.0, seed=21, stop=[" the", "."])
    whole = chat(http, STORY, n=2, **body)
    _, choices = raw_stream(http, STORY, n=2, **body)
    for i in range(2):
        assert choices[i]["content"] == text_of(whole, i)
        assert choices[i]["finish_reason"] == whole["choices"][i]["finish_reason"]
        assert " the" not in choices[i]["content"] and "." not in choices[i]["content"]


def _utf8(data: list[int]) -> bool:
    try:
        bytes(data).decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


# -- n --------------------------------------------------------------------------------------


def test_n_three_choices(http):
    body = dict(max_tokens=6, temperature=1.0, seed=7, logprobs=True)
    data = chat(http, ESSAY, n=3, **body)
    assert [c["index"] for c in data["choices"]] == [0, 1, 2]
    for i, c in enumerate(data["choices"]):
        assert c["finish_reason"] == "length"
        assert len(token_entries(data, i)) == 6
    assert data["usage"]["completion_tokens"] == 3 * 6
    texts = [text_of(data, i) for i in range(3)]
    assert len(set(texts)) > 1, f"temperature 1 choices all equal: {texts}"

    s, choices = raw_stream(http, ESSAY, n=3, include_usage=True, **body)
    for chunk in s.chunks()[:-1]:
        assert len(chunk["choices"]) == 1 and chunk["choices"][0]["index"] in (0, 1, 2)
    for i in range(3):
        assert choices[i]["finish_reason"] == "length"
        assert len(choices[i]["logprobs"]) == 6
    assert choices[0]["usage"]["completion_tokens"] == 3 * 6
    assert choices[0]["usage"]["prompt_tokens"] == data["usage"]["prompt_tokens"]
    # Same seed, same request: the stream gives the same choices.
    assert [choices[i]["content"] for i in range(3)] == texts


def test_n_via_openai_client_stream(client):
    choices = sdk_stream(client, ESSAY, n=3, max_tokens=4, temperature=1.0, seed=3,
                         include_usage=True)
    assert sorted(choices) == [0, 1, 2]
    assert all(c["finish_reason"] == "length" for c in choices.values())
    assert choices[0]["usage"]["completion_tokens"] == 12


def test_n_with_seed_is_reproducible(client):
    a = sdk_chat(client, STORY, n=2, max_tokens=12, temperature=1.0, seed=1234)
    b = sdk_chat(client, STORY, n=2, max_tokens=12, temperature=1.0, seed=1234)
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert [c.finish_reason for c in a.choices] == [c.finish_reason for c in b.choices]
    assert a.usage.completion_tokens == b.usage.completion_tokens


# -- seed -----------------------------------------------------------------------------------


def test_seed_reproducible_and_different_seeds_differ(client):
    kw = dict(max_tokens=16, temperature=1.0)
    a = sdk_chat(client, STORY, seed=42, **kw).choices[0].message.content
    b = sdk_chat(client, STORY, seed=42, **kw).choices[0].message.content
    assert a == b
    others = {sdk_chat(client, STORY, seed=s, **kw).choices[0].message.content
              for s in (1, 2, 3, 4)}
    assert len(others | {a}) >= 3, others


def test_seed_reproducible_in_stream(http):
    body = dict(max_tokens=16, temperature=1.0, seed=99)
    whole = chat(http, STORY, **body)
    _, choices = raw_stream(http, STORY, **body)
    assert only(choices)["content"] == text_of(whole)


# -- logprobs -------------------------------------------------------------------------------


def check_entries(entries: list[dict], content: str, k: int, *, greedy: bool) -> None:
    assert b"".join(bytes(e["bytes"]) for e in entries).decode("utf-8") == content
    for e in entries:
        assert isinstance(e["token"], str)
        assert math.isfinite(e["logprob"]) and e["logprob"] <= 0.0
        assert all(isinstance(b, int) and 0 <= b <= 255 for b in e["bytes"])
        top = e["top_logprobs"]
        assert len(top) == k
        values = [t["logprob"] for t in top]
        assert values == sorted(values, reverse=True)
        assert all(v <= 0.0 for v in values)
        if greedy:
            assert top[0]["token"] == e["token"]
            assert top[0]["bytes"] == e["bytes"]
            assert top[0]["logprob"] == pytest.approx(e["logprob"])


def test_logprobs_nonstream(http):
    data = chat(http, STORY, max_tokens=16, temperature=0, logprobs=True, top_logprobs=3)
    entries = token_entries(data)
    assert len(entries) == data["usage"]["completion_tokens"]
    check_entries(entries, text_of(data), 3, greedy=True)
    assert data["choices"][0]["logprobs"].get("refusal") is None


def test_logprobs_stream_matches_nonstream(http):
    body = dict(max_tokens=16, temperature=0, logprobs=True, top_logprobs=3)
    data = chat(http, STORY, **body)
    _, choices = raw_stream(http, STORY, **body)
    c = only(choices)
    assert c["content"] == text_of(data)
    # The entries' bytes join to exactly the streamed content's bytes.
    assert b"".join(bytes(e["bytes"]) for e in c["logprobs"]) == c["content"].encode()
    check_entries(c["logprobs"], c["content"], 3, greedy=True)
    assert [e["token"] for e in c["logprobs"]] == [e["token"] for e in token_entries(data)]


def test_logprobs_sampled_via_openai_client(client):
    r = sdk_chat(client, STORY, max_tokens=12, temperature=1.0, seed=5, logprobs=True,
                 top_logprobs=2)
    c = r.choices[0]
    entries = [e.model_dump() for e in c.logprobs.content]
    assert len(entries) == r.usage.completion_tokens
    check_entries(entries, c.message.content, 2, greedy=False)


# -- sampling fields ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    """The bundled model's own tokenizer (vocabulary only), to find token ids."""
    from llama_cpp import Llama

    from llmserve.models import bundled_model_path

    vocab = Llama(model_path=str(bundled_model_path()), vocab_only=True, verbose=False)

    def tokenize(text: str) -> list[int]:
        return vocab.tokenize(text.encode(), add_bos=False, special=False)

    return tokenize


def test_max_completion_tokens(client):
    r = sdk_chat(client, ESSAY, max_completion_tokens=3, temperature=0)
    assert r.usage.completion_tokens == 3
    assert r.choices[0].finish_reason == "length"


def test_tiny_top_p_is_greedy(http):
    greedy = text_of(chat(http, STORY, max_tokens=16, temperature=0))
    for seed in (1, 2):
        sampled = chat(http, STORY, max_tokens=16, temperature=1.0, top_p=0.01, seed=seed)
        assert text_of(sampled) == greedy
    # and top_p=1 at temperature 1 really samples (not greedy) for some seed
    free = {text_of(chat(http, STORY, max_tokens=16, temperature=1.0, top_p=1.0, seed=s))
            for s in (1, 2, 3)}
    assert free != {greedy}


def test_top_k_one_and_min_p_one_are_greedy(http):
    greedy = text_of(chat(http, STORY, max_tokens=16, temperature=0))
    assert text_of(chat(http, STORY, max_tokens=16, temperature=1.0, seed=1, top_k=1)) == greedy
    assert text_of(chat(http, STORY, max_tokens=16, temperature=1.0, seed=1, min_p=1.0)) == greedy


def test_tiny_temperature_is_greedy(http):
    """Below 1e-5 a temperature means greedy (as in vLLM): dividing logits by 1e-45 would
    overflow to inf and the draw would see NaN probabilities."""
    greedy = text_of(chat(http, STORY, max_tokens=16, temperature=0))
    for temperature in (1e-45, 5e-324, 9e-6):
        for seed in (1, 2):
            tiny = chat(http, STORY, max_tokens=16, temperature=temperature, seed=seed)
            assert text_of(tiny) == greedy, temperature
    # with penalties the engines run their sampling chain rather than a plain argmax
    penalties = {"repetition_penalty": 1.5, "frequency_penalty": 1.0}
    base = chat(http, REPEATY, max_tokens=16, temperature=0, **penalties)
    tiny = chat(http, REPEATY, max_tokens=16, temperature=1e-45, seed=3, **penalties)
    assert text_of(tiny) == text_of(base)


def test_extremes_of_every_range_draw_no_nan(http, tokenizer):
    """1e-5, the smallest temperature that still samples, with the smallest repetition
    penalty, the most negative penalties and the largest bias: a 200 with tokens, no NaN draw."""
    [comma] = tokenizer(",")
    data = chat(http, REPEATY, max_tokens=8, temperature=1e-5, seed=4, repetition_penalty=0.01,
                frequency_penalty=-2.0, presence_penalty=-2.0, logit_bias={str(comma): 100})
    assert data["usage"]["completion_tokens"] >= 1


@pytest.mark.parametrize("field,value", [
    ("frequency_penalty", 2.0), ("presence_penalty", 2.0), ("repetition_penalty", 1.8),
])
def test_penalties_change_repetitive_output(http, field, value):
    base = chat(http, REPEATY, max_tokens=24, temperature=0)
    penalised = chat(http, REPEATY, max_tokens=24, temperature=0, **{field: value})
    assert text_of(penalised) != text_of(base)


def test_penalties_via_openai_client(client):
    r = sdk_chat(client, REPEATY, max_tokens=8, temperature=0, presence_penalty=0.5,
                 frequency_penalty=0.5, user="user-1234",
                 extra_body={"top_k": 40, "min_p": 0.05, "repetition_penalty": 1.1})
    assert r.usage.completion_tokens <= 8


def test_user_field_changes_nothing(client):
    a = sdk_chat(client, STORY, max_tokens=12, temperature=0).choices[0].message.content
    b = sdk_chat(client, STORY, max_tokens=12, temperature=0, user="alice").choices[0]
    assert b.message.content == a


def test_logit_bias_forces_a_token(http, tokenizer):
    [comma] = tokenizer(",")
    data = chat(http, STORY, max_tokens=6, temperature=0, logprobs=True,
                logit_bias={str(comma): 100})
    entries = token_entries(data)
    assert len(entries) == 6
    assert all(bytes(e["bytes"]) == b"," for e in entries), [e["token"] for e in entries]
    assert text_of(data) == ",,,,,,"


def test_logit_bias_bans_the_greedy_first_token(http, client, tokenizer):
    base = chat(http, STORY, max_tokens=8, temperature=0, logprobs=True)
    first = bytes(token_entries(base)[0]["bytes"]).decode()
    ids = tokenizer(first)
    assert len(ids) == 1, f"precondition: {first!r} is one token, got {ids}"
    banned = chat(http, STORY, max_tokens=8, temperature=0, logprobs=True,
                  logit_bias={str(ids[0]): -100})
    assert text_of(banned) != text_of(base)
    assert bytes(token_entries(banned)[0]["bytes"]).decode() != first
    # The ban holds in every position, and the openai client sends it the same way.
    r = sdk_chat(client, STORY, max_tokens=8, temperature=0, logit_bias={str(ids[0]): -100})
    assert r.choices[0].message.content == text_of(banned)


# -- messages -------------------------------------------------------------------------------


def test_all_roles(http):
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "developer", "content": "Answer briefly."},
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": "Let me check the weather for you."},
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "content": "Sunny, 22 degrees Celsius.", "tool_call_id": "call_1"},
        {"role": "user", "name": "bob", "content": "So, is it warm?"},
    ]
    data = chat(http, messages, max_tokens=8, temperature=0)
    fewer = chat(http, messages[2:3], max_tokens=8, temperature=0)
    # The whole conversation goes into the prompt.
    assert data["usage"]["prompt_tokens"] > fewer["usage"]["prompt_tokens"] + 20


def test_developer_is_system(http):
    sys_msg = [{"role": "system", "content": "You are a pirate."}, *user(STORY)]
    dev_msg = [{"role": "developer", "content": "You are a pirate."}, *user(STORY)]
    a = chat(http, sys_msg, max_tokens=12, temperature=0)
    b = chat(http, dev_msg, max_tokens=12, temperature=0)
    assert text_of(a) == text_of(b)
    assert a["usage"] == b["usage"]


def test_text_parts_equal_plain_string(http, client):
    plain = chat(http, STORY, max_tokens=16, temperature=0)
    parts = [{"role": "user", "content": [{"type": "text", "text": "Tell me a story "},
                                          {"type": "text", "text": "about a cat."}]}]
    as_parts = chat(http, parts, max_tokens=16, temperature=0)
    assert text_of(as_parts) == text_of(plain)
    assert as_parts["usage"] == plain["usage"]
    system_parts = [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
                    *user(STORY)]
    system_plain = [{"role": "system", "content": "Be brief."}, *user(STORY)]
    r = sdk_chat(client, system_parts, max_tokens=16, temperature=0)
    assert r.choices[0].message.content == text_of(chat(http, system_plain, max_tokens=16,
                                                        temperature=0))


# -- concurrency ----------------------------------------------------------------------------


CONCURRENT_PROMPTS = [
    "Tell me a story about a cat.", "Write a long essay about the history of Rome.",
    "What is the capital of France?", "Explain photosynthesis.", "Give me three colours.",
    "How do airplanes fly?", "Write a haiku about snow.", "What is 2 + 2?",
    "Describe a sunset.", "Name a famous scientist.", "Why is the sky blue?",
    "Tell me about dogs.", "What is Python?", "Suggest a dinner recipe.",
    "Translate 'good morning' to French.", "List the planets of the solar system.",
]


def test_sixteen_concurrent_streams(server, client):
    async def main():
        # A client of this event loop's own (the session's async client may serve other loops).
        async with openai.AsyncOpenAI(base_url=server.base_url, api_key=server.api_key,
                                      max_retries=0, timeout=120) as aclient:

            async def one(p: str) -> dict[int, dict]:
                s = await aclient.chat.completions.create(
                    model=MODEL, messages=user(p), max_tokens=32, temperature=0, stream=True,
                    stream_options={"include_usage": True},
                )
                chunks = [c.to_dict() async for c in s]
                return check_stream(chunks, include_usage=True)

            return await asyncio.gather(*(one(p) for p in CONCURRENT_PROMPTS))

    together = asyncio.run(main())
    assert len(together) == 16
    for p, got in zip(CONCURRENT_PROMPTS, together):
        c = only(got)
        assert c["usage"]["completion_tokens"] <= 32
        alone = only(sdk_stream(client, p, max_tokens=32, temperature=0, include_usage=True,
                                logprobs=True, top_logprobs=5))
        if c["content"] == alone["content"]:
            assert c["finish_reason"] == alone["finish_reason"], p
            assert c["usage"] == alone["usage"], p
        else:  # parted at a near tie (tests/greedy.py): past it either may end first
            assert_same_greedy(c["content"], alone["logprobs"])


# -- a client that hangs up frees its slot --------------------------------------------------


@pytest.fixture(scope="module")
def one_slot_server(engine: str, tmp_path_factory) -> Server:
    with run_server(tmp_path_factory.mktemp("one-slot"), "--max-sequences", "1",
                    *engine_flags(engine)) as s:
        yield s


LONG_BODY = {
    "model": MODEL, "messages": user(ESSAY), "max_tokens": 1500, "temperature": 0,
    "ignore_eos": True,
}


def time_to_first_token(server: Server) -> float:
    """Seconds until the first content delta of a fresh streamed request (which must then
    complete normally). The role chunk does not count: it is sent before a slot is held."""
    t0 = time.monotonic()
    first = None
    body = {"model": MODEL, "messages": user(STORY), "max_tokens": 8, "temperature": 0,
            "stream": True}
    with httpx.Client(base_url=server.url, headers=server.headers(), timeout=120) as h:
        with h.stream("POST", PATH, json=body) as r:
            assert r.status_code == 200
            raw = b""
            for part in r.iter_bytes():
                raw += part
                if first is None and b'"content":"' in raw.replace(b'"content":""', b""):
                    first = time.monotonic() - t0
    check_stream([json.loads(e) for e in parse_events(raw) if e != "[DONE]"])
    assert first is not None
    return first


def assert_clean_log(server: Server) -> None:
    log = server.log()
    assert "Traceback" not in log, log[-3000:]


def test_stream_disconnect_frees_the_slot(one_slot_server):
    server = one_slot_server
    baseline = time_to_first_token(server)
    with httpx.Client(base_url=server.url, headers=server.headers(), timeout=120) as h:
        with h.stream("POST", PATH, json={**LONG_BODY, "stream": True}) as r:
            assert r.status_code == 200
            got = 0
            for line in r.iter_lines():
                if line.startswith("data: "):
                    validate("CreateChatCompletionStreamResponse",
                             json.loads(line[len("data: "):]))
                    got += 1
                    if got == 3:
                        break
    # Closed after 3 chunks; the other 1497 tokens must not keep the only slot busy.
    ttft = time_to_first_token(server)
    assert ttft < 10, f"first token after {ttft:.1f}s (alone: {baseline:.1f}s)"
    time.sleep(0.5)
    assert_clean_log(server)


def test_nonstream_disconnect_frees_the_slot(one_slot_server):
    server = one_slot_server
    outcome: list[BaseException | httpx.Response] = []

    def give_up_soon() -> None:
        try:
            outcome.append(httpx.post(server.url + PATH, json=LONG_BODY,
                                      headers=server.headers(), timeout=1.0))
        except BaseException as exc:  # noqa: BLE001 - inspected below
            outcome.append(exc)

    t = threading.Thread(target=give_up_soon)
    t.start()
    t.join(timeout=30)
    assert not t.is_alive()
    [result] = outcome
    assert isinstance(result, httpx.TimeoutException), result
    ttft = time_to_first_token(server)
    assert ttft < 10, f"first token after {ttft:.1f}s"
    time.sleep(0.5)
    assert_clean_log(server)


def test_waiters_that_hang_up_leave_no_slot_behind(one_slot_server):
    """While one request holds the only slot, a streamed and a non-streamed request wait for
    it and hang up; once the holder hangs up too, a new request starts at once."""
    server = one_slot_server
    with httpx.Client(base_url=server.url, headers=server.headers(), timeout=120) as h:
        with h.stream("POST", PATH, json={**LONG_BODY, "stream": True}) as holder:
            lines = holder.iter_lines()
            seen = 0
            while seen < 3:
                if next(lines).startswith("data: "):
                    seen += 1
            # A streamed waiter: it gets the role chunk, then waits for the slot; hangs up.
            with httpx.Client(base_url=server.url, headers=server.headers(), timeout=120) as h2:
                with h2.stream("POST", PATH, json={**LONG_BODY, "stream": True}) as waiter:
                    assert waiter.status_code == 200
                    first = next(line for line in waiter.iter_lines() if line.startswith("data: "))
                    chunk = json.loads(first[len("data: "):])
                    validate("CreateChatCompletionStreamResponse", chunk)
                    assert chunk["choices"][0]["delta"]["role"] == "assistant"
            # A non-streamed waiter that gives up after a second.
            with pytest.raises(httpx.TimeoutException):
                httpx.post(server.url + PATH, json=LONG_BODY, headers=server.headers(),
                           timeout=1.0)
    ttft = time_to_first_token(server)
    assert ttft < 10, f"first token after {ttft:.1f}s"
    time.sleep(0.5)
    assert_clean_log(server)
