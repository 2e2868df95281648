"""End-to-end: `llmserve chat` in a real terminal (a pty driven by pexpect), against a real
server on the bundled model: streamed answers, Ctrl-C, the slash commands, history, piped
input, a resume after a dropped connection, a server that refuses `store`, and no server."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from conftest import MODEL, Server, run_server
from cutting_proxy import CuttingProxy
from thinking import ASK, SYSTEM, THINKING_TEMPLATE
from tmux_terminal import Terminal

STATS = r"\[(\d+) tokens[^\]]*\]"


@pytest.fixture(scope="module")
def chat_server(tmp_path_factory) -> Iterator[Server]:
    """A server of this module's own, so /metrics counts only what these tests do."""
    with run_server(tmp_path_factory.mktemp("chat"), "--embedding-model", "none") as s:
        yield s


@pytest.fixture(scope="module")
def api(chat_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=chat_server.base_url, api_key=chat_server.api_key,
                         max_retries=0, timeout=300)


def env_for(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMSERVE_")}
    env.update(LLMSERVE_CHAT_HISTORY=str(tmp_path / "history"), TERM="xterm-256color",
               XDG_STATE_HOME=str(tmp_path / "state"), XDG_DATA_HOME=str(tmp_path / "data"))
    env.update(extra)
    return env


def chat_args(server: Server | None, *flags: str, base_url: str | None = None) -> list[str]:
    args = ["-m", "llmserve.cli", "chat", *flags]
    if server is not None:
        args += ["--base-url", base_url or server.base_url, "--api-key", server.api_key]
    return args


@pytest.fixture
def terminals(tmp_path) -> Iterator[list[Terminal]]:
    opened: list[Terminal] = []
    yield opened
    for t in opened:
        t.close()


def open_chat(terminals: list[Terminal], server: Server, tmp_path: Path, *flags: str) -> Terminal:
    t = Terminal([sys.executable, *chat_args(server, *flags)], env_for(tmp_path), tmp_path)
    terminals.append(t)
    t.wait_prompt()
    return t


def ask(t: Terminal, question: str) -> tuple[str, str]:
    """Type a question and Enter; the screen's text from the question to the stats line,
    and that line."""
    start = t.screen().rfind(">>>")
    t.type(question)
    t.wait_for(re.escape(question.rsplit("\n", 1)[-1]) + "$", after=start)
    t.keys("Enter")
    stats = t.wait_for(STATS, after=start)
    t.wait_prompt(after=start)
    return t.screen()[start:stats.start()], stats.group(0)


def command(t: Terminal, line: str) -> str:
    """Run a slash command; what it printed."""
    start = t.screen().rfind(">>>")
    t.type(line)
    t.wait_for(re.escape(line) + "$", after=start)
    t.keys("Enter")
    screen = t.wait_prompt(after=start)
    return screen[start:].split("\n", 1)[1].rsplit("\n", 1)[0]


def non_stream(api: openai.OpenAI, messages: list[dict], max_tokens: int):
    return api.chat.completions.create(model=MODEL, messages=messages, temperature=0,
                                       max_tokens=max_tokens)


def metrics(server: Server) -> dict[str, float]:
    text = httpx.get(server.url + "/metrics", headers=server.headers()).text
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("llmserve:") and " " in line:
            name, value = line.rsplit(" ", 1)
            out[name.replace(f'model_name="{MODEL}"', "").replace(",}", "}").replace("{}", "")
                ] = float(value)
    return out


ABORTS = 'llmserve:request_success_total{finished_reason="abort"}'
GENERATED = "llmserve:generation_tokens_total"
RUNNING = "llmserve:num_requests_running"


def test_streamed_answer_equals_the_non_stream_answer(chat_server, api, tmp_path, terminals):
    question = "What is the capital of France?"
    want = non_stream(api, [{"role": "user", "content": question}], 24)
    t = open_chat(terminals, chat_server, tmp_path, "--temperature", "0", "--max-tokens", "24")
    seen, stats = ask(t, question)
    assert seen == f">>> {question}\n{want.choices[0].message.content}\n"
    assert stats.startswith(f"[{want.usage.completion_tokens} tokens, ")
    assert re.search(r"\d+\.\d tok/s", stats), stats
    t.keys("C-d")
    t.wait_exit()


def test_ctrl_c_stops_an_answer_and_the_next_question_still_works(chat_server, tmp_path,
                                                                 terminals):
    t = open_chat(terminals, chat_server, tmp_path, "--temperature", "0", "--max-tokens", "1000")
    before = metrics(chat_server)
    t.type("Write a very long story about a dragon and a knight.")
    t.keys("Enter")
    deadline = time.monotonic() + 120
    while metrics(chat_server)[GENERATED] < before[GENERATED] + 4:  # mid-answer
        assert time.monotonic() < deadline
        time.sleep(0.1)
    # Streamed: the answer shows while the server is still generating it.
    t.wait_for(r"^>>> Write a very long story about a dragon and a knight\.\n.*\S")
    t.keys("C-c")
    t.wait_for(r"^\[stopped\]$")
    t.wait_prompt()
    deadline = time.monotonic() + 30
    while (after := metrics(chat_server))[ABORTS] < before[ABORTS] + 1:
        assert time.monotonic() < deadline, "the server did not cancel the generation"
        time.sleep(0.1)
    assert after[ABORTS] == before[ABORTS] + 1 and after[RUNNING] == 0
    assert after[GENERATED] - before[GENERATED] < 1000  # not generated to the end
    _, stats = ask(t, "And what is 2+2?")
    assert not stats.startswith("[0 tokens")
    # The conversation kept both turns, the stopped answer as far as it went.
    command(t, f"/save {tmp_path / 'chat.json'}")
    messages = json.loads((tmp_path / "chat.json").read_text())["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    assert messages[1]["content"] and messages[2]["content"] == "And what is 2+2?"
    t.type("/exit")
    t.keys("Enter")
    t.wait_exit()


def test_model_system_clear_save_and_multi_line_input(chat_server, api, tmp_path, terminals):
    t = open_chat(terminals, chat_server, tmp_path, "--temperature", "0", "--max-tokens", "8",
                  "--system", "Be brief.")
    assert command(t, "/model") == f"* {MODEL}"
    assert command(t, "/model nope").startswith("no model 'nope' here")
    assert command(t, f"/model {MODEL}") == f"[model: {MODEL}]"
    assert command(t, "/system") == "system: Be brief."
    assert command(t, "/system You answer in French.") == "[system prompt set]"
    # Alt+Enter (Esc, Enter) starts a new line; Enter sends both lines as one message.
    t.type("Say hello.")
    t.keys("Escape", "Enter")
    seen, _ = ask(t, "Then stop.")
    assert seen.startswith(">>> Say hello.\n... Then stop.\n")
    command(t, f"/save {tmp_path / 'one.json'}")
    saved = json.loads((tmp_path / "one.json").read_text())
    assert saved["model"] == MODEL
    assert saved["messages"][:2] == [
        {"role": "system", "content": "You answer in French."},
        {"role": "user", "content": "Say hello.\nThen stop."}]
    want = non_stream(api, saved["messages"][:2], 8).choices[0].message.content
    assert saved["messages"][2] == {"role": "assistant", "content": want}
    command(t, f"/save {tmp_path / 'one.md'}")
    assert "**user:**\n\nSay hello.\nThen stop." in (tmp_path / "one.md").read_text()
    assert command(t, "/clear") == "[conversation cleared]"
    command(t, f"/save {tmp_path / 'two.json'}")
    assert json.loads((tmp_path / "two.json").read_text())["messages"] == [
        {"role": "system", "content": "You answer in French."}]
    assert "/save FILE" in command(t, "/help")
    t.type("/exit")
    t.keys("Enter")
    t.wait_exit()


def test_history_across_sessions(chat_server, tmp_path, terminals):
    t = open_chat(terminals, chat_server, tmp_path)
    command(t, "/system remember this line")
    t.keys("C-d")
    t.wait_exit()
    assert "/system remember this line" in (tmp_path / "history").read_text()
    t = open_chat(terminals, chat_server, tmp_path)
    t.keys("Up")  # the last line of the previous session
    t.wait_for(r"^>>> /system remember this line$")
    t.keys("Enter")
    t.wait_for(r"^\[system prompt set\]$")
    t.wait_prompt()
    # A pasted block keeps its lines in one input, sent by Enter.
    start = t.screen().rfind(">>>")
    t.paste("/system pasted one\npasted two")
    t.wait_for(r"^\.\.\. pasted two$", after=start)
    t.keys("Enter")
    t.wait_prompt(after=start)
    assert command(t, "/system") == "system: pasted one\npasted two"
    t.keys("C-d")
    t.wait_exit()


def piped(question: str, server: Server | None, tmp_path: Path, *flags: str,
          base_url: str | None = None, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *chat_args(server, *flags, base_url=base_url)],
                          input=question, capture_output=True, text=True, timeout=300,
                          env=env_for(tmp_path, **env), cwd=tmp_path)


def test_piped_input_prints_only_the_answer(chat_server, api, tmp_path):
    question = "Name a colour."
    want = non_stream(api, [{"role": "user", "content": question}], 16)
    r = piped(question + "\n", chat_server, tmp_path, "--temperature", "0", "--max-tokens", "16")
    assert r.returncode == 0, r.stderr
    assert r.stdout == want.choices[0].message.content + "\n"


def test_a_dropped_stream_is_resumed_not_generated_again(chat_server, api, tmp_path):
    question = "Tell a short story about a cat."
    want = non_stream(api, [{"role": "user", "content": question}], 60)
    before = metrics(chat_server)
    proxy = CuttingProxy(int(chat_server.url.rsplit(":", 1)[1]), cut_after=1500)
    try:
        r = piped(question, chat_server, tmp_path, "--temperature", "0", "--max-tokens", "60",
                  base_url=proxy.base_url)
    finally:
        proxy.close()
    assert r.returncode == 0, r.stderr
    assert r.stdout == want.choices[0].message.content + "\n"
    assert proxy.cuts == 1
    resumes = [line for line in proxy.requests if line.startswith("GET /v1/chat/completions/")]
    assert resumes, proxy.requests
    completion_id = resumes[0].split("/")[4].split("?")[0]
    stored = api.chat.completions.retrieve(completion_id)
    assert stored.choices[0].message.content == want.choices[0].message.content
    after = metrics(chat_server)
    # Generated once: the server's token count grew by this answer's tokens, not twice that.
    assert after[GENERATED] - before[GENERATED] == want.usage.completion_tokens


def test_a_server_that_refuses_store_still_works(tmp_path):
    with run_server(tmp_path, "--store", "none", "--embedding-model", "none") as server:
        r = piped("Say yes.", server, tmp_path, "--temperature", "0", "--max-tokens", "8")
        assert r.returncode == 0, r.stderr
        want = openai.OpenAI(base_url=server.base_url, api_key=server.api_key).chat.completions\
            .create(model=MODEL, temperature=0, max_tokens=8,
                    messages=[{"role": "user", "content": "Say yes."}])
        assert r.stdout == want.choices[0].message.content + "\n"


def test_with_no_server_it_starts_one_on_the_bundled_model(tmp_path, terminals):
    dead = f"http://127.0.0.1:{socket_port()}/v1"
    r = piped("Say yes.", None, tmp_path, "--max-tokens", "8", LLMSERVE_BASE_URL=dead)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()
    assert "starting one on the bundled model" in r.stderr
    log = tmp_path / "state" / "llmserve" / "chat-server.log"
    with pytest.raises(httpx.ConnectError):  # stopped with the chat
        httpx.get(f"http://127.0.0.1:{_port_in(log)}/health")
    # Interactive, and its terminal closed under it (SIGHUP): the server stops all the same.
    t = Terminal([sys.executable, *chat_args(None)], env_for(tmp_path, LLMSERVE_BASE_URL=dead),
                 tmp_path)
    terminals.append(t)
    t.wait_prompt()
    port = _port_in(log)
    assert httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200
    t.close()
    deadline = time.monotonic() + 30
    while True:
        try:
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
        except httpx.ConnectError:
            break
        assert time.monotonic() < deadline, "the chat's server outlived its terminal"
        time.sleep(0.2)


def _port_in(log: Path) -> int:
    return int(re.search(r"OpenAI API at http://127\.0\.0\.1:(\d+)", log.read_text()).group(1))


def socket_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_explicit_base_url_that_does_not_answer_is_an_error_with_a_hint(tmp_path):
    dead = f"http://127.0.0.1:{socket_port()}/v1"
    r = piped("Hi", None, tmp_path, "--base-url", dead)
    assert r.returncode == 1 and r.stdout == ""
    assert f"Is a server running at {dead}?" in r.stderr  # not started: that one was asked for


@pytest.fixture(scope="module")
def thinking_server(tmp_path_factory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("thinking")
    (tmp / "thinking.jinja").write_text(THINKING_TEMPLATE)
    with run_server(tmp, "--chat-template", str(tmp / "thinking.jinja"),
                    "--embedding-model", "none") as s:
        yield s


def test_a_thinking_model_s_reasoning_shows_dimmed_before_the_answer(thinking_server, tmp_path,
                                                                     terminals):
    api = openai.OpenAI(base_url=thinking_server.base_url, api_key=thinking_server.api_key,
                        max_retries=0, timeout=300)
    for _ in range(2):  # the prompt cached as the chat's will find it (tests/greedy.py)
        want = non_stream(api, ASK, 48).choices[0].message
    assert want.reasoning_content and want.content
    t = open_chat(terminals, thinking_server, tmp_path, "--temperature", "0", "--max-tokens", "48",
                  "--system", SYSTEM)
    seen, _ = ask(t, ASK[1]["content"])
    assert seen == f">>> {ASK[1]['content']}\n{want.reasoning_content}\n\n{want.content}\n"
    styled = t.screen(styles=True)
    first_word = want.reasoning_content.split()[0]
    assert re.search(r"\x1b\[2m" + re.escape(first_word), styled), styled[-400:]
    # the conversation goes on with the answer alone; piped output is the answer alone
    r = piped(ASK[1]["content"], thinking_server, tmp_path, "--temperature", "0",
              "--max-tokens", "48", "--system", SYSTEM)
    assert r.returncode == 0, r.stderr
    assert r.stdout == want.content + "\n"
