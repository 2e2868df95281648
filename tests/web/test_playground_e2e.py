"""End-to-end: the playground page in a real browser (Debian's headless Chromium driven by
Playwright) against the real server on the bundled model. The page is a client of the
public API only, so what is checked here is what a person sees: answers growing as they
stream, Stop cancelling the generation on the server, markup shown as text, the API key
asked for once, a dropped stream resumed, an error event shown."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import API_KEY, MODEL, Server, run_server
from greedy import assert_same_greedy
from prometheus_client.parser import text_string_to_metric_families

ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"
KEY_ITEM = "llmserve.playground.apiKey"
CONVERSATIONS = "llmserve.playground.conversations"
CHAT = "/v1/chat/completions"
# The markup that must stay text: an inline handler and a script, each setting a flag.
MARKUP = "<img src=x onerror=window.__xss=1><script>window.__xss=2</script>"


def chromium() -> str | None:
    return os.environ.get("LLMSERVE_TEST_CHROMIUM") or shutil.which("chromium")


# ---- without a browser: what the server sends ----------------------------------------------


def test_the_page_and_its_files_load_without_the_key_under_a_strict_csp(server: Server):
    for path in ("/", "/playground"):
        r = httpx.get(server.url + path)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        csp = r.headers["content-security-policy"]
        assert "default-src 'none'" in csp and "script-src 'self'" in csp
        assert "'unsafe-inline'" not in csp and "connect-src 'self'" in csp
        assert r.headers["x-content-type-options"] == "nosniff"
        # Every script is a file of this server's: nothing inline for the CSP to refuse.
        assert re.findall(r"<script\b[^>]*>", r.text) == [
            '<script type="module" src="/playground/app.js">']
        assert "<style" not in r.text and " style=" not in r.text
    for name, media in (("app.js", "text/javascript"), ("style.css", "text/css"),
                        ("favicon.svg", "image/svg+xml")):
        r = httpx.get(f"{server.url}/playground/{name}")
        assert r.status_code == 200 and r.headers["content-type"].startswith(media), name
        assert "content-security-policy" in r.headers
    assert httpx.get(server.url + "/playground/index.py").status_code == 404
    assert httpx.head(server.url + "/").status_code == 200
    # The page needs no key; the API it calls does.
    assert httpx.get(server.base_url + "/models").status_code == 401
    # The guards stand in front of the page too: a loopback server answers no foreign Host.
    assert httpx.get(server.url + "/", headers={"Host": "evil.example"}).status_code == 421


def test_no_playground_turns_the_page_off(tmp_path):
    with run_server(tmp_path, "--no-playground", api_key=None) as s:
        for path in ("/", "/playground", "/playground/app.js"):
            r = httpx.get(s.url + path)
            assert r.status_code == 404, path
            assert r.json()["error"]["type"] == "invalid_request_error"
        assert httpx.get(s.base_url + "/models").status_code == 200


# ---- in the browser --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    path = chromium()
    if path is None:
        pytest.skip("Chromium is not installed (Debian: apt-get install chromium; `make test` "
                    "installs it where it can): the playground's browser tests need it")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install -e '.[test]')")
    with sync_playwright() as p:
        # As root (containers), Chromium runs only without its sandbox.
        args = ["--no-sandbox"] if os.geteuid() == 0 else []
        b = p.chromium.launch(executable_path=path, args=args)
        yield b
        b.close()


class Page:
    """A tab on the playground, with what it logged: console messages, page errors and
    Content-Security-Policy violations (none is expected: the page keeps to its policy)."""

    def __init__(self, context, server: Server) -> None:
        self.server = server
        self.page = context.new_page()
        self.console: list[str] = []
        self.page.on("console", lambda m: self.console.append(f"{m.type}: {m.text}"))
        self.page.on("pageerror", lambda e: self.console.append(f"pageerror: {e}"))

    def open(self) -> Page:
        r = self.page.goto(self.server.url + "/")
        assert r is not None and r.status == 200
        return self

    # Predicates as functions: a string expression would be eval'ed, which the CSP forbids.
    def models_loaded(self) -> None:
        self.page.wait_for_function(
            "() => document.querySelector('#model').options.length > 0")

    def set(self, **fields: str) -> None:
        if not self.page.is_visible("#temperature"):
            self.page.click("#settings summary")
        for name, value in fields.items():
            self.page.fill(f"#{name.replace('_', '-')}", value)

    def send(self, text: str) -> None:
        self.page.fill("#input", text)
        self.page.press("#input", "Enter")

    def wait_idle(self, timeout: float = 120) -> None:
        self.page.wait_for_function("() => !document.body.classList.contains('busy')",
                                    timeout=timeout * 1000)

    def wait_text(self) -> None:
        """Until the answer being streamed shows some text."""
        self.page.wait_for_function(
            "() => document.querySelector('.message.assistant:last-child .body')"
            ".textContent.length"
            " > 0", timeout=120_000)

    def answers(self) -> list[dict]:
        """The assistant messages as the page keeps them (localStorage): the raw text."""
        conversations = json.loads(self.page.evaluate(f"localStorage.getItem('{CONVERSATIONS}')"))
        current = self.page.evaluate("localStorage.getItem('llmserve.playground.current')")
        [conv] = [c for c in conversations if c["id"] == current]
        return [m for m in conv["messages"] if m["role"] == "assistant"]

    def last(self, part: str) -> str:
        return self.page.text_content(f".message.assistant:last-child {part}") or ""

    def no_complaints(self) -> None:
        bad = [c for c in self.console if "Content Security Policy" in c or "pageerror" in c]
        assert not bad, bad


@pytest.fixture
def tab(browser, server: Server) -> Iterator[Page]:
    """A fresh browser context (its own storage) that already holds the API key."""
    context = browser.new_context(viewport={"width": 1100, "height": 760})
    context.add_init_script(f"sessionStorage.setItem('{KEY_ITEM}', '{API_KEY}')")
    try:
        yield Page(context, server).open()
    finally:
        context.close()


def api_answer(http: httpx.Client, text: str, max_tokens: int) -> dict:
    r = http.post(CHAT, json={"model": MODEL, "temperature": 0, "max_tokens": max_tokens,
                              "messages": [{"role": "user", "content": text}],
                              "logprobs": True, "top_logprobs": 5})
    assert r.status_code == 200, r.text
    return r.json()


def assert_api_answer(text: str, expected: dict) -> None:
    """The page's answer is the API's, up to a near tie (tests/greedy.py: the API's request
    meets the page's cache, read in other batch shapes)."""
    [choice] = expected["choices"]
    assert_same_greedy(text, choice["logprobs"]["content"])


def test_a_streamed_answer_grows_piece_by_piece_and_equals_the_api_answer(tab: Page, http):
    question = "Describe the sea in a few sentences."  # long: it runs to max_tokens
    tab.models_loaded()
    assert tab.page.input_value("#model") == MODEL
    tab.set(temperature="0", max_tokens="32")
    # Each change to the answer being streamed, as its text length.
    tab.page.evaluate("""() => {
        window.__lengths = [];
        new MutationObserver(() => {
            const body = document.querySelector('.message.assistant:last-child .body');
            if (body) window.__lengths.push(body.textContent.length);
        }).observe(document.querySelector('#messages'),
                   {childList: true, subtree: true, characterData: true});
    }""")
    # Shift+Enter starts a new line; Enter sends.
    tab.page.fill("#input", "first line")
    tab.page.press("#input", "Shift+Enter")
    assert tab.page.input_value("#input") == "first line\n"
    assert tab.page.locator(".message").count() == 0
    tab.send(question)
    assert tab.page.text_content(".message.user .body") == question  # shown at once
    assert tab.page.input_value("#input") == ""
    tab.wait_idle()
    lengths = tab.page.evaluate("window.__lengths")
    grown = sorted({n for n in lengths if n > 0})
    assert len(grown) >= 3, lengths  # it grew piece by piece, not all at once at the end

    [answer] = tab.answers()
    expected = api_answer(http, question, 32)
    assert_api_answer(answer["content"], expected)
    shown = " ".join(tab.last(".body").split())
    assert shown == " ".join(re.sub(r"[*`#]", "", answer["content"]).split())
    stats = tab.last(".stats")
    usage = expected["usage"]
    assert f"{usage['prompt_tokens']} prompt + {usage['completion_tokens']} completion" in stats
    assert re.search(r"TTFT \d+ ms", stats) and re.search(r"[\d.]+ tok/s", stats), stats

    # A second turn is sent with the first as history; both stay in the conversation.
    tab.send("Now in one sentence.")
    tab.wait_idle()
    assert tab.page.locator(".message").count() == 4
    assert len(tab.answers()) == 2 and tab.answers()[1]["content"]
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "playground.png"
    tab.page.screenshot(path=str(shot))
    print(f"\nplayground screenshot: {shot}")
    tab.no_complaints()

    # Kept in the browser: a reload shows the same conversation; a new chat starts empty.
    tab.page.reload()
    assert tab.page.locator(".message").count() == 4
    tab.page.click("#new-chat")
    assert tab.page.locator(".message").count() == 0
    assert tab.page.locator("#conversations li").count() == 2


def _aborted(server: Server) -> float:
    text = httpx.get(server.url + "/metrics").text
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if (s.name == "llmserve:request_success_total"
                    and s.labels == {"model_name": MODEL, "finished_reason": "abort"}):
                return s.value
    raise AssertionError("no abort counter in /metrics")


def test_stop_cancels_the_generation_on_the_server(tab: Page, server: Server, http):
    before = _aborted(server)
    tab.models_loaded()
    tab.set(max_tokens="1500")
    tab.send("Write a very long story about a lighthouse keeper.")
    tab.wait_text()
    tab.page.click("#stop")
    tab.wait_idle(timeout=30)
    assert "stopped" in tab.last(".stats")
    # The server gave the generation up (a stored stream is cancelled by deleting it).
    deadline = time.monotonic() + 30
    while _aborted(server) < before + 1:
        assert time.monotonic() < deadline, "the generation was not cancelled"
        time.sleep(0.2)
    completion_id = tab.page.get_attribute(".message.assistant:last-child", "data-id")
    assert completion_id and http.get(f"{CHAT}/{completion_id}").status_code == 404
    [answer] = tab.answers()
    assert answer["content"] and answer.get("stopped")
    tab.no_complaints()


def test_markup_from_the_model_and_the_user_renders_as_text(tab: Page):
    """The model is made to answer with the markup (a JSON schema whose one value is it,
    added to the page's request on its way): it and the user's own message show as text,
    no element is made of them, and nothing runs."""
    schema = {"type": "object", "properties": {"html": {"const": MARKUP}},
              "required": ["html"], "additionalProperties": False}

    def constrain(route) -> None:
        body = json.loads(route.request.post_data)
        body["response_format"] = {"type": "json_schema",
                                   "json_schema": {"name": "markup", "schema": schema}}
        route.continue_(post_data=json.dumps(body))

    tab.page.route("**/v1/chat/completions", constrain)
    tab.page.evaluate("""() => {
        window.__violations = [];
        document.addEventListener('securitypolicyviolation',
                                  (e) => window.__violations.push(e.violatedDirective));
    }""")
    tab.models_loaded()
    tab.set(temperature="0", max_tokens="60")
    user = f"Repeat this: {MARKUP}\n```html\n{MARKUP}\n```\n**{MARKUP}**"
    tab.send(user)
    tab.wait_idle()
    [answer] = tab.answers()
    assert json.loads(answer["content"]) == {"html": MARKUP}  # the model did say it
    assert MARKUP in tab.last(".body")
    assert tab.page.text_content(".message.user .body") == user
    assert tab.page.locator("#messages img, #messages script").count() == 0
    assert tab.page.evaluate("window.__xss") is None
    # Not even refused by the CSP: the browser never saw it as markup.
    assert tab.page.evaluate("window.__violations") == []
    tab.no_complaints()


def test_the_api_key_is_asked_for_once_and_kept_for_the_tab(browser, server: Server):
    context = browser.new_context()
    try:
        tab = Page(context, server).open()  # the page itself needs no key
        tab.page.wait_for_selector("#key-dialog[open]")
        tab.page.keyboard.press("Escape")  # declined: the call fails, and says why
        tab.page.wait_for_selector("#notice:not([hidden])")
        assert "needs an API key" in tab.page.text_content("#notice")
        tab.page.reload()  # asked again
        tab.page.wait_for_selector("#key-dialog[open]")
        assert not tab.page.is_visible("#key-error")
        tab.page.fill("#key-input", "not-the-key")
        tab.page.click("#key-save")
        tab.page.wait_for_selector("#key-dialog[open] #key-error:not([hidden])")
        tab.page.fill("#key-input", API_KEY)
        tab.page.click("#key-save")
        tab.models_loaded()
        assert not tab.page.is_visible("#key-dialog")
        assert tab.page.evaluate(f"sessionStorage.getItem('{KEY_ITEM}')") == API_KEY
        assert tab.page.evaluate(f"localStorage.getItem('{KEY_ITEM}')") is None
        tab.set(max_tokens="8")
        tab.send("Hi")
        tab.wait_idle()
        assert tab.answers()[0]["content"]
        tab.page.reload()  # the same tab keeps it: not asked again
        tab.models_loaded()
        assert not tab.page.is_visible("#key-dialog")
        tab.no_complaints()
    finally:
        context.close()


def test_a_dropped_stream_resumes_after_the_last_event_it_saw(tab: Page, http):
    """The first response is cut after a few events (as a dropped connection ends it); the
    page follows the stored stream on with Last-Event-ID, and the answer is whole."""
    question = "Name three colours of the rainbow."
    kept = 4

    def cut(route) -> None:
        response = route.fetch(timeout=120_000)  # the whole stream
        events = response.body().split(b"\n\n")
        route.fulfill(status=response.status, content_type="text/event-stream",
                      body=b"\n\n".join(events[:kept]) + b"\n\n")

    resumed: list[tuple[str, str | None]] = []
    tab.page.on("request", lambda r: resumed.append((r.url, r.headers.get("last-event-id")))
                if r.method == "GET" and "stream=true" in r.url else None)
    tab.page.route("**/v1/chat/completions", cut)
    tab.models_loaded()
    tab.set(temperature="0", max_tokens="40")
    tab.send(question)
    tab.wait_idle()
    [answer] = tab.answers()
    assert not answer.get("error"), answer
    assert_api_answer(answer["content"], api_answer(http, question, 40))
    assert [h for _, h in resumed] == [str(kept - 1)], resumed
    assert "resumed 1×" in tab.last(".stats")
    tab.no_complaints()


def test_an_error_event_mid_stream_is_shown(tab: Page, http):
    """The stored completion is deleted while it streams: the server ends the stream with an
    error event, and the page shows it under what had come."""
    tab.models_loaded()
    tab.set(max_tokens="1500")
    tab.send("Write a very long story about a ship.")
    tab.wait_text()
    completion_id = tab.page.get_attribute(".message.assistant:last-child", "data-id")
    assert http.delete(f"{CHAT}/{completion_id}").status_code == 200
    tab.wait_idle(timeout=30)
    error = tab.page.text_content(".message.assistant:last-child .error") or ""
    assert "cancelled" in error, error
    [answer] = tab.answers()
    assert answer["content"] and "cancelled" in answer["error"]
    tab.no_complaints()


def test_tool_calls_are_shown_folded(tab: Page):
    """With a tool given in the settings (and the call required, added to the request on its
    way), the model's call shows as a folded block holding its arguments."""
    tool = {"type": "function", "function": {
        "name": "get_weather", "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]}}}

    def require(route) -> None:
        body = json.loads(route.request.post_data)
        assert body["tools"] == [tool]
        body["tool_choice"] = {"type": "function", "function": {"name": "get_weather"}}
        route.continue_(post_data=json.dumps(body))

    tab.page.route("**/v1/chat/completions", require)
    tab.models_loaded()
    tab.set(temperature="0", max_tokens="60", tools=json.dumps([tool]))
    tab.send("What is the weather in Paris?")
    tab.wait_idle()
    call = tab.page.locator(".message.assistant:last-child details.tool-call")
    assert call.count() == 1
    assert call.locator("summary").text_content() == "Tool call: get_weather"
    assert not call.evaluate("(d) => d.open")  # folded
    assert "city" in json.loads(call.locator("pre").text_content())
    [answer] = tab.answers()
    assert answer["tool_calls"][0]["function"]["name"] == "get_weather"
    tab.no_complaints()


def test_without_a_store_or_a_key_it_streams_and_stop_hangs_up(browser, tmp_path):
    """--store none: the page's `store: true` is refused, so it streams without it, and Stop's
    hang-up alone cancels the generation. No key: nothing is asked."""
    with run_server(tmp_path, "--store", "none", api_key=None) as server:
        context = browser.new_context()
        try:
            tab = Page(context, server).open()
            tab.models_loaded()
            assert not tab.page.is_visible("#key-dialog")
            before = _aborted(server)
            tab.set(max_tokens="1500")
            tab.send("Write a very long story about a lighthouse keeper.")
            tab.wait_text()
            tab.page.click("#stop")
            tab.wait_idle(timeout=30)
            deadline = time.monotonic() + 30
            while _aborted(server) < before + 1:
                assert time.monotonic() < deadline, "the generation was not cancelled"
                time.sleep(0.2)
            [answer] = tab.answers()
            assert answer["content"] and answer.get("stopped") and not answer.get("error")
            tab.no_complaints()
        finally:
            context.close()
