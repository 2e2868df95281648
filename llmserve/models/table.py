"""`llmserve models`: a running server's models as a table, from its GET /v1/models/status
(a client of the public API like any other). With no server at the default address, the
bundled model's name and path, as before there were several models."""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
_COLUMNS = ("MODEL", "KIND", "STATE", "MEMORY", "SLOTS", "LOADS", "NOTE")


def fetch_status(base_url: str, api_key: str | None, timeout: float = 10) -> list[dict]:
    url = base_url.rstrip("/").removesuffix("/v1") + "/v1/models/status"
    request = urllib.request.Request(url)
    if api_key:
        request.add_header("Authorization", f"Bearer {api_key}")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())["data"]


def format_table(rows: list[dict]) -> str:
    cells = [_COLUMNS] + [(
        r["id"], r["kind"], r["state"],
        f"{r['memory_bytes'] / 2**20:.0f} MiB" if r.get("memory_bytes") else "-",
        f"{r['slots_in_use']}/{r['slots']}" if r.get("slots") else "-",
        str(r["loads"]),
        r["reason"] if r.get("reason") else
        ("aliases: " + ", ".join(r["aliases"]) if r.get("aliases") else ""),
    ) for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(_COLUMNS))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
                     for row in cells)


def print_models(base_url: str | None, api_key: str | None) -> int:
    api_key = api_key or os.environ.get("LLMSERVE_API_KEY")
    try:
        rows = fetch_status(base_url or DEFAULT_BASE_URL, api_key)
    except urllib.error.HTTPError as exc:
        print(f"llmserve models: {exc.code} from the server: {exc.read().decode()[:300]}",
              file=sys.stderr)
        return 1
    except (urllib.error.URLError, OSError) as exc:
        if base_url is not None:
            print(f"llmserve models: no server at {base_url}: {exc}", file=sys.stderr)
            return 1
        return _print_bundled()
    print(format_table(rows))
    return 0


def _print_bundled() -> int:
    from llmserve.models import bundled_model_path, served_name_for

    print(f"no server at {DEFAULT_BASE_URL} (--base-url): the bundled model", file=sys.stderr)
    path = bundled_model_path()
    print(f"{served_name_for(path)}\t{path}")
    return 0
