"""A real terminal for tests: a command in a tmux pane of a tmux server of its own, keys
sent with `send-keys`, the screen read back with `capture-pane` as the user would see it
(tmux renders the escape sequences, and answers prompt-toolkit's cursor queries)."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import time
import uuid
from pathlib import Path


class Terminal:
    def __init__(self, command: list[str], env: dict[str, str], cwd: Path,
                 width: int = 200, height: int = 50) -> None:
        tmux = shutil.which("tmux")
        if tmux is None:
            raise RuntimeError("tmux is not installed (make test-deps installs it)")
        socket = cwd / f"tmux-{uuid.uuid4().hex[:8]}.sock"  # a tmux server per terminal
        self._tmux = [tmux, "-S", str(socket), "-f", str(cwd / "tmux.conf")]
        # Kept after the command exits, to read its last screen; a long scroll-back.
        (cwd / "tmux.conf").write_text("set -g remain-on-exit on\nset -g history-limit 20000\n")
        self._run("new-session", "-d", "-s", "t", "-x", str(width), "-y", str(height),
                  "-c", str(cwd), shlex.join(command), env=env)

    def _run(self, *args: str, env: dict[str, str] | None = None) -> str:
        return subprocess.run([*self._tmux, *args], capture_output=True, text=True, check=True,
                              env=env, timeout=30).stdout

    def type(self, text: str) -> None:
        """Type text literally (no key names)."""
        self._run("send-keys", "-t", "t", "-l", text)

    def paste(self, text: str) -> None:
        """Paste as a terminal does, in bracketed-paste mode where the program asked for it."""
        self._run("set-buffer", "--", text)
        self._run("paste-buffer", "-p", "-d", "-t", "t")

    def keys(self, *names: str) -> None:
        """Press keys by tmux's names: Enter, C-c, C-d, Up, Escape, ..."""
        self._run("send-keys", "-t", "t", *names)

    def screen(self, styles: bool = False) -> str:
        """Everything shown so far, scroll-back included, wrapped lines joined (with the
        escape sequences of text styles where `styles`)."""
        lines = self._run("capture-pane", "-p", "-J", *(["-e"] if styles else []),
                          "-S", "-", "-t", "t").splitlines()
        return "\n".join(line.rstrip() for line in lines).rstrip("\n")

    def wait_for(self, pattern: str, timeout: float = 300, after: int = 0) -> re.Match[str]:
        """Wait until `pattern` (a regex) shows on the screen past character `after`."""
        deadline = time.monotonic() + timeout
        while True:
            screen = self.screen()
            if m := re.compile(pattern, re.M).search(screen, after):
                return m
            if time.monotonic() > deadline:
                raise AssertionError(f"{pattern!r} not on the screen:\n{screen[after:]}")
            time.sleep(0.1)

    def wait_prompt(self, timeout: float = 300, after: int = -1) -> str:
        """Wait until the chat waits for input (its last line an empty prompt, past character
        `after`); the screen."""
        deadline = time.monotonic() + timeout
        while True:
            screen = self.screen()
            if (screen.endswith("\n>>>") or screen == ">>>") and screen.rfind(">>>") > after:
                return screen
            if time.monotonic() > deadline:
                raise AssertionError(f"no prompt on the screen:\n{screen}")
            time.sleep(0.1)

    def exited(self) -> bool:
        return self._run("display-message", "-p", "-t", "t", "#{pane_dead}").strip() == "1"

    def wait_exit(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not self.exited():
            if time.monotonic() > deadline:
                raise AssertionError(f"still running:\n{self.screen()}")
            time.sleep(0.1)

    def close(self) -> None:
        subprocess.run([*self._tmux, "kill-server"], capture_output=True, timeout=30)
