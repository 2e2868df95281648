"""End-to-end: GET /v1/models, GET /v1/models/{id}, GET /health."""

from __future__ import annotations

import time
import urllib.parse

import httpx
import openai
from conftest import MODEL
from openai_schema import validate

EMBEDDING_MODEL = "all-minilm-l6-v2"  # bundled with the hf extra, which make test installs


def test_list_models_raw(http):
    r = http.get("/v1/models")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    validate("ListModelsResponse", body)
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == [MODEL, EMBEDDING_MODEL]  # generative first
    for m in body["data"]:
        validate("Model", m)
        assert m["object"] == "model"
        assert isinstance(m["created"], int) and 0 < m["created"] <= time.time() + 5
        assert isinstance(m["owned_by"], str) and m["owned_by"]


def test_retrieve_model_raw(http):
    r = http.get(f"/v1/models/{MODEL}")
    assert r.status_code == 200
    body = r.json()
    validate("Model", body)
    assert body["id"] == MODEL and body["object"] == "model"
    # The same card as in the list.
    listed = http.get("/v1/models").json()["data"][0]
    assert body == listed


def test_retrieve_model_url_encoded(http):
    r = http.get("/v1/models/" + urllib.parse.quote(MODEL, safe=""))
    assert r.status_code == 200
    assert r.json()["id"] == MODEL


def test_list_models_openai_client(client: openai.OpenAI):
    page = client.models.list()
    ids = [m.id for m in page]
    assert ids == [MODEL, EMBEDDING_MODEL]
    raw = client.models.with_raw_response.list()
    validate("ListModelsResponse", raw.http_response.json())


def test_retrieve_model_openai_client(client: openai.OpenAI):
    m = client.models.retrieve(MODEL)
    assert m.id == MODEL and m.object == "model"
    assert m.owned_by
    raw = client.models.with_raw_response.retrieve(MODEL)
    validate("Model", raw.http_response.json())


def test_listed_models_are_usable(client: openai.OpenAI):
    chat, embedding = list(client.models.list())
    r = client.completions.create(model=chat.id, prompt="Hi", max_tokens=1)
    assert r.model == chat.id
    e = client.embeddings.create(model=embedding.id, input="Hi")
    assert e.model == embedding.id


def test_unknown_model_retrieve(http):
    r = http.get("/v1/models/not-a-model")
    assert r.status_code == 404
    body = r.json()
    validate("ErrorResponse", body)
    assert body["error"]["code"] == "model_not_found"


def test_health(server, http):
    with httpx.Client(base_url=server.url) as anonymous:
        answers = [http.get("/health"), anonymous.get("/health")]  # with and without a key
    for r in answers:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("application/json")
        body = r.json()
        assert body["status"] == "ok"
        assert MODEL in body["models"]
