"""Where the store lives: --store PATH, `none`, or the user's data directory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from llmserve.config import Settings
from llmserve.store import store_path, user_data_dir


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    for name in list(os.environ):
        if name.upper().startswith("LLMSERVE_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)  # no .env
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_DATA_HOME", raising=False)


@pytest.mark.parametrize("choice", ["none", "None", " NONE "])
def test_none_turns_the_store_off(choice):
    assert store_path(Settings(store=choice)) is None


def test_an_explicit_path(tmp_path):
    assert store_path(Settings(store=str(tmp_path / "s.db"))) == tmp_path / "s.db"
    assert store_path(Settings(store="~/x/s.db")) == tmp_path / "home" / "x" / "s.db"


def test_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("LLMSERVE_STORE", str(tmp_path / "env.db"))
    assert store_path(Settings()) == tmp_path / "env.db"
    monkeypatch.setenv("LLMSERVE_STORE", "none")
    assert store_path(Settings()) is None


def test_default_under_xdg_data_home(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    assert store_path(Settings()) == tmp_path / "data" / "llmserve" / "store.sqlite3"
    assert store_path(Settings(store="")) == tmp_path / "data" / "llmserve" / "store.sqlite3"


def test_default_without_xdg_data_home(monkeypatch, tmp_path):
    if os.name != "posix":
        pytest.skip("HOME decides the home directory on POSIX only")
    expected = tmp_path / "home" / ".local" / "share" / "llmserve" / "store.sqlite3"
    if os.uname().sysname == "Darwin":
        expected = tmp_path / "home" / "Library" / "Application Support" / "llmserve" / (
            "store.sqlite3")
    assert store_path(Settings()) == expected
    monkeypatch.setenv("XDG_DATA_HOME", "relative/dir")  # ignored, as the XDG spec says
    assert store_path(Settings()) == expected


def test_user_data_dir_per_platform(tmp_path):
    home = Path.home()
    assert user_data_dir({}, "linux") == home / ".local" / "share"
    assert user_data_dir({"XDG_DATA_HOME": "/x/data"}, "linux") == Path("/x/data")
    assert user_data_dir({}, "darwin") == home / "Library" / "Application Support"
    assert user_data_dir({"XDG_DATA_HOME": "/x/data"}, "darwin") == Path("/x/data")
    assert user_data_dir({"LOCALAPPDATA": r"C:\Users\u\AppData\Local"}, "win32") == Path(
        r"C:\Users\u\AppData\Local")
    assert user_data_dir({"XDG_DATA_HOME": "/x/data"}, "win32") == home / "AppData" / "Local"
