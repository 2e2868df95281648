"""End-to-end: POST /v1/completions against the real server (bundled SmolLM2 model), on
each engine (see engine_fixtures).

Every response body and every stream chunk is validated against OpenAI's schema."""

from __future__ import annotations

import asyncio
import math

import httpx
import openai
import pytest
from conftest import MODEL
from engine_fixtures import *  # engine, server, client, async_client, http
from openai_schema import validate
from sse import EventStream, stream_post

PATH = "/v1/completions"


# -- helpers --------------------------------------------------------------------------------


def complete(http: httpx.Client, **body) -> dict:
    """A non-streamed completion, checked for status and schema."""
    r = http.post(PATH, json={"model": MODEL, **body})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/json")
    data = r.json()
    validate("CreateCompletionResponse", data)
    assert data["object"] == "text_completion"
    assert data["id"].startswith("cmpl-")
    assert data["model"] == MODEL
    u = data["usage"]
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
    return data


def validate_chunk(chunk: dict) -> None:
    """Schema check of one streamed completion chunk."""
    validate("CreateCompletionStreamResponse", chunk)


def stream(http: httpx.Client, **body) -> EventStream:
    """A streamed completion, every chunk checked against the schema."""
    s = stream_post(http, PATH, {"model": MODEL, "stream": True, **body})
    assert s.status == 200, s.raw[:500]
    assert s.headers["content-type"].startswith("text/event-stream")
    assert s.done, s.events[-3:]
    assert s.events.count("[DONE]") == 1
    chunks = s.chunks()
    assert chunks, "a stream needs at least one chunk"
    for c in chunks:
        assert "error" not in c, c
        validate_chunk(c)
        assert c["object"] == "text_completion"
        assert c["model"] == MODEL
    # One id and one creation time for the whole stream.
    assert len({c["id"] for c in chunks}) == 1
    assert len({c["created"] for c in chunks}) == 1
    assert chunks[0]["id"].startswith("cmpl-")
    return s


def assemble(chunks: list[dict]) -> dict[int, dict]:
    """Per choice index: text, finish_reason (exactly one per choice) and joined logprobs."""
    out: dict[int, dict] = {}
    for c in chunks:
        for ch in c["choices"]:
            o = out.setdefault(
                ch["index"],
                {"text": "", "finish_reason": None, "finishes": 0,
                 "tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []},
            )
            assert o["finish_reason"] is None, f"choice {ch['index']} got text after finishing"
            o["text"] += ch["text"]
            if ch["finish_reason"] is not None:
                o["finish_reason"] = ch["finish_reason"]
                o["finishes"] += 1
            if ch["logprobs"]:
                for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
                    o[key].extend(ch["logprobs"][key])
    for i, o in out.items():
        assert o["finishes"] == 1, f"choice {i} finished {o['finishes']} times"
    return out


def check_logprobs(lp: dict, text: str, k: int, *, start: int = 0) -> None:
    """OpenAI's legacy logprobs object, consistent with the text it describes."""
    tokens, values, tops, offsets = (
        lp["tokens"], lp["token_logprobs"], lp["top_logprobs"], lp["text_offset"]
    )
    assert len(tokens) == len(values) == len(tops) == len(offsets)
    for v in values:
        assert isinstance(v, float) and math.isfinite(v) and v <= 0.0
    for top in tops:
        assert isinstance(top, dict)
        assert 1 <= len(top) <= k
        for t, v in top.items():
            assert isinstance(t, str) and v <= 0.0
    assert offsets == sorted(offsets), "text_offset must not decrease"
    # Each token starts where the text before it ends.
    assert "".join(tokens) == text
    pos = start
    for tok, off in zip(tokens, offsets):
        assert off == pos
        pos += len(tok)


@pytest.fixture(scope="module")
def tokenizer():
    """The bundled model's own tokenizer (vocabulary only), to build token-id prompts."""
    from llama_cpp import Llama

    from llmserve.models import bundled_model_path

    vocab = Llama(model_path=str(bundled_model_path()), vocab_only=True, verbose=False)

    def tokenize(text: str) -> list[int]:
        return vocab.tokenize(text.encode(), add_bos=False, special=True)

    return tokenize


# -- prompt shapes --------------------------------------------------------------------------


def test_string_prompt_via_openai_client(client: openai.OpenAI):
    raw = client.completions.with_raw_response.create(
        model=MODEL, prompt="The capital of France is", max_tokens=5, temperature=0
    )
    assert raw.http_response.status_code == 200
    body = raw.http_response.json()
    validate("CreateCompletionResponse", body)
    parsed = raw.parse()
    assert parsed.object == "text_completion"
    assert parsed.model == MODEL
    assert len(parsed.choices) == 1
    choice = parsed.choices[0]
    assert choice.index == 0
    assert choice.text == body["choices"][0]["text"]
    assert choice.finish_reason in ("stop", "length")
    assert choice.logprobs is None
    assert parsed.usage.completion_tokens <= 5
    assert parsed.usage.prompt_tokens > 0
    assert parsed.usage.total_tokens == parsed.usage.prompt_tokens + parsed.usage.completion_tokens


def test_list_of_strings_is_indexed_prompt_major(http):
    prompts = ["Alpha beta gamma", "The sky is", "1, 2, 3,"]
    n = 2
    data = complete(http, prompt=prompts, n=n, echo=True, max_tokens=3, temperature=0)
    choices = data["choices"]
    assert len(choices) == len(prompts) * n
    assert [c["index"] for c in choices] == list(range(len(prompts) * n))
    for c in choices:
        prompt_i, _ = divmod(c["index"], n)
        assert c["text"].startswith(prompts[prompt_i]), (c["index"], c["text"])
        assert c["finish_reason"] in ("stop", "length")


def test_list_of_strings_matches_single_prompts(http):
    prompts = ["Once upon a time", "The quick brown fox"]
    together = complete(http, prompt=prompts, max_tokens=4, temperature=0)
    for i, p in enumerate(prompts):
        alone = complete(http, prompt=p, max_tokens=4, temperature=0)
        assert together["choices"][i]["text"] == alone["choices"][0]["text"]


def test_token_id_prompt_equals_string_prompt(http, tokenizer):
    text = "The sky is"
    ids = tokenizer(text)
    by_text = complete(http, prompt=text, max_tokens=6, temperature=0)
    by_ids = complete(http, prompt=ids, max_tokens=6, temperature=0)
    assert by_ids["usage"]["prompt_tokens"] == len(ids) == by_text["usage"]["prompt_tokens"]
    assert by_ids["choices"][0]["text"] == by_text["choices"][0]["text"]
    assert len(by_ids["choices"]) == 1
    # Echo of a token-id prompt is its text.
    echoed = complete(http, prompt=ids, max_tokens=2, temperature=0, echo=True)
    assert echoed["choices"][0]["text"].startswith(text)


def test_list_of_token_id_lists(http, tokenizer):
    texts = ["Hello there", "Numbers: 1, 2,"]
    ids = [tokenizer(t) for t in texts]
    data = complete(http, prompt=ids, max_tokens=3, temperature=0, echo=True)
    assert [c["index"] for c in data["choices"]] == [0, 1]
    for c, t in zip(data["choices"], texts):
        assert c["text"].startswith(t)
    assert data["usage"]["prompt_tokens"] == sum(len(i) for i in ids)


def test_token_id_prompt_via_openai_client(client, tokenizer):
    ids = tokenizer("One, two, three,")
    r = client.completions.create(model=MODEL, prompt=ids, max_tokens=3, temperature=0)
    assert len(r.choices) == 1
    assert r.usage.prompt_tokens == len(ids)
    r2 = client.completions.create(model=MODEL, prompt=[ids, ids], max_tokens=3, temperature=0)
    assert [c.index for c in r2.choices] == [0, 1]
    assert r2.usage.prompt_tokens == 2 * len(ids)


def test_concurrent_requests_do_not_mix(server):
    """Continuous batching: each answer belongs to its own prompt."""
    prompts = [f"Item {i}: the colour of the sea" for i in range(6)]

    async def main():
        # A client of this event loop's own (the session's async client may serve other loops).
        async with openai.AsyncOpenAI(base_url=server.base_url, api_key=server.api_key,
                                      max_retries=0, timeout=120) as aclient:

            async def one(p: str) -> tuple[str, str]:
                r = await aclient.completions.create(
                    model=MODEL, prompt=p, echo=True, max_tokens=4, temperature=0.8, seed=1
                )
                return p, r.choices[0].text

            return await asyncio.gather(*(one(p) for p in prompts))

    for p, text in asyncio.run(main()):
        assert text.startswith(p)


# -- echo, logprobs, n, stop ----------------------------------------------------------------


def test_echo_prepends_the_prompt(http):
    prompt = "Roses are red, violets are"
    plain = complete(http, prompt=prompt, max_tokens=5, temperature=0)
    echoed = complete(http, prompt=prompt, max_tokens=5, temperature=0, echo=True)
    text = echoed["choices"][0]["text"]
    assert text.startswith(prompt)
    assert text[len(prompt):] == plain["choices"][0]["text"]
    assert echoed["usage"] == plain["usage"]


def test_echo_stream_starts_with_prompt(http):
    prompt = "Roses are red, violets are"
    s = stream(http, prompt=prompt, max_tokens=5, temperature=0, echo=True)
    [choice] = assemble(s.chunks()).values()
    assert choice["text"].startswith(prompt)
    plain = complete(http, prompt=prompt, max_tokens=5, temperature=0)
    assert choice["text"] == prompt + plain["choices"][0]["text"]


def test_logprobs(http):
    data = complete(
        http, prompt="The quick brown fox jumps over the", max_tokens=8, temperature=0,
        logprobs=2, ignore_eos=True,
    )
    [choice] = data["choices"]
    lp = choice["logprobs"]
    assert lp is not None
    text = choice["text"]
    assert text.isascii(), "precondition: this prompt continues in ASCII"
    check_logprobs(lp, text, 2)
    assert len(lp["tokens"]) == data["usage"]["completion_tokens"] == 8
    # Greedy: the chosen token is the most likely one, listed among the top ones.
    for tok, value, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        assert tok in top
        assert top[tok] == pytest.approx(value)
        assert value == pytest.approx(max(top.values()))


def test_logprobs_via_openai_client(client):
    r = client.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=4, temperature=0, logprobs=1
    )
    lp = r.choices[0].logprobs
    assert lp is not None and len(lp.tokens) == r.usage.completion_tokens
    assert all(len(top) == 1 for top in lp.top_logprobs)
    assert "".join(lp.tokens) == r.choices[0].text


def test_logprobs_with_several_prompts_and_n(http):
    data = complete(http, prompt=["Hello", "Goodbye"], n=2, max_tokens=3, logprobs=2, seed=7)
    assert len(data["choices"]) == 4
    for c in data["choices"]:
        if c["text"].isascii():
            check_logprobs(c["logprobs"], c["text"], 2)


def test_logprobs_text_offset_stays_inside_multibyte_text(http):
    data = complete(
        http, prompt="中文：你好，世界。日本語：こんにちは。中文：", max_tokens=10, temperature=0,
        logprobs=1,
    )
    [choice] = data["choices"]
    tokens, offsets = choice["logprobs"]["tokens"], choice["logprobs"]["text_offset"]
    if not any(t.startswith("\\x") for t in tokens):
        pytest.skip("precondition: the greedy answer splits a character across tokens")
    text = choice["text"]
    assert offsets[0] == 0
    assert offsets == sorted(offsets)
    # A character offset into `text` can be at most its length.
    assert all(0 <= off <= len(text) for off in offsets), (offsets, len(text))


def test_n_choices(http):
    data = complete(http, prompt="My favourite animal is", n=3, max_tokens=4, seed=3,
                    temperature=1.0, ignore_eos=True)
    assert [c["index"] for c in data["choices"]] == [0, 1, 2]
    single = complete(http, prompt="My favourite animal is", max_tokens=1)
    # The prompt counts once, the completions add up.
    assert data["usage"]["prompt_tokens"] == single["usage"]["prompt_tokens"]
    assert data["usage"]["completion_tokens"] == 3 * 4
    assert all(c["finish_reason"] == "length" for c in data["choices"])


def test_n_via_openai_client(client):
    r = client.completions.create(model=MODEL, prompt="Hi", n=2, max_tokens=2)
    assert [c.index for c in r.choices] == [0, 1]


def _stop_candidate(text: str) -> str:
    """A short piece from the middle of `text`, not occurring earlier in it."""
    for start in range(3, len(text) - 2):
        piece = text[start:start + 3]
        if piece.strip() and text.find(piece) == start:
            return piece
    pytest.skip(f"no usable stop string in {text!r}")


def test_stop_string(http):
    prompt = "Here is a list of fruits: apple, banana,"
    base = complete(http, prompt=prompt, max_tokens=16, temperature=0, ignore_eos=True)
    text = base["choices"][0]["text"]
    stop = _stop_candidate(text)
    cut = text.index(stop)
    stopped = complete(http, prompt=prompt, max_tokens=16, temperature=0, stop=stop)
    c = stopped["choices"][0]
    assert c["text"] == text[:cut]
    assert stop not in c["text"]
    assert c["finish_reason"] == "stop"
    assert stopped["usage"]["completion_tokens"] < 16


def test_stop_list_earliest_wins_and_stream_agrees(http):
    prompt = "Here is a list of fruits: apple, banana,"
    text = complete(http, prompt=prompt, max_tokens=16, temperature=0, ignore_eos=True)[
        "choices"][0]["text"]
    first = _stop_candidate(text)
    later = text[-2:] if text.index(text[-2:]) > text.index(first) else first
    stops = [later, first, "no such stop string"]
    data = complete(http, prompt=prompt, max_tokens=16, temperature=0, stop=stops)
    assert data["choices"][0]["text"] == text[: text.index(first)]
    assert data["choices"][0]["finish_reason"] == "stop"
    s = stream(http, prompt=prompt, max_tokens=16, temperature=0, stop=stops)
    [choice] = assemble(s.chunks()).values()
    assert choice["text"] == data["choices"][0]["text"]
    assert choice["finish_reason"] == "stop"


def test_stop_via_openai_client(client):
    r = client.completions.create(
        model=MODEL, prompt="Count: 1, 2, 3, 4,", max_tokens=16, temperature=0, stop=[","]
    )
    assert "," not in r.choices[0].text
    assert r.choices[0].finish_reason in ("stop", "length")


# -- streaming ------------------------------------------------------------------------------


def test_stream_with_include_usage(http):
    prompts = ["Once upon a time", "The sky is"]
    body = dict(prompt=prompts, n=2, max_tokens=3, temperature=0, ignore_eos=True)
    s = stream(http, **body, stream_options={"include_usage": True})
    chunks = s.chunks()
    *content, last = chunks
    # The final chunk: no choices, the usage.
    assert last["choices"] == []
    assert last["usage"] is not None
    # Every earlier chunk says "usage": null.
    for c in content:
        assert "usage" in c and c["usage"] is None
        assert c["choices"], "only the usage chunk may have no choices"
    got = assemble(content)
    assert sorted(got) == [0, 1, 2, 3]
    assert all(g["finish_reason"] == "length" for g in got.values())
    whole = complete(http, **body)
    assert last["usage"] == whole["usage"]
    assert last["usage"]["completion_tokens"] == 4 * 3
    # Raw framing: `data: ` events separated by blank lines, ending with [DONE].
    assert s.raw.endswith(b"data: [DONE]\n\n")


def test_stream_without_include_usage_has_no_usage(http):
    s = stream(http, prompt="Hello", max_tokens=3, temperature=0)
    for c in s.chunks():
        assert c.get("usage") is None
        assert c["choices"]


def test_greedy_stream_equals_non_stream(http):
    body = dict(prompt=["The history of Rome", "Water boils at"], max_tokens=10, temperature=0,
                logprobs=2)
    whole = complete(http, **body)
    s = stream(http, **body)
    got = assemble(s.chunks())
    assert sorted(got) == [0, 1]
    for c in whole["choices"]:
        g = got[c["index"]]
        assert g["text"] == c["text"]
        assert g["finish_reason"] == c["finish_reason"]
        lp = c["logprobs"]
        assert g["tokens"] == lp["tokens"]
        assert g["text_offset"] == lp["text_offset"]
        assert g["token_logprobs"] == pytest.approx(lp["token_logprobs"], abs=1e-4)
        assert [sorted(t) for t in g["top_logprobs"]] == [sorted(t) for t in lp["top_logprobs"]]


def test_stream_via_openai_client(client, http):
    body = dict(model=MODEL, prompt="A short poem about the sea:", max_tokens=8, temperature=0)
    pieces, finishes, usage = [], [], None
    for chunk in client.completions.create(**body, stream=True,
                                           stream_options={"include_usage": True}):
        validate_chunk(chunk.model_dump(mode="json", exclude_unset=True))
        for c in chunk.choices:
            pieces.append(c.text)
            if c.finish_reason:
                finishes.append(c.finish_reason)
        if chunk.usage:
            usage = chunk.usage
    whole = complete(http, **{k: v for k, v in body.items() if k != "model"})
    assert "".join(pieces) == whole["choices"][0]["text"]
    assert finishes == [whole["choices"][0]["finish_reason"]]
    assert usage is not None and usage.model_dump(exclude_unset=True) == whole["usage"]


# -- defaults and usage ---------------------------------------------------------------------


def test_default_max_tokens_is_16(http, client):
    data = complete(http, prompt="Tell me a long story.", ignore_eos=True)
    assert data["usage"]["completion_tokens"] == 16
    assert data["choices"][0]["finish_reason"] == "length"
    r = client.completions.create(model=MODEL, prompt="Tell me a long story.",
                                  extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 16
    s = stream(http, prompt="Tell me a long story.", ignore_eos=True,
               stream_options={"include_usage": True})
    assert s.chunks()[-1]["usage"]["completion_tokens"] == 16


def test_usage_sums_over_prompts(http):
    a, b = "The first prompt is here", "Second"
    ua = complete(http, prompt=a, max_tokens=3, ignore_eos=True)["usage"]
    ub = complete(http, prompt=b, max_tokens=3, ignore_eos=True)["usage"]
    both = complete(http, prompt=[a, b], n=2, max_tokens=3, ignore_eos=True)["usage"]
    assert both["prompt_tokens"] == ua["prompt_tokens"] + ub["prompt_tokens"]
    assert both["completion_tokens"] == 2 * 2 * 3
    assert both["total_tokens"] == both["prompt_tokens"] + both["completion_tokens"]


# -- refused --------------------------------------------------------------------------------


def _error(r: httpx.Response, status: int = 400) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    validate("ErrorResponse", body)
    return body["error"]


def test_suffix_is_refused_by_name(http, client):
    err = _error(http.post(PATH, json={"model": MODEL, "prompt": "def f(", "suffix": "return 1"}))
    assert err["param"] == "suffix"
    assert "suffix" in err["message"]
    assert err["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as exc:
        client.completions.create(model=MODEL, prompt="def f(", suffix="return 1", max_tokens=2)
    assert exc.value.status_code == 400
    assert "suffix" in exc.value.message


def test_echo_with_logprobs_is_refused(http, client):
    err = _error(http.post(PATH, json={"model": MODEL, "prompt": "Hi", "echo": True,
                                       "logprobs": 1}))
    assert err["type"] == "invalid_request_error"
    assert "echo" in err["message"] and "logprobs" in err["message"]
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="Hi", echo=True, logprobs=1, max_tokens=2)
    # Refused before streaming starts: a plain HTTP error.
    r = http.post(PATH, json={"model": MODEL, "prompt": "Hi", "echo": True, "logprobs": 1,
                              "stream": True})
    _error(r)


@pytest.mark.parametrize("prompt", [[], [[]], [-1], [10**9], [1, "a"], [[1], "a"]])
def test_bad_prompts_are_400(http, prompt):
    err = _error(http.post(PATH, json={"model": MODEL, "prompt": prompt, "max_tokens": 1}))
    assert err["param"] is not None and err["param"].startswith("prompt")
