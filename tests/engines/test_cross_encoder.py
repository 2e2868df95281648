"""CrossEncoderModel and PairTokenizer on a tiny cross-encoder built here: the scores are
sentence-transformers' own CrossEncoder.predict's, batched and padded or not."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("sentence_transformers")

from tiny_cross_encoder import MAX_POSITIONS, build_cross_encoder  # noqa: E402

from llmserve.engines.cross_encoder import (  # noqa: E402
    CrossEncoderModel,
    PairTokenizer,
    check_cross_encoder,
)
from llmserve.models import bundled_embedding_path  # noqa: E402

QUERY = "what do cats eat"
DOCUMENTS = ["cats eat fish and mice", "the stock market fell", "a cat", "dogs bark at night",
             "cats " * 20]


@pytest.fixture(scope="module")
def directory(tmp_path_factory):
    return build_cross_encoder(tmp_path_factory.mktemp("cross-encoder"))


def test_scores_equal_crossencoder_predict(directory):
    from sentence_transformers import CrossEncoder

    expected = CrossEncoder(str(directory), local_files_only=True).predict(
        [(QUERY, d) for d in DOCUMENTS])
    model, tokenizer = CrossEncoderModel(directory), PairTokenizer(directory)
    pairs = [tokenizer.tokenize_pair(QUERY, d) for d in DOCUMENTS]
    together = model.run(pairs)  # padded to the longest
    alone = [model.run([p])[0] for p in pairs]
    np.testing.assert_allclose(together, expected, atol=1e-5)
    np.testing.assert_allclose(alone, expected, atol=1e-5)
    assert np.ptp(expected) > 0.1  # a model whose scores tell documents apart


def test_pairs_are_tokenized_as_bert_reads_them(directory):
    pair = PairTokenizer(directory).tokenize_pair("hello", "world")
    # [CLS] hello [SEP] world [SEP], the second segment marked 1
    assert pair.ids == [101, 7592, 102, 2088, 102]
    assert pair.types == [0, 0, 0, 1, 1]


def test_facts_give_the_models_limit(directory):
    assert CrossEncoderModel(directory).facts() == {"max_input_tokens": MAX_POSITIONS}


def test_an_embedding_model_is_not_taken_for_a_cross_encoder(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a cross-encoder"):
        check_cross_encoder(bundled_embedding_path())
    with pytest.raises(FileNotFoundError, match="config.json"):
        check_cross_encoder(tmp_path)
