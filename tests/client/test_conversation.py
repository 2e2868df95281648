"""The chat's state and slash commands, apart from any terminal."""

from __future__ import annotations

import json

from llmserve.client.conversation import Command, Conversation, message_text, parse_command


def test_request_holds_system_turns_and_sampling():
    chat = Conversation("m", "Be brief.", temperature=0, max_tokens=5)
    chat.ask("Hi")
    chat.answered("Hello")
    chat.ask("Bye")
    assert chat.request() == {
        "model": "m", "temperature": 0, "max_tokens": 5,
        "messages": [{"role": "system", "content": "Be brief."},
                     {"role": "user", "content": "Hi"},
                     {"role": "assistant", "content": "Hello"},
                     {"role": "user", "content": "Bye"}]}
    chat.unask()  # a question that got no answer is taken back
    assert chat.request()["messages"][-1]["role"] == "assistant"


def test_commands_and_escaped_slashes():
    assert parse_command("/model  x y") == Command("model", "x y")
    assert parse_command("/quit") == Command("exit")
    assert parse_command("hello") is None
    assert parse_command("//etc/passwd is a path") is None
    assert message_text("//etc/passwd is a path") == "/etc/passwd is a path"


def test_save_json_and_markdown(tmp_path):
    chat = Conversation("m", "S")
    chat.ask("Q")
    chat.answered("A")
    chat.save(tmp_path / "c.json")
    assert json.loads((tmp_path / "c.json").read_text()) == {
        "model": "m", "messages": [{"role": "system", "content": "S"},
                                   {"role": "user", "content": "Q"},
                                   {"role": "assistant", "content": "A"}]}
    chat.save(tmp_path / "c.md")
    assert (tmp_path / "c.md").read_text().startswith("# Chat with m\n")
