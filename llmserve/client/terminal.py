"""The terminal side of `llmserve chat`: an interactive loop on prompt-toolkit (line
editing, history across sessions, multi-line input, key bindings), or one answer for piped
input. Answers are written to stdout as they stream, as plain text: they appear token by
token, and what is printed is exactly what the model said (rich's Markdown rendering would
need the whole answer, or a live region that redraws badly once it outgrows the screen). A
thinking model's reasoning is shown dimmed before the answer in the terminal, and left out of
piped output."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from llmserve.client.api import ApiClient, ApiError, ChatStream
from llmserve.client.conversation import HELP, Conversation, message_text, parse_command


@dataclass
class ChatOptions:
    base_url: str
    api_key: str | None = None
    model: str | None = None
    system: str | None = None
    temperature: float | None = None
    max_tokens: int | None = None


def state_dir() -> Path:
    """$XDG_STATE_HOME/llmserve, else ~/.local/state/llmserve (history is state: worth
    keeping, not worth backing up)."""
    xdg = os.environ.get("XDG_STATE_HOME", "")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".local" / "state"
    return base / "llmserve"


def history_path() -> Path:
    return Path(os.environ.get("LLMSERVE_CHAT_HISTORY") or state_dir() / "chat_history")


def choose_model(api: ApiClient, wanted: str | None) -> str:
    if wanted:
        return wanted
    models = api.models()
    if not models:
        raise ApiError("the server lists no models: pass --model")
    return models[0]["id"]


@contextlib.contextmanager
def _no_echo() -> Iterator[None]:
    """While an answer streams, keys typed ahead are not echoed into it; they wait for the
    next prompt. Ctrl-C still interrupts (ISIG stays on)."""
    try:
        import termios

        fd = sys.stdin.fileno()
        saved = termios.tcgetattr(fd)
    except (ImportError, OSError, ValueError):
        yield  # not a terminal, or not a POSIX one
        return
    quiet = list(saved)
    quiet[3] &= ~(termios.ECHO | termios.ECHOCTL)
    termios.tcsetattr(fd, termios.TCSANOW, quiet)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSANOW, saved)


def stream_answer(stream: ChatStream, write: Callable[[str], None],
                  think: Callable[[str], None] | None = None) -> None:
    """Write the answer's pieces as they come, and the reasoning's to `think` (dropped
    without one); Ctrl-C (KeyboardInterrupt) hangs up."""
    try:
        for piece in stream:
            if not piece.reasoning:
                write(piece.text)
            elif think is not None:
                think(piece.text)
    finally:
        stream.close()


DIM, UNDIM = "\x1b[2m", "\x1b[22m"


def run_piped(api: ApiClient, options: ChatOptions, stdin: TextIO, stdout: TextIO) -> int:
    """One question from stdin, its answer alone on stdout."""
    question = stdin.read().strip()
    if not question:
        print("llmserve chat: no input on stdin", file=sys.stderr)
        return 2
    chat = Conversation(choose_model(api, options.model), options.system,
                        temperature=options.temperature, max_tokens=options.max_tokens)
    chat.ask(question)

    def write(piece: str) -> None:
        stdout.write(piece)
        stdout.flush()

    stream_answer(api.stream(chat.request()), write)
    stdout.write("\n")
    stdout.flush()
    return 0


def run_interactive(api: ApiClient, options: ChatOptions) -> int:
    from prompt_toolkit import PromptSession, print_formatted_text
    from prompt_toolkit.formatted_text import FormattedText
    from prompt_toolkit.history import FileHistory
    from prompt_toolkit.key_binding import KeyBindings

    def note(text: str, style: str = "fg:ansibrightblack") -> None:
        print_formatted_text(FormattedText([(style, text)]))

    chat = Conversation(choose_model(api, options.model), options.system,
                        temperature=options.temperature, max_tokens=options.max_tokens)
    keys = KeyBindings()

    # Enter sends. So does Ctrl-J (a line feed): what a line typed ahead while an answer
    # streams becomes, as the terminal turns its Enter into a line feed then.
    @keys.add("enter")
    @keys.add("c-j")
    def _send(event) -> None:  # type: ignore[no-untyped-def]
        event.current_buffer.validate_and_handle()

    @keys.add("escape", "enter")
    def _newline(event) -> None:  # type: ignore[no-untyped-def]
        event.current_buffer.insert_text("\n")

    path = history_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    session: PromptSession[str] = PromptSession(
        history=FileHistory(str(path)), multiline=True, key_bindings=keys,
        prompt_continuation=lambda width, line, wrap: "." * (width - 1) + " ")
    resumable = " (stored streams, resumed if the connection drops)" if api.store else ""
    note(f"llmserve chat: {chat.model} at {api.base_url}{resumable}")
    note("/help for commands; Ctrl-D or /exit leaves.")
    while True:
        try:
            line = session.prompt(">>> ")
        except KeyboardInterrupt:
            continue  # Ctrl-C at the prompt clears the line, as in a shell
        except EOFError:
            return 0
        if not line.strip():
            continue
        command = parse_command(line)
        if command is None:
            _answer(api, chat, message_text(line), note)
            continue
        if command.name == "exit":
            return 0
        try:
            note(_run_command(api, chat, command.name, command.arg))
        except (ApiError, OSError) as exc:
            note(f"error: {exc}", "fg:ansired")


def _answer(api: ApiClient, chat: Conversation, text: str,
            note: Callable[..., None]) -> None:
    chat.ask(text)
    stream = api.stream(chat.request())

    thought = False  # reasoning shown: a blank line before the answer

    def think(piece: str) -> None:
        nonlocal thought
        thought = True
        sys.stdout.write(DIM + piece + UNDIM)  # per piece: Ctrl-C leaves no dim behind
        sys.stdout.flush()

    def write(piece: str) -> None:
        nonlocal thought
        if thought:
            sys.stdout.write("\n\n")
            thought = False
        sys.stdout.write(piece)
        sys.stdout.flush()

    try:
        with _no_echo():
            stream_answer(stream, write, think)
    except KeyboardInterrupt:
        sys.stdout.write("\n")
        note("[stopped]")
        if not stream.answer.text:
            chat.unask()  # nothing was said: as if not asked
            return
    except ApiError as exc:
        sys.stdout.write("\n" if stream.answer.text or stream.answer.reasoning else "")
        note(f"error: {exc}", "fg:ansired")
        if not stream.answer.text:
            chat.unask()
            return
    else:
        sys.stdout.write("\n")
        note(_stats(stream))
    chat.answered(stream.answer.text)


def _stats(stream: ChatStream) -> str:
    a = stream.answer
    parts = [f"{a.tokens} tokens"]
    if a.tokens_per_second is not None:
        parts.append(f"{a.tokens_per_second:.1f} tok/s")
    if a.time_to_first_token is not None:
        parts.append(f"first token {a.time_to_first_token:.2f} s")
    if a.resumes:
        parts.append(f"resumed {a.resumes}x")
    if a.finish_reason == "length":
        parts.append("cut at max tokens")
    return "[" + ", ".join(parts) + "]"


def _run_command(api: ApiClient, chat: Conversation, name: str, arg: str) -> str:
    if name == "help":
        return HELP
    if name == "clear":
        chat.messages.clear()
        return "[conversation cleared]"
    if name == "system":
        if not arg:
            return f"system: {chat.system}" if chat.system else "[no system prompt]"
        chat.system = None if arg == "-" else arg
        return "[system prompt removed]" if chat.system is None else "[system prompt set]"
    if name == "model":
        ids = [m["id"] for m in api.models()]
        if not arg:
            return "\n".join(("* " if i == chat.model else "  ") + i for i in ids)
        if arg not in ids:
            return f"no model '{arg}' here: {', '.join(ids)}"
        chat.model = arg
        return f"[model: {arg}]"
    if name == "save":
        if not arg:
            return "usage: /save FILE"
        path = Path(arg).expanduser()
        chat.save(path)
        return f"[saved to {path}]"
    return f"unknown command /{name}: /help lists them"
