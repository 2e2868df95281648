"""/v1/rerank and /v1/score through a real server: the bundled MiniLM (cosine similarity)
and a tiny cross-encoder built by the test (--rerank-model), whose answers must equal
sentence-transformers' own on the same model directories."""

from __future__ import annotations

import subprocess
import sys

import httpx
import numpy as np
import pytest
from openai_schema import validate

pytest.importorskip("sentence_transformers")

from conftest import MODEL as CHAT  # noqa: E402
from conftest import run_server  # noqa: E402
from tiny_cross_encoder import MAX_POSITIONS, build_cross_encoder  # noqa: E402

EMBED = "all-minilm-l6-v2"
RERANK = "tiny-reranker"
QUERY = "What do cats like to eat?"
DOCUMENTS = [
    "The stock market fell sharply on Monday.",
    "Cats usually eat fish, chicken and mice.",
    "A kitten is a young cat.",
    "Paris is the capital of France.",
    "Dogs and cats are popular pets.",
]


@pytest.fixture(scope="module")
def reranker_dir(tmp_path_factory):
    return build_cross_encoder(tmp_path_factory.mktemp("models") / RERANK)


@pytest.fixture(scope="module")
def srv(tmp_path_factory, reranker_dir):
    with run_server(tmp_path_factory.mktemp("scores"), "--rerank-model", str(reranker_dir),
                    "--store", "none") as s:
        yield s


@pytest.fixture(scope="module")
def http(srv):
    with httpx.Client(base_url=srv.url, headers=srv.headers(), timeout=120) as c:
        yield c


def ok(http, path: str, **body) -> dict:
    r = http.post(path, json=body)
    assert r.status_code == 200, r.text
    return r.json()


def error(http, path: str, status: int, **body) -> dict:
    r = http.post(path, json=body)
    assert r.status_code == status, r.text
    validate("ErrorResponse", r.json())
    return r.json()["error"]


def check_rerank_shape(data: dict, model: str, n: int, with_documents: bool = True) -> None:
    assert set(data) == {"id", "model", "usage", "results"}
    assert data["id"].startswith("rerank-") and data["model"] == model
    assert set(data["usage"]) == {"total_tokens"} and data["usage"]["total_tokens"] > 0
    assert len(data["results"]) == n
    for r in data["results"]:
        keys = {"index", "relevance_score"} | ({"document"} if with_documents else set())
        assert set(r) == keys
    scores = [r["relevance_score"] for r in data["results"]]
    assert scores == sorted(scores, reverse=True)


def check_score_shape(data: dict, model: str, n: int) -> None:
    assert set(data) == {"id", "object", "created", "model", "data", "usage"}
    assert data["object"] == "list" and data["model"] == model and data["id"].startswith("score-")
    assert isinstance(data["created"], int)
    assert [d["index"] for d in data["data"]] == list(range(n))
    assert all(d["object"] == "score" and isinstance(d["score"], float) for d in data["data"])
    usage = data["usage"]
    assert usage["prompt_tokens"] == usage["total_tokens"] > 0 and usage["completion_tokens"] == 0


# -- scores equal the models' own libraries' ---------------------------------------------------

def test_rerank_with_minilm_orders_as_sentence_transformers_cosine(http):
    from sentence_transformers import SentenceTransformer, util

    from llmserve.models import bundled_embedding_path

    st = SentenceTransformer(str(bundled_embedding_path()), local_files_only=True)
    expected = util.cos_sim(st.encode([QUERY]), st.encode(DOCUMENTS))[0].numpy()
    data = ok(http, "/v1/rerank", model=EMBED, query=QUERY, documents=DOCUMENTS)
    check_rerank_shape(data, EMBED, len(DOCUMENTS))
    assert [r["index"] for r in data["results"]] == list(np.argsort(-expected, kind="stable"))
    for r in data["results"]:
        assert r["relevance_score"] == pytest.approx(float(expected[r["index"]]), abs=1e-5)
        assert r["document"] == {"text": DOCUMENTS[r["index"]]}
    assert data["results"][0]["index"] == 1  # the cat food one, as meaning says


def test_rerank_with_cross_encoder_equals_crossencoder_predict(http, reranker_dir):
    from sentence_transformers import CrossEncoder

    expected = CrossEncoder(str(reranker_dir), local_files_only=True).predict(
        [(QUERY, d) for d in DOCUMENTS])
    data = ok(http, "/v1/rerank", model=RERANK, query=QUERY, documents=DOCUMENTS)
    check_rerank_shape(data, RERANK, len(DOCUMENTS))
    assert [r["index"] for r in data["results"]] == list(np.argsort(-expected, kind="stable"))
    np.testing.assert_allclose([r["relevance_score"] for r in data["results"]],
                               np.sort(expected)[::-1], atol=1e-5)


def test_score_with_cross_encoder_equals_predict_in_every_pairing(http, reranker_dir):
    from sentence_transformers import CrossEncoder

    ce = CrossEncoder(str(reranker_dir), local_files_only=True)
    a, b = DOCUMENTS[:2], DOCUMENTS[2:4]
    for text_1, text_2, pairs in [
        (QUERY, DOCUMENTS[0], [(QUERY, DOCUMENTS[0])]),                 # 1:1
        ([QUERY], DOCUMENTS, [(QUERY, d) for d in DOCUMENTS]),          # 1:N
        (a, b, list(zip(a, b, strict=True))),                           # N:N
    ]:
        data = ok(http, "/v1/score", model=RERANK, text_1=text_1, text_2=text_2)
        check_score_shape(data, RERANK, len(pairs))
        np.testing.assert_allclose([d["score"] for d in data["data"]], ce.predict(pairs),
                                   atol=1e-5)


def test_score_with_minilm_is_cosine_in_every_pairing(http):
    from sentence_transformers import SentenceTransformer

    from llmserve.models import bundled_embedding_path

    st = SentenceTransformer(str(bundled_embedding_path()), local_files_only=True)

    def cos(x, y):
        u, v = st.encode([x, y])
        return float(u @ v / np.linalg.norm(u) / np.linalg.norm(v))

    data = ok(http, "/score", model=EMBED, text_1=QUERY, text_2=DOCUMENTS)
    check_score_shape(data, EMBED, len(DOCUMENTS))
    for d in data["data"]:
        assert d["score"] == pytest.approx(cos(QUERY, DOCUMENTS[d["index"]]), abs=1e-5)
    data = ok(http, "/v1/score", model=EMBED, text_1=DOCUMENTS[:2], text_2=DOCUMENTS[2:4])
    assert [d["score"] for d in data["data"]] == pytest.approx(
        [cos(DOCUMENTS[0], DOCUMENTS[2]), cos(DOCUMENTS[1], DOCUMENTS[3])], abs=1e-5)


# -- the request's options and paths ----------------------------------------------------------

@pytest.mark.parametrize("path", ["/v1/rerank", "/rerank", "/v2/rerank"])
def test_rerank_paths_answer_alike(http, path):
    data = ok(http, path, model=RERANK, query=QUERY, documents=DOCUMENTS)
    reference = ok(http, "/v1/rerank", model=RERANK, query=QUERY, documents=DOCUMENTS)
    assert data["results"] == reference["results"]


def test_top_n_and_return_documents(http):
    full = ok(http, "/v1/rerank", model=EMBED, query=QUERY, documents=DOCUMENTS)
    top = ok(http, "/v1/rerank", model=EMBED, query=QUERY, documents=DOCUMENTS, top_n=2,
             return_documents=False)
    check_rerank_shape(top, EMBED, 2, with_documents=False)
    assert [r["index"] for r in top["results"]] == [r["index"] for r in full["results"][:2]]
    everything = ok(http, "/v1/rerank", model=EMBED, query=QUERY, documents=DOCUMENTS, top_n=0)
    assert len(everything["results"]) == len(DOCUMENTS)
    more = ok(http, "/v1/rerank", model=EMBED, query=QUERY, documents=DOCUMENTS, top_n=99)
    assert len(more["results"]) == len(DOCUMENTS)


def test_documents_as_cohere_text_objects(http):
    strings = ok(http, "/v1/rerank", model=RERANK, query=QUERY, documents=DOCUMENTS)
    objects = ok(http, "/v1/rerank", model=RERANK, query=QUERY,
                 documents=[{"text": d} for d in DOCUMENTS])
    assert objects["results"] == strings["results"]


def test_usage_counts_the_tokens_read(http, reranker_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(reranker_dir), local_files_only=True)
    data = ok(http, "/v1/rerank", model=RERANK, query=QUERY, documents=DOCUMENTS[:2])
    assert data["usage"]["total_tokens"] == sum(len(tok(QUERY, d)["input_ids"])
                                                for d in DOCUMENTS[:2])
    data = ok(http, "/v1/rerank", model=EMBED, query=QUERY, documents=DOCUMENTS[:2])
    assert data["usage"]["total_tokens"] == sum(len(tok(t)["input_ids"])
                                                for t in [QUERY, *DOCUMENTS[:2]])


# -- errors ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("body", "param"), [
    ({"query": "", "documents": ["a"]}, "query"),
    ({"query": "q", "documents": ["a", ""]}, "documents"),
    ({"query": "q", "documents": []}, "documents"),
    ({"query": "q", "documents": ["a"], "top_n": -1}, "top_n"),
    ({"documents": ["a"]}, "query"),
    ({"query": "q", "documents": ["a"], "truncate_prompt_tokens": 8}, "truncate_prompt_tokens"),
    ({"query": "q", "documents": ["a"], "rank_fields": ["x"]}, "rank_fields"),
])
@pytest.mark.parametrize("model", [EMBED, RERANK])
def test_bad_rerank_requests_are_400(http, model, body, param):
    err = error(http, "/v1/rerank", 400, model=model, **body)
    assert err["param"] == param and err["type"] == "invalid_request_error"


@pytest.mark.parametrize(("body", "param"), [
    ({"text_1": ["a", "b"], "text_2": ["c", "d", "e"]}, "text_1"),
    ({"text_1": [], "text_2": ["c"]}, "text_1"),
    ({"text_1": "a", "text_2": []}, "text_2"),
    ({"text_1": "a", "text_2": ""}, "text_2"),
])
def test_bad_score_requests_are_400(http, body, param):
    err = error(http, "/v1/score", 400, model=RERANK, **body)
    assert err["param"] == param


def test_model_is_required(http):
    err = error(http, "/v1/rerank", 400, query="q", documents=["a"])
    assert err["param"] == "model"


def test_over_long_inputs_are_400_context_length_exceeded(http):
    err = error(http, "/v1/rerank", 400, model=RERANK, query=QUERY,
                documents=["short", "cat " * MAX_POSITIONS])
    assert err["code"] == "context_length_exceeded" and err["param"] == "documents"
    assert str(MAX_POSITIONS) in err["message"]
    err = error(http, "/v1/score", 400, model=EMBED, text_1="word " * 600, text_2="x")
    assert err["code"] == "context_length_exceeded" and err["param"] == "text_1"
    assert "256" in err["message"]


def test_models_by_kind(http):
    ids = [m["id"] for m in http.get("/v1/models").json()["data"]]
    assert ids == [CHAT, EMBED, RERANK]
    err = error(http, "/v1/rerank", 400, model=CHAT, query="q", documents=["a"])
    assert "chat model" in err["message"] and "/v1/chat/completions" in err["message"]
    err = error(http, "/v1/score", 404, model="nope", text_1="a", text_2="b")
    assert err["code"] == "model_not_found"
    err = error(http, "/v1/chat/completions", 400, model=RERANK,
                messages=[{"role": "user", "content": "hi"}])
    assert "/v1/rerank" in err["message"]
    err = error(http, "/v1/embeddings", 400, model=RERANK, input="x")
    assert err["param"] == "model"
    health = http.get("/health").json()
    assert health["engines"][RERANK]["state"] == "running"


@pytest.mark.parametrize("path", ["/v1/rerank", "/rerank", "/v2/rerank", "/v1/score", "/score"])
def test_every_path_wants_the_key_and_json(srv, path):
    body = {"model": EMBED, "query": "q", "documents": ["a"], "text_1": "q", "text_2": "a"}
    r = httpx.post(srv.url + path, json=body, timeout=30)
    assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"
    r = httpx.post(srv.url + path, content=b"{}", timeout=30,
                   headers={**srv.headers(), "content-type": "text/plain"})
    assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type"


def test_an_embedding_model_as_rerank_model_is_a_clear_startup_error(tmp_path):
    from llmserve.models import bundled_embedding_path

    proc = subprocess.run(
        [sys.executable, "-m", "llmserve.cli", "serve", "--rerank-model",
         str(bundled_embedding_path()), "--port", "1"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert proc.returncode != 0
    assert "not a cross-encoder" in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_killed_reranker_process_is_503_then_restarted(srv, http):
    import os
    import signal
    import time

    before = ok(http, "/v1/rerank", model=RERANK, query=QUERY, documents=DOCUMENTS)
    pid = http.get("/health").json()["engines"][RERANK]["pid"]
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 60
    refused = False
    while time.monotonic() < deadline:
        r = http.post("/v1/rerank", json={"model": RERANK, "query": QUERY, "documents": DOCUMENTS})
        if r.status_code == 503:
            refused = True
            assert r.headers["Retry-After"] and r.json()["error"]["type"] == "server_error"
        elif r.status_code == 200 and http.get("/health").json()["engines"][RERANK]["pid"] != pid:
            break
        else:
            assert r.status_code in (200, 503), r.text
        time.sleep(0.05)
    else:
        pytest.fail(f"the reranker did not come back:\n{srv.log()}")
    assert refused or "crashed" in srv.log()
    assert r.json()["results"] == before["results"]
    health = http.get("/health").json()["engines"]
    assert health[RERANK]["restarts"] == 1 and health[EMBED]["restarts"] == 0
