"""serving/scores.py on the real models (the bundled MiniLM, a tiny cross-encoder built
here, both in this process): pairing rules, limits, scores equal to sentence-transformers'
own, and requests batched together in the model's bounded line."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

pytest.importorskip("sentence_transformers")

from tiny_cross_encoder import MAX_POSITIONS, build_cross_encoder  # noqa: E402

from llmserve.engines.cross_encoder import CrossEncoderModel, PairTokenizer  # noqa: E402
from llmserve.engines.sentence_embedder import SentenceEmbedder  # noqa: E402
from llmserve.errors import ContextLengthExceeded, InvalidRequest, ServerBusy  # noqa: E402
from llmserve.models import bundled_embedding_path  # noqa: E402
from llmserve.serving.embeddings import EmbeddingBatcher  # noqa: E402
from llmserve.serving.scores import (  # noqa: E402
    CrossEncoderScorer,
    EmbeddingScorer,
    Texts,
    cosine,
    ranked,
)

QUERY = "what do cats eat"
DOCUMENTS = ["cats eat fish and mice", "the stock market fell", "a cat", "dogs bark at night"]


class CrossEncoderHere:
    """The cross-encoder in this process, as CrossEncoderProcess offers it to the server:
    a tokenizer of its own, the model's limit, batches of pairs scored."""

    def __init__(self, directory) -> None:
        self.inner = CrossEncoderModel(directory)
        self.tokenizer = PairTokenizer(directory)
        self.max_input_tokens = self.inner.max_input_tokens
        self.batches: list[int] = []
        self.release = threading.Event()
        self.release.set()

    def tokenize_pair(self, query, document):
        return self.tokenizer.tokenize_pair(query, document)

    def score(self, pairs):
        self.batches.append(len(pairs))
        self.release.wait(30)
        return self.inner.score(pairs)


@pytest.fixture(scope="module")
def directory(tmp_path_factory):
    return build_cross_encoder(tmp_path_factory.mktemp("cross-encoder"))


@pytest.fixture(scope="module")
def embedder() -> SentenceEmbedder:
    return SentenceEmbedder(bundled_embedding_path())


# -- pairing and ranking ----------------------------------------------------------------------

def test_one_to_many_and_many_to_many():
    one = Texts(["q"], ["a", "b"])
    assert [one.query_of(i) for i in range(2)] == ["q", "q"]
    many = Texts(["q1", "q2"], ["a", "b"], ("text_1", "text_2"))
    assert [many.query_of(i) for i in range(2)] == ["q1", "q2"]


@pytest.mark.parametrize(("queries", "documents", "param"), [
    (["q1", "q2"], ["a", "b", "c"], "text_1"),  # N:M
    ([], ["a"], "text_1"),
    (["q"], [], "text_2"),
    ([""], ["a"], "text_1"),
    (["q"], ["a", ""], "text_2"),
])
def test_bad_pairings_are_400_naming_the_field(queries, documents, param):
    with pytest.raises(InvalidRequest) as err:
        Texts(queries, documents, ("text_1", "text_2"))
    assert err.value.status_code == 400 and err.value.param == param


def test_ranked_is_highest_first_ties_in_order_and_cut_at_top_n():
    scores = [0.1, 0.9, 0.5, 0.9]
    assert ranked(scores, None) == [1, 3, 2, 0]
    assert ranked(scores, 0) == [1, 3, 2, 0]
    assert ranked(scores, 2) == [1, 3]
    assert ranked(scores, 10) == [1, 3, 2, 0]


def test_cosine_pairs_rows_and_broadcasts_one_query():
    q = np.array([[1.0, 0.0]])
    d = np.array([[2.0, 0.0], [0.0, 3.0], [-1.0, 0.0]])
    np.testing.assert_allclose(cosine(q, d), [1.0, 0.0, -1.0])
    np.testing.assert_allclose(cosine(d, d), [1.0, 1.0, 1.0])


# -- embedding model: cosine similarity --------------------------------------------------------

def test_embedding_scores_equal_sentence_transformers_cosine(embedder):
    from sentence_transformers import SentenceTransformer, util

    st = SentenceTransformer(str(bundled_embedding_path()), local_files_only=True)
    expected = util.cos_sim(st.encode([QUERY]), st.encode(DOCUMENTS))[0].numpy()

    async def main():
        scorer = EmbeddingScorer("minilm", EmbeddingBatcher(embedder))
        job = scorer.prepare(Texts([QUERY], DOCUMENTS))
        return job, await scorer.score(job)

    job, scores = asyncio.run(main())
    np.testing.assert_allclose(scores, expected, atol=1e-5)
    assert job.tokens == sum(len(embedder.tokenize(t)) for t in [QUERY, *DOCUMENTS])


def test_embedding_text_over_the_limit_is_refused_with_numbers(embedder):
    scorer = EmbeddingScorer("minilm", EmbeddingBatcher(embedder))
    with pytest.raises(ContextLengthExceeded) as err:
        scorer.prepare(Texts([QUERY], ["fine", "word " * 600]))
    assert err.value.param == "documents" and "Text 1 of 'documents'" in err.value.message
    assert str(embedder.max_input_tokens) in err.value.message


# -- cross-encoder --------------------------------------------------------------------------

def test_cross_encoder_scores_equal_predict_and_requests_share_batches(directory):
    from sentence_transformers import CrossEncoder

    reference = CrossEncoder(str(directory), local_files_only=True)
    queries = [f"query {i}" for i in range(6)]
    expected = [reference.predict([(q, d) for d in DOCUMENTS]) for q in queries]

    async def main():
        model = CrossEncoderHere(directory)
        scorer = CrossEncoderScorer("tiny", model)
        jobs = [scorer.prepare(Texts([q], DOCUMENTS)) for q in queries]
        return model.batches, await asyncio.gather(*(scorer.score(j) for j in jobs))

    batches, results = asyncio.run(main())
    for got, want in zip(results, expected, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5)
    assert sum(batches) == len(queries) * len(DOCUMENTS)
    assert len(batches) < len(queries)  # requests arriving together were scored together


def test_cross_encoder_pair_over_the_limit_is_refused(directory):
    scorer = CrossEncoderScorer("tiny", CrossEncoderHere(directory))
    with pytest.raises(ContextLengthExceeded) as err:
        scorer.prepare(Texts([QUERY], ["fine", "cat " * MAX_POSITIONS]))
    assert err.value.param == "documents" and "Pair 1" in err.value.message
    assert f"at most {MAX_POSITIONS}" in err.value.message


def test_a_full_line_is_refused_at_once_and_the_others_are_served(directory):
    async def main():
        model = CrossEncoderHere(directory)
        model.release.clear()
        scorer = CrossEncoderScorer("tiny", model, max_queue=1)
        jobs = [scorer.prepare(Texts([f"q{i}"], DOCUMENTS)) for i in range(3)]
        try:
            first = asyncio.create_task(scorer.score(jobs[0]))
            while not model.batches:  # with the model, held there
                await asyncio.sleep(0.01)
            second = asyncio.create_task(scorer.score(jobs[1]))  # waits: the line holds 1
            await asyncio.sleep(0.05)
            assert scorer.waiting == 1
            with pytest.raises(ServerBusy) as refused:
                await scorer.score(jobs[2])
            assert refused.value.status_code == 429 and refused.value.headers["Retry-After"]
        finally:
            model.release.set()
        await first, await second
        return await scorer.score(jobs[2])  # the line is free again

    assert len(asyncio.run(main())) == len(DOCUMENTS)
