"""The model list: --model (once, repeated, NAME=PATH), --models-dir, --models-file."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmserve.config import Settings
from llmserve.errors import ModelListError
from llmserve.models.entries import (
    ModelEntry,
    model_entries,
    parse_model_flag,
    read_models_file,
    scan_models_dir,
)
from llmserve.models import bundled_model_path

GGUF = bundled_model_path()


def entries(tmp_path: Path, embedding: bool = False, **flags) -> list[ModelEntry]:
    return model_entries(Settings(**flags), chat_default=GGUF,
                         embedding_default=("emb", tmp_path) if embedding else None)


def test_one_model_default_is_the_bundled_one_loaded_at_start(tmp_path):
    [chat, emb] = entries(tmp_path, embedding=True)
    assert chat == ModelEntry(("smollm2-135m-instruct",), GGUF, load_at_start=True)
    assert (emb.name, emb.kind, emb.load_at_start) == ("emb", "embedding", True)


def test_rerank_model_joins_the_list(tmp_path):
    got = model_entries(Settings(), chat_default=GGUF, embedding_default=("emb", tmp_path),
                        rerank_default=("ce", tmp_path))
    assert [(e.name, e.kind, e.load_at_start) for e in got] == [
        ("smollm2-135m-instruct", "chat", True), ("emb", "embedding", True),
        ("ce", "rerank", True)]


def test_one_model_flags_unchanged(tmp_path):
    [chat] = entries(tmp_path, model=str(GGUF), served_model_name="foo")
    assert (chat.names, chat.path, chat.load_at_start) == (("foo",), GGUF, True)


def test_model_flag_name_and_path(tmp_path):
    assert parse_model_flag(f"smol={GGUF}") == ModelEntry(("smol",), GGUF)
    assert parse_model_flag(str(GGUF)).names == ("smollm2-135m-instruct",)
    # a path with "=" in it that exists is a path
    odd = tmp_path / "a=b.gguf"
    odd.write_bytes(b"")
    assert parse_model_flag(str(odd)).path == odd


def test_repeated_models_load_on_demand(tmp_path):
    got = entries(tmp_path, embedding=True, models=[f"a={GGUF}", f"b={GGUF}"])
    assert [(e.name, e.kind, e.load_at_start) for e in got] == [
        ("a", "chat", False), ("b", "chat", False), ("emb", "embedding", False)]


def test_models_dir_names_files_and_folders(tmp_path):
    (tmp_path / "Qwen2-0.5B-Instruct.Q4_K_M.gguf").write_bytes(b"GGUF")
    (tmp_path / "notes.txt").write_text("not a model")
    hf = tmp_path / "Tiny-Chat"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    st = tmp_path / "MiniLM"
    st.mkdir()
    (st / "config.json").write_text("{}")
    (st / "modules.json").write_text("[]")
    ce = tmp_path / "Tiny-Reranker"
    ce.mkdir()
    (ce / "config.json").write_text('{"architectures": ["BertForSequenceClassification"]}')
    (tmp_path / "empty-dir").mkdir()
    got = scan_models_dir(tmp_path)
    assert [(e.name, e.kind) for e in got] == [
        ("minilm", "embedding"), ("qwen2-0.5b-instruct", "chat"), ("tiny-chat", "chat"),
        ("tiny-reranker", "rerank")]


def test_collisions_are_an_error_at_start(tmp_path):
    (tmp_path / "smollm2-135m-instruct.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelListError, match="two models are named 'smollm2-135m-instruct'"):
        entries(tmp_path, models=[str(GGUF)], models_dir=str(tmp_path))
    with pytest.raises(ModelListError, match="two models are named 'x'"):
        entries(tmp_path, models=[f"x={GGUF}", f"x={GGUF}"])


def test_missing_path_is_an_error_at_start(tmp_path):
    with pytest.raises(ModelListError, match="not found.*nope.gguf"):
        entries(tmp_path, models=[f"x={tmp_path / 'nope.gguf'}"])


def test_served_model_name_needs_the_one_model_case(tmp_path):
    with pytest.raises(ModelListError, match="--served-model-name"):
        entries(tmp_path, models=[f"x={GGUF}"], served_model_name="y")


def test_models_file(tmp_path):
    (tmp_path / "t.jinja").write_text("{{ messages }}")
    file = tmp_path / "models.toml"
    file.write_text(f'''
[models.smol]
path = "{GGUF}"
aliases = ["smol-latest", "gpt-4o-mini"]
context_length = 1024
max_sequences = 4
threads = 1
chat_template = "t.jinja"
load_at_start = true

[models.embed]
path = "minilm"
kind = "embedding"
''')
    (tmp_path / "minilm").mkdir()
    smol, embed = read_models_file(file)
    assert smol.names == ("smol", "smol-latest", "gpt-4o-mini")
    assert (smol.context_length, smol.max_sequences, smol.threads) == (1024, 4, 1)
    assert smol.chat_template == str(tmp_path / "t.jinja") and smol.load_at_start
    assert (embed.path, embed.kind, embed.load_at_start) == (tmp_path / "minilm", "embedding",
                                                             False)
    # its own settings over the server's, validated as flags are
    own = smol.settings(Settings(context_length=2048, max_sequences=16, dtype="float32"))
    assert (own.context_length, own.max_sequences, own.dtype) == (1024, 4, "float32")


@pytest.mark.parametrize("body,message", [
    ('[models.x]\naliases = ["y"]', "`path` is missing"),
    ('[models.x]\npath = "a"\ncontext = 5', "unknown key `context`"),
    ('[models.x]\npath = "a"\nmax_sequences = "4"', "`max_sequences` must be a int"),
    ('[models.x]\npath = "a"\nkind = "vision"', "`kind` must be one of"),
    ('[model.x]\npath = "a"', "unknown top-level key"),
    ('[models.x\npath = "a"', "not TOML"),
])
def test_models_file_mistakes_are_named(tmp_path, body, message):
    file = tmp_path / "models.toml"
    file.write_text(body)
    with pytest.raises(ModelListError, match=message):
        read_models_file(file)


def test_a_bad_own_setting_fails_like_the_flag(tmp_path):
    entry = ModelEntry(("x",), GGUF, max_sequences=0)
    with pytest.raises(ValueError, match="max_sequences"):
        entry.settings(Settings())


def test_lora_flags_adapt_the_one_chat_model(tmp_path):
    chat, a, b = entries(tmp_path, loras=[f"a={tmp_path / 'a.gguf'}", "b=b.gguf"])
    assert (a.names, a.path, a.base, a.scale, a.kind) == (
        ("a",), tmp_path / "a.gguf", chat.name, 1.0, "chat")
    assert a.is_adapter and not chat.is_adapter and b.base == chat.name
    # several chat models: which one each adapts is said in a models file
    with pytest.raises(ModelListError, match="--lora adapts the one chat model"):
        entries(tmp_path, models=[f"x={GGUF}", f"y={GGUF}"], loras=["a=a.gguf"])
    with pytest.raises(ModelListError, match="NAME=PATH"):
        entries(tmp_path, loras=["a.gguf"])
    with pytest.raises(ModelListError, match="two models are named 'smollm2-135m-instruct'"):
        entries(tmp_path, loras=["smollm2-135m-instruct=a.gguf"])


def test_models_file_adapters(tmp_path):
    file = tmp_path / "models.toml"
    file.write_text(f'''
[models.smol]
path = "{GGUF}"
aliases = ["base"]

[models.pirate]
base = "base"
path = "pirate.gguf"
aliases = ["arr"]
scale = 0.5
''')
    smol, pirate = entries(tmp_path, models_file=str(file))
    assert (pirate.names, pirate.path, pirate.base, pirate.scale) == (
        ("pirate", "arr"), tmp_path / "pirate.gguf", "smol", 0.5)  # its base by id
    # a missing adapter file is its own requests' business (it fails when its base loads)
    assert not pirate.path.exists()


@pytest.mark.parametrize("body,message", [
    ('[models.p]\nbase = "nobody"\npath = "p.gguf"', "its base 'nobody' is not a chat model"),
    ('[models.p]\nbase = "smol"\npath = "p.gguf"\nthreads = 2', "takes only path, aliases, "
     "base, scale, not threads"),
    ('[models.p]\nbase = "smol"\npath = "p.gguf"\nscale = "x"', "`scale` must be a number"),
])
def test_models_file_adapter_mistakes_are_named(tmp_path, body, message):
    file = tmp_path / "models.toml"
    file.write_text(f'[models.smol]\npath = "{GGUF}"\n\n{body}')
    with pytest.raises(ModelListError, match=message):
        entries(tmp_path, models_file=str(file))
