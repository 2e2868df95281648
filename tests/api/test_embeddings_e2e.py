"""/v1/embeddings on the bundled all-MiniLM-L6-v2, through the official client and raw HTTP."""

from __future__ import annotations

import base64
import concurrent.futures

import numpy as np
import openai
import pytest
from openai_schema import validate

EMBED = "all-minilm-l6-v2"
CHAT = "smollm2-135m-instruct"


def embed(http, **body) -> dict:
    r = http.post("/v1/embeddings", json={"model": EMBED, **body})
    assert r.status_code == 200, r.text
    data = r.json()
    if body.get("encoding_format") == "base64":
        # The spec types `embedding` as floats only; base64 is the same body with each
        # vector as a base64 string of little-endian float32s. Check the rest as floats.
        as_floats = {**data, "data": [
            {**d, "embedding": np.frombuffer(base64.b64decode(d["embedding"]), "<f4").tolist()}
            for d in data["data"]
        ]}
        validate("CreateEmbeddingResponse", as_floats)
    else:
        validate("CreateEmbeddingResponse", data)
    return data


def error(http, status: int, **body) -> dict:
    r = http.post("/v1/embeddings", json=body)
    assert r.status_code == status, r.text
    data = r.json()
    validate("ErrorResponse", data)
    return data["error"]


def cos(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_official_client_and_meaning(client):
    r = client.embeddings.create(
        model=EMBED,
        input=["The cat sits on the mat.", "A cat is sitting on a mat.", "Stock prices fell sharply."],
    )
    vecs = [d.embedding for d in r.data]
    assert [d.index for d in r.data] == [0, 1, 2]
    assert all(len(v) == 384 for v in vecs)
    assert cos(vecs[0], vecs[1]) > cos(vecs[0], vecs[2]) + 0.3
    assert r.usage.prompt_tokens == r.usage.total_tokens > 0
    assert r.model == EMBED


def test_base64_decodes_to_the_same_floats(http):
    floats = embed(http, input="hello world")["data"][0]["embedding"]
    b64 = embed(http, input="hello world", encoding_format="base64")["data"][0]["embedding"]
    decoded = np.frombuffer(base64.b64decode(b64), dtype="<f4")
    np.testing.assert_array_equal(decoded, np.asarray(floats, dtype=np.float32))


def test_official_client_base64_default_path(client):
    # The openai client asks for base64 by default and decodes it itself.
    r = client.embeddings.create(model=EMBED, input="hello world")
    assert len(r.data[0].embedding) == 384


def test_token_id_inputs_equal_text_inputs(http):
    text = embed(http, input="hello world")
    tokens = text["usage"]["prompt_tokens"]
    # all-MiniLM's WordPiece ids for [CLS] hello world [SEP]
    ids = [101, 7592, 2088, 102]
    assert tokens == len(ids)
    one = embed(http, input=ids)
    many = embed(http, input=[ids, ids])
    np.testing.assert_allclose(one["data"][0]["embedding"], text["data"][0]["embedding"], atol=1e-5)
    assert len(many["data"]) == 2 and many["usage"]["prompt_tokens"] == 2 * len(ids)


def test_concurrent_requests_batched_give_the_same_vectors(http):
    texts = [f"sentence number {i} about {w}" for i, w in enumerate(
        ["apples", "rivers", "engines", "music", "snow", "cities", "birds", "code"])]
    alone = [embed(http, input=t)["data"][0]["embedding"] for t in texts]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda t: embed(http, input=t)["data"][0]["embedding"], texts))
    for a, b in zip(alone, together, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("value", ["", [], [""], [[]]])
def test_empty_input_is_400(http, value):
    err = error(http, 400, model=EMBED, input=value)
    assert err["param"] == "input" and err["type"] == "invalid_request_error"


def test_over_long_input_is_400_with_numbers(http):
    err = error(http, 400, model=EMBED, input="word " * 600)
    assert err["code"] == "context_length_exceeded"
    assert "256" in err["message"]


def test_token_id_outside_vocabulary_is_400(http):
    err = error(http, 400, model=EMBED, input=[101, 10_000_000, 102])
    assert err["param"] == "input"


def test_dimensions_other_than_the_models_is_refused(http):
    assert len(embed(http, input="x", dimensions=384)["data"][0]["embedding"]) == 384
    err = error(http, 400, model=EMBED, input="x", dimensions=128)
    assert err["param"] == "dimensions"


def test_models_route_by_kind(http, client):
    ids = {m.id for m in client.models.list().data}
    assert {EMBED, CHAT} <= ids
    assert client.models.retrieve(EMBED).id == EMBED
    assert "embeddings" in error(http, 400, model=CHAT, input="x")["message"]
    with pytest.raises(openai.BadRequestError, match="embedding model"):
        client.chat.completions.create(model=EMBED, messages=[{"role": "user", "content": "hi"}])
    err = error(http, 404, model="nope", input="x")
    assert err["code"] == "model_not_found"


def test_embedding_model_none_serves_chat_only(tmp_path):
    import httpx
    from conftest import run_server

    with run_server(tmp_path, "--embedding-model", "none", api_key=None) as s:
        ids = [m["id"] for m in httpx.get(s.base_url + "/models").json()["data"]]
        assert ids == [CHAT]
        r = httpx.post(s.base_url + "/embeddings", json={"model": EMBED, "input": "x"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_missing_embedding_model_directory_is_a_clear_startup_error(tmp_path):
    import subprocess
    import sys

    missing = tmp_path / "no-such-model"
    proc = subprocess.run(
        [sys.executable, "-m", "llmserve.cli", "serve", "--embedding-model", str(missing),
         "--port", "1"], capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode != 0
    assert str(missing) in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
