"""`llmserve chat` wired up: find (or start) the server, detect llmserve, then chat
interactively or answer piped input once."""

from __future__ import annotations

import signal
import sys

import httpx

from llmserve.client.api import ApiClient, ApiError
from llmserve.client.local_server import LocalServer, listening
from llmserve.client.terminal import ChatOptions, run_interactive, run_piped, state_dir


def run(options: ChatOptions, base_url_given: bool) -> int:
    server: LocalServer | None = None
    if not base_url_given and not listening(options.base_url):
        server = LocalServer(state_dir() / "chat-server.log")
        print(f"No server at {options.base_url}: starting one on the bundled model "
              f"(log: {server.log_path}) ...", file=sys.stderr)
        _exit_on_hangup()
        try:
            server.start()
        except RuntimeError as exc:
            print(f"llmserve chat: {exc}", file=sys.stderr)
            return 1
        except (KeyboardInterrupt, SystemExit):
            server.stop()
            return 130
        options.base_url = server.base_url
    api = ApiClient(options.base_url, options.api_key)
    try:
        api.detect_llmserve()
        if sys.stdin.isatty():
            return run_interactive(api, options)
        return run_piped(api, options, sys.stdin, sys.stdout)
    except KeyboardInterrupt:
        return 130
    except (ApiError, httpx.HTTPError) as exc:
        print(f"llmserve chat: {exc}", file=sys.stderr)
        if isinstance(exc, httpx.ConnectError):
            print(f"Is a server running at {options.base_url}? Start one with "
                  "`llmserve serve`, or pass --base-url.", file=sys.stderr)
        return 1
    finally:
        api.close()
        if server is not None:
            server.stop()



def _exit_on_hangup() -> None:
    """A closed terminal (SIGHUP) or a kill (SIGTERM) ends the chat through its `finally`,
    so the server it started stops too instead of running on alone."""
    for sig in (signal.SIGHUP, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: sys.exit(128 + signum))
