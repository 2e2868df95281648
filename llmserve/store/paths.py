"""Where the store lives: --store PATH, `none`, or a file in the user's data directory."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path

from llmserve.config import Settings

FILENAME = "store.sqlite3"


def store_path(settings: Settings) -> Path | None:
    """The store file, or None when storing is off (`--store none`)."""
    choice = (settings.store or "").strip()
    if choice.lower() == "none":
        return None
    if choice:
        return Path(choice).expanduser()
    return user_data_dir() / "llmserve" / FILENAME


def user_data_dir(
    environ: Mapping[str, str] = os.environ, platform: str = sys.platform
) -> Path:
    """The per-user data directory: $XDG_DATA_HOME when set (an absolute path, as the XDG
    spec asks), else the platform's usual place. Small enough not to need platformdirs."""
    if platform == "win32":
        local = environ.get("LOCALAPPDATA")
        return Path(local) if local else Path.home() / "AppData" / "Local"
    xdg = environ.get("XDG_DATA_HOME", "")
    if xdg and os.path.isabs(xdg):
        return Path(xdg)
    if platform == "darwin":
        return Path.home() / "Library" / "Application Support"
    return Path.home() / ".local" / "share"
