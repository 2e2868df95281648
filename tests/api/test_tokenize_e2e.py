"""End-to-end: POST /tokenize and POST /detokenize (vLLM's shapes, at the root) on the real
server and the bundled model, on every engine: round trips, and counts equal to what the
chat and completions routes report as usage.prompt_tokens for the same input."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from conftest import MODEL, run_server
from engine_fixtures import *  # engine, server, client, async_client, http
from openai_schema import validate

TEXTS = [
    "Hello, world! How are you today?",
    "请用中文写一句关于大海的话。",
    "Emoji: 😀🎉🍕 and a family 👨‍👩‍👧",
    "  leading spaces,\ttabs\nand new lines\n",
    "mixed: café 中文 😀 ∑ <|im_start|> literal",
]

CONVERSATIONS = [
    [{"role": "user", "content": "Hi!"}],
    [{"role": "system", "content": "你是一个只用中文回答的助手。"},
     {"role": "user", "content": "你好！请介绍一下你自己。"}],
    [{"role": "user", "content": "Name a fruit."},
     {"role": "assistant", "content": "A pear 🍐."},
     {"role": "developer", "content": "Be brief."},
     {"role": "user", "content": [{"type": "text", "text": "Another, "},
                                  {"type": "text", "text": "please."}]}],
]

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
CALLED = [*ASK,  # a call made, and its result
          {"role": "assistant", "content": None, "tool_calls": [{
              "id": "call_1", "type": "function",
              "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
          {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 24 °C ☀️"}]
HERMES_TEMPLATE = Path(__file__).parent.parent / "data" / "hermes_template.jinja"


def tokenize(http: httpx.Client, **body) -> dict:
    r = http.post("/tokenize", json={"model": MODEL, **body})
    assert r.status_code == 200, r.text
    data = r.json()
    assert set(data) == {"count", "max_model_len", "tokens", "token_strs"}
    assert data["count"] == len(data["tokens"])
    assert all(isinstance(t, int) for t in data["tokens"])
    assert data["max_model_len"] == 2048  # the tests' --context-length
    return data


def detokenize(http: httpx.Client, tokens: list[int]) -> str:
    r = http.post("/detokenize", json={"model": MODEL, "tokens": tokens})
    assert r.status_code == 200, r.text
    data = r.json()
    assert set(data) == {"prompt"}
    return data["prompt"]


def chat_prompt_tokens(http: httpx.Client, messages: list[dict], **body) -> int:
    r = http.post("/v1/chat/completions",
                  json={"model": MODEL, "messages": messages, "max_tokens": 1, **body})
    assert r.status_code == 200, r.text
    validate("CreateChatCompletionResponse", r.json())
    return r.json()["usage"]["prompt_tokens"]


def assert_error(r: httpx.Response, status: int, code: object = ..., param: object = ...) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    validate("ErrorResponse", body)
    if code is not ...:
        assert body["error"]["code"] == code, body
    if param is not ...:
        assert body["error"]["param"] == param, body
    return body["error"]


# -- prompts ----------------------------------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS)
def test_a_prompt_round_trips(http, text):
    data = tokenize(http, prompt=text, add_special_tokens=False)
    assert data["token_strs"] is None
    assert detokenize(http, data["tokens"]) == text


def test_token_strs_are_the_vocabulary_s_strings(http):
    data = tokenize(http, prompt="Hello world", return_token_strs=True)
    strs = data["token_strs"]
    assert len(strs) == data["count"] and all(isinstance(s, str) for s in strs)
    assert strs[-1] in ("Ġworld", "▁world")  # byte-level BPE (SmolLM2) or SentencePiece
    # one token at a time, they are tokens, not text: a Chinese character in pieces
    zh = tokenize(http, prompt="大海", return_token_strs=True)
    assert len(zh["token_strs"]) == zh["count"] and "".join(zh["token_strs"]) != "大海"


@pytest.mark.parametrize("text", TEXTS[:3])
def test_a_prompt_counts_as_a_completion_reads_it(http, text):
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": text, "max_tokens": 1})
    assert r.status_code == 200, r.text
    expected = r.json()["usage"]["prompt_tokens"]
    assert tokenize(http, prompt=text)["count"] == expected  # add_special_tokens: true by default
    assert tokenize(http, prompt=text, add_special_tokens=True)["count"] == expected


def test_add_special_tokens_adds_at_most_the_model_s_bos(http):
    text = TEXTS[0]
    plain = tokenize(http, prompt=text, add_special_tokens=False)["tokens"]
    special = tokenize(http, prompt=text, add_special_tokens=True)["tokens"]
    assert special == plain or special[1:] == plain  # the bundled model adds no BOS
    chat = tokenize(http, messages=CONVERSATIONS[0])["tokens"]  # false by default with messages
    chat_special = tokenize(http, messages=CONVERSATIONS[0], add_special_tokens=True)["tokens"]
    assert chat_special[-len(chat):] == chat
    assert len(chat_special) - len(chat) == len(special) - len(plain)


def test_an_empty_prompt_has_no_tokens(http):
    data = tokenize(http, prompt="", add_special_tokens=False)
    assert data["count"] == 0 and data["tokens"] == []
    assert detokenize(http, []) == ""


# -- messages ---------------------------------------------------------------------------------


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_messages_count_exactly_a_chat_completion_s_prompt_tokens(http, messages):
    assert tokenize(http, messages=messages)["count"] == chat_prompt_tokens(http, messages)


@pytest.mark.parametrize("choice", [None, "auto", "required", "none",
                                    {"type": "function", "function": {"name": "get_weather"}}])
def test_messages_with_tools_count_exactly_a_chat_completion_s_prompt_tokens(http, choice):
    extra = {"tools": TOOLS} | ({"tool_choice": choice} if choice is not None else {})
    without = tokenize(http, messages=ASK)["count"]
    count = tokenize(http, messages=ASK, **extra)["count"]
    assert count == chat_prompt_tokens(http, ASK, **extra)
    if choice != "none":
        assert count > without  # the tools are in the prompt


def test_a_tool_call_history_counts_exactly_as_a_chat_completion(http):
    assert tokenize(http, messages=CALLED, tools=TOOLS)["count"] == \
        chat_prompt_tokens(http, CALLED, tools=TOOLS)


def test_a_template_that_lists_the_tools_itself(engine, tmp_path):
    """--chat-template with Hermes tool syntax: the template writes the tools and the calls,
    and /tokenize still counts what the chat completion reads."""
    if engine != "llamacpp":
        pytest.skip("the template's rules are the serving core's, alike on every engine")
    with run_server(tmp_path, "--chat-template", str(HERMES_TEMPLATE),
                    "--embedding-model", "none") as s, \
            httpx.Client(base_url=s.url, headers=s.headers(), timeout=120) as hermes:
        for messages, extra in ((ASK, {"tools": TOOLS}), (CALLED, {"tools": TOOLS}),
                                (CALLED, {"tools": TOOLS, "tool_choice": "required"}),
                                (ASK, {})):
            data = tokenize(hermes, messages=messages, **extra)
            assert data["count"] == chat_prompt_tokens(hermes, messages, **extra)
        text = detokenize(hermes, tokenize(hermes, messages=CALLED, tools=TOOLS)["tokens"])
        assert '<tools>\n{"type": "function", "function": {"name": "get_weather"' in text
        assert '<tool_response>\nSunny, 24 °C ☀️\n</tool_response>' in text


def test_messages_detokenize_to_the_rendered_template(http):
    messages = CONVERSATIONS[1]
    text = detokenize(http, tokenize(http, messages=messages)["tokens"])
    assert text.startswith("<|im_start|>system\n你是一个只用中文回答的助手。<|im_end|>\n")
    assert text.endswith("<|im_start|>user\n你好！请介绍一下你自己。<|im_end|>\n"
                         "<|im_start|>assistant\n")
    closed = detokenize(http, tokenize(http, messages=messages,
                                       add_generation_prompt=False)["tokens"])
    assert closed == text.removesuffix("<|im_start|>assistant\n")


def test_continue_final_message_leaves_the_last_message_open(http):
    messages = [*CONVERSATIONS[0], {"role": "assistant", "content": "Hello! I am 😀"}]
    data = tokenize(http, messages=messages, continue_final_message=True)
    text = detokenize(http, data["tokens"])
    assert text.endswith("<|im_start|>assistant\nHello! I am 😀")
    # what a chat completion of the messages before it reads, then the open message
    before = detokenize(http, tokenize(http, messages=CONVERSATIONS[0])["tokens"])
    assert text == before + "Hello! I am 😀"


def test_chat_template_kwargs_reach_the_template(http):
    # the bundled template reads no other variable: the prompt is unchanged, and accepted
    plain = tokenize(http, messages=ASK)["tokens"]
    assert tokenize(http, messages=ASK, chat_template_kwargs={"enable_thinking": False})[
        "tokens"] == plain


# -- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize("tokens", [[10**9], [-1], [1, 2, 49152]])
def test_ids_outside_the_vocabulary_are_refused(http, tokens):
    r = http.post("/detokenize", json={"model": MODEL, "tokens": tokens})
    err = assert_error(r, 400, param="tokens")
    assert "outside the vocabulary" in err["message"]


def test_unknown_model_is_404(http):
    for path, body in (("/tokenize", {"prompt": "x"}), ("/detokenize", {"tokens": [1]})):
        r = http.post(path, json={"model": "no-such-model", **body})
        assert_error(r, 404, code="model_not_found", param="model")


@pytest.mark.parametrize("body, param", [
    ({"prompt": "x", "messages": ASK}, ...),
    ({}, "messages"),
    ({"prompt": "x", "add_generation_prompt": True}, "add_generation_prompt"),
    ({"prompt": "x", "tools": TOOLS}, "tools"),
    ({"messages": ASK, "add_generation_prompt": True, "continue_final_message": True},
     "continue_final_message"),
    ({"messages": ASK, "chat_template": "{{ messages }}"}, "chat_template"),
    ({"messages": ASK, "chat_template_kwargs": {"bos_token": "x"}}, "chat_template_kwargs"),
    ({"messages": ASK, "tool_choice": "auto"}, "tool_choice"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": "data:,"}}]}]}, "messages.0.content.0.type"),
    ({"messages": ASK, "bogus": 1}, "bogus"),
    ({"messages": []}, "messages"),
    ({"prompt": 5}, "prompt"),
])
def test_bad_tokenize_requests_are_400(http, body, param):
    assert_error(http.post("/tokenize", json={"model": MODEL, **body}), 400, param=param)


def test_continue_final_message_needs_text_to_continue(http):
    r = http.post("/tokenize", json={"model": MODEL, "continue_final_message": True,
                                     "messages": [*ASK, {"role": "assistant", "content": ""}]})
    assert_error(r, 400, param="messages")


@pytest.mark.parametrize("body, param", [({"tokens": "1 2"}, "tokens"), ({}, "tokens"),
                                         ({"tokens": [1.5]}, "tokens.0")])
def test_bad_detokenize_requests_are_400(http, body, param):
    assert_error(http.post("/detokenize", json={"model": MODEL, **body}), 400, param=param)


def test_the_api_key_rule_of_v1(server):
    for path in ("/tokenize", "/detokenize"):
        r = httpx.post(server.url + path, json={"model": MODEL, "tokens": [1], "prompt": "x"})
        assert_error(r, 401, code="missing_api_key")
        r = httpx.post(server.url + path, headers=server.headers(), content=b"{}",
                       )  # no JSON content type
        assert_error(r, 415)


def test_an_embedding_model_names_its_endpoint(engine, http):
    if engine != "llamacpp":
        pytest.skip("only the llama.cpp server serves the embedding model")
    r = http.post("/tokenize", json={"model": "all-minilm-l6-v2", "prompt": "x"})
    assert "/v1/embeddings" in assert_error(r, 400, param="model")["message"]
