"""Settings precedence: init kwargs (CLI) > LLMSERVE_* environment > .env file > defaults."""

from __future__ import annotations

import os

import pydantic
import pytest

from llmserve.config import Settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    """No LLMSERVE_* variables from outside, and a working directory with no .env."""
    for name in list(os.environ):
        if name.upper().startswith("LLMSERVE_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write_env(path, **values):
    (path / ".env").write_text(
        "".join(f"LLMSERVE_{k.upper()}={v}\n" for k, v in values.items()), encoding="utf-8"
    )


def test_defaults():
    s = Settings()
    assert s.host == "127.0.0.1"
    assert s.port == 8000
    assert s.model is None
    assert s.served_model_name is None
    assert s.api_keys == []
    assert s.max_request_bytes == 32 * 1024 * 1024 == 33554432
    assert s.allowed_hosts == []
    assert s.cors_origins == []
    assert s.context_length is None
    assert s.max_sequences == 16
    assert s.max_queue == 256
    assert s.queue_timeout == 600.0
    assert s.playground is True
    assert s.log_level == "info"


def test_env_file_over_defaults(clean_env):
    write_env(clean_env, port=9001, host="0.0.0.0")
    s = Settings()
    assert s.port == 9001
    assert s.host == "0.0.0.0"


def test_environment_over_env_file(clean_env, monkeypatch):
    write_env(clean_env, port=9001, host="0.0.0.0")
    monkeypatch.setenv("LLMSERVE_PORT", "9002")
    s = Settings()
    assert s.port == 9002
    assert s.host == "0.0.0.0"  # only in .env


def test_init_kwargs_over_environment_and_env_file(clean_env, monkeypatch):
    write_env(clean_env, port=9001, max_queue=3)
    monkeypatch.setenv("LLMSERVE_PORT", "9002")
    monkeypatch.setenv("LLMSERVE_MAX_SEQUENCES", "4")
    s = Settings(port=9003)
    assert s.port == 9003
    assert s.max_sequences == 4  # from the environment
    assert s.max_queue == 3  # from .env


def test_env_prefix_is_required(monkeypatch):
    monkeypatch.setenv("PORT", "1234")
    assert Settings().port == 8000


def test_env_var_names_are_case_insensitive(monkeypatch):
    monkeypatch.setenv("llmserve_port", "9004")
    assert Settings().port == 9004


def test_unknown_env_entries_are_ignored(clean_env, monkeypatch):
    write_env(clean_env, no_such_setting="x")
    monkeypatch.setenv("LLMSERVE_ALSO_UNKNOWN", "y")
    assert Settings().port == 8000


def test_api_keys_from_environment_are_split(monkeypatch):
    monkeypatch.setenv("LLMSERVE_API_KEYS", "a, b,c")
    assert Settings().api_keys == ["a", "b", "c"]


def test_api_keys_from_env_file_are_split(clean_env):
    write_env(clean_env, api_keys="k1 ,k2")
    assert Settings().api_keys == ["k1", "k2"]


def test_api_keys_blank_entries_dropped(monkeypatch):
    monkeypatch.setenv("LLMSERVE_API_KEYS", " , a,, ")
    assert Settings().api_keys == ["a"]
    monkeypatch.setenv("LLMSERVE_API_KEYS", "")
    assert Settings().api_keys == []


def test_api_keys_as_list_kwarg():
    assert Settings(api_keys=["x", "y"]).api_keys == ["x", "y"]
    assert Settings(api_keys="x,y").api_keys == ["x", "y"]


def test_single_api_key_with_no_comma(monkeypatch):
    monkeypatch.setenv("LLMSERVE_API_KEYS", "sk-only")
    assert Settings().api_keys == ["sk-only"]


@pytest.mark.parametrize("name", ["allowed_hosts", "cors_origins"])
def test_host_and_origin_lists_from_environment_are_split(monkeypatch, name):
    monkeypatch.setenv(f"LLMSERVE_{name.upper()}", " a.example, http://b.example:8080 ,,")
    assert getattr(Settings(), name) == ["a.example", "http://b.example:8080"]
    monkeypatch.setenv(f"LLMSERVE_{name.upper()}", "")
    assert getattr(Settings(), name) == []


@pytest.mark.parametrize("name", ["allowed_hosts", "cors_origins"])
def test_host_and_origin_lists_from_env_file_and_kwargs(clean_env, name):
    write_env(clean_env, **{name: "x.example,y.example"})
    assert getattr(Settings(), name) == ["x.example", "y.example"]
    assert getattr(Settings(**{name: "*"}), name) == ["*"]  # a CLI flag's string
    assert getattr(Settings(**{name: ["z.example"]}), name) == ["z.example"]


def test_max_request_bytes_from_environment_and_flag(monkeypatch):
    monkeypatch.setenv("LLMSERVE_MAX_REQUEST_BYTES", "1000")
    assert Settings().max_request_bytes == 1000
    assert Settings(max_request_bytes=2048).max_request_bytes == 2048


@pytest.mark.parametrize("level", ["critical", "error", "warning", "info", "debug", "trace"])
def test_log_levels_accepted(level):
    assert Settings(log_level=level).log_level == level


def test_log_level_lowercased(monkeypatch):
    assert Settings(log_level="DEBUG").log_level == "debug"
    monkeypatch.setenv("LLMSERVE_LOG_LEVEL", "Warning")
    assert Settings().log_level == "warning"


@pytest.mark.parametrize("level", ["verbose", "", "information"])
def test_bad_log_level_rejected(level):
    with pytest.raises(pydantic.ValidationError, match="log level"):
        Settings(log_level=level)


def test_bad_log_level_from_environment_rejected(monkeypatch):
    monkeypatch.setenv("LLMSERVE_LOG_LEVEL", "loud")
    with pytest.raises(pydantic.ValidationError):
        Settings()


@pytest.mark.parametrize(
    "fields",
    [
        {"context_length": 15},
        {"max_sequences": 0},
        {"max_sequences": 257},
        {"threads": 0},
        {"batch_size": 31},
        {"prefill_chunk": 15},
        {"max_queue": -1},
        {"queue_timeout": 0},
        {"max_request_bytes": 0},
        {"max_request_bytes": "big"},
        {"port": "not-a-port"},
    ],
)
def test_range_violations_rejected(fields):
    with pytest.raises(pydantic.ValidationError):
        Settings(**fields)


def test_range_checked_for_environment_values_too(monkeypatch):
    monkeypatch.setenv("LLMSERVE_MAX_SEQUENCES", "0")
    with pytest.raises(pydantic.ValidationError):
        Settings()


def test_weight_repack_from_flag_env_and_dotenv(clean_env, monkeypatch):
    assert Settings().weight_repack == "auto"
    write_env(clean_env, weight_repack="on")
    assert Settings().weight_repack == "on"
    monkeypatch.setenv("LLMSERVE_WEIGHT_REPACK", "off")
    assert Settings().weight_repack == "off"
    assert Settings(weight_repack="auto").weight_repack == "auto"
    with pytest.raises(pydantic.ValidationError):
        Settings(weight_repack="sometimes")


def test_store_defaults_and_sources(clean_env, monkeypatch):
    s = Settings()
    assert s.store is None and s.store_ttl == 30 * 86400  # as OpenAI keeps responses
    write_env(clean_env, store="from-dotenv.db", store_ttl="7d")
    s = Settings()
    assert (s.store, s.store_ttl) == ("from-dotenv.db", 7 * 86400)
    monkeypatch.setenv("LLMSERVE_STORE", "none")
    monkeypatch.setenv("LLMSERVE_STORE_TTL", "90")
    s = Settings()
    assert (s.store, s.store_ttl) == ("none", 90)
    assert Settings(store="flag.db", store_ttl="1h").store == "flag.db"


@pytest.mark.parametrize("value,seconds", [
    ("3600", 3600), ("1.5", 1.5), (45, 45), ("30s", 30), ("15m", 900), ("12h", 43200),
    ("30d", 2592000), (" 2D ", 172800), ("none", None), ("", None), (None, None),
])
def test_store_ttl_durations(value, seconds):
    assert Settings(store_ttl=value).store_ttl == seconds


@pytest.mark.parametrize("value", ["soon", "0", "-1h", "h", "1w", "1.5.h"])
def test_bad_store_ttl_rejected(value):
    with pytest.raises(pydantic.ValidationError, match="store_ttl"):
        Settings(store_ttl=value)
