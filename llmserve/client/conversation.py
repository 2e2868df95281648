"""One chat's state (model, system prompt, messages) and the slash commands that change it.
No terminal here: the UI reads lines, this decides what they mean."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HELP = """\
/model [NAME]   show the models, or switch to NAME
/system [TEXT]  show the system prompt, or set it (`/system -` removes it)
/clear          forget the conversation (the system prompt stays)
/save FILE      write the conversation to FILE (JSON; Markdown if FILE ends in .md)
/exit           leave (Ctrl-D too)
Enter sends; Alt+Enter (or Esc then Enter) starts a new line; Ctrl-C stops an answer."""


@dataclass
class Conversation:
    model: str
    system: str | None = None
    messages: list[dict[str, str]] = field(default_factory=list)  # user and assistant turns
    temperature: float | None = None
    max_tokens: int | None = None

    def request(self) -> dict[str, Any]:
        """The chat completion request for the conversation so far."""
        system = [{"role": "system", "content": self.system}] if self.system else []
        body: dict[str, Any] = {"model": self.model, "messages": [*system, *self.messages]}
        if self.temperature is not None:
            body["temperature"] = self.temperature
        if self.max_tokens is not None:
            body["max_tokens"] = self.max_tokens
        return body

    def ask(self, text: str) -> None:
        self.messages.append({"role": "user", "content": text})

    def answered(self, text: str) -> None:
        """Keep the answer, a cut-off one too: the user saw it, so the model sees it next."""
        self.messages.append({"role": "assistant", "content": text})

    def unask(self) -> None:
        """Take back a question that got no answer at all (an error), so it is not sent
        twice in a row."""
        if self.messages and self.messages[-1]["role"] == "user":
            self.messages.pop()

    def save(self, path: Path) -> None:
        if path.suffix.lower() == ".md":
            path.write_text(self.markdown(), encoding="utf-8")
        else:
            body = {"model": self.model, "messages": self.request()["messages"]}
            path.write_text(json.dumps(body, indent=2, ensure_ascii=False) + "\n",
                            encoding="utf-8")

    def markdown(self) -> str:
        parts = [f"# Chat with {self.model}\n"]
        if self.system:
            parts.append(f"**system:** {self.system}\n")
        for m in self.messages:
            parts.append(f"**{m['role']}:**\n\n{m['content']}\n")
        return "\n".join(parts)


@dataclass(frozen=True)
class Command:
    name: str  # "model", "system", "clear", "save", "exit", "help"
    arg: str = ""


COMMANDS = ("model", "system", "clear", "save", "exit", "quit", "help")


def parse_command(line: str) -> Command | None:
    """A slash command, or None when the line is a message. `//text` sends `/text`."""
    if not line.startswith("/") or line.startswith("//"):
        return None
    name, _, arg = line[1:].partition(" ")
    name = name.strip().lower()
    if name == "quit":
        name = "exit"
    return Command(name, arg.strip())


def message_text(line: str) -> str:
    return line[1:] if line.startswith("//") else line
