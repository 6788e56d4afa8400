"""GLaM's quality filter: hashed n-gram features, the logistic regression, the Pareto rule."""

import doctest

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_glam.data import quality
from keras_glam.data.sources import DocumentList

CURATED = [
    "The interpreter reads the source file and compiles it to byte code before running it.",
    "A class statement defines a new type whose instances share the methods of the class.",
    "Exceptions raised inside a with block are passed to the context manager's exit method.",
    "The standard library documents each module with examples of typical use.",
] * 15
JUNK = [
    "buy cheap pills now click here best price free free free win",
    "home | about | contact | login | cart | home | about | contact",
    "zxq vvk qqq lorem ipsum dolor amet amet amet casino bonus 777",
    "click here click here click here subscribe now limited offer",
] * 15


def _ragged_texts(n, seed):
    rng = np.random.default_rng(seed)
    return [f"text {seed} {i} {rng.integers(1 << 30)}" for i in range(n)]


def test_docstring_examples():
    results = doctest.testmod(quality, optionflags=doctest.ELLIPSIS)
    assert results.attempted > 0 and results.failed == 0


def test_features_match_a_numpy_reimplementation():
    features = quality.QualityFeatures(num_bins=512, ngram_widths=(1, 2), max_features=64)
    documents = ["The cat sat on the mat, the END.", "spam Spam SPAM spam", ""]
    sparse = features(tf.constant(documents))
    dense = tf.sparse.to_dense(tf.sparse.reorder(sparse), validate_indices=False).numpy()
    for row, document in enumerate(documents):
        words = document.lower().split()
        ngrams = words + [" ".join(pair) for pair in zip(words, words[1:])]
        expected = np.zeros(512)
        if ngrams:
            buckets = tf.strings.to_hash_bucket_fast(ngrams, 512).numpy()
            np.add.at(expected, buckets, 1.0)
            expected = np.log1p(expected)
            expected /= np.linalg.norm(expected)
        np.testing.assert_allclose(dense[row], expected, rtol=1e-6, atol=1e-7)
    assert int(tf.shape(sparse.values)[0]) == 3 * 64  # Fixed entries per row.


def test_features_keep_at_most_max_features_per_document():
    features = quality.QualityFeatures(num_bins=4096, ngram_widths=(1,), max_features=8)
    sparse = features(tf.constant([" ".join(f"w{i}" for i in range(100))]))
    assert int(tf.math.count_nonzero(sparse.values)) == 8


def test_keep_rule_matches_numpy_pareto():
    alpha = 9.0
    draws = quality.pareto_draws(tf.constant(_ragged_texts(40000, 0)), alpha, seed=0).numpy()
    reference = np.random.default_rng(0).pareto(alpha, size=40000)
    for score in (0.3, 0.7, 0.9, 0.97):
        kept = np.mean(draws > 1.0 - score)
        assert kept == pytest.approx(quality.keep_probability(score, alpha), abs=0.01)
        assert kept == pytest.approx(np.mean(reference > 1.0 - score), abs=0.012)
    for x in (0.05, 0.1, 0.3):  # Lomax survival function (1 + x) ** -alpha.
        assert np.mean(draws > x) == pytest.approx((1 + x) ** -alpha, abs=0.01)


def test_draws_depend_on_the_text_and_seed_only():
    texts = _ragged_texts(1000, 1)
    draws = quality.pareto_draws(tf.constant(texts), seed=5).numpy()
    order = np.random.default_rng(1).permutation(len(texts))
    again = quality.pareto_draws(tf.constant([texts[i] for i in order]), seed=5).numpy()
    np.testing.assert_array_equal(again, draws[order])
    other_seed = quality.pareto_draws(tf.constant(texts), seed=6).numpy()
    assert np.corrcoef(draws, other_seed)[0, 1] < 0.1


def _trained_classifier():
    keras.utils.set_random_seed(0)
    features = quality.QualityFeatures(num_bins=2**12, max_features=64)
    classifier = quality.QualityClassifier(features)
    positive = tf.data.Dataset.from_tensor_slices([f"{t} ({i})" for i, t in enumerate(CURATED)])
    negative = tf.data.Dataset.from_tensor_slices([f"{t} ({i})" for i, t in enumerate(JUNK)])
    return quality.train_quality_classifier(
        positive, negative, classifier=classifier, epochs=8, batch_size=32,
        learning_rate=0.1, validation_fraction=0.25,
    )


@pytest.fixture(scope="module")
def trained():
    return _trained_classifier()


def test_training_separates_curated_from_junk(trained):
    classifier, metrics = trained
    assert metrics["auc"] > 0.95 and metrics["accuracy"] > 0.9
    assert metrics["mean_validation_score"]["positive"] > 0.8
    assert metrics["mean_validation_score"]["negative"] < 0.2
    counts = metrics["documents"]
    assert sum(counts[c][s] for c in counts for s in counts[c]) == len(CURATED) + len(JUNK)


def test_tensorflow_scores_equal_the_keras_model(trained):
    classifier, _ = trained
    documents = tf.constant(CURATED[:4] + JUNK[:4] + ["unseen words entirely"])
    keras_scores = classifier.predict(classifier.features(documents), verbose=0)[:, 0]
    np.testing.assert_allclose(classifier.score(documents).numpy(), keras_scores, rtol=1e-5)


def test_save_and_load_like_any_keras_model(trained, tmp_path):
    classifier, _ = trained
    path = str(tmp_path / "filter.keras")
    classifier.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded, quality.QualityClassifier)
    assert loaded.get_config() == classifier.get_config()
    documents = tf.constant(CURATED[:3] + JUNK[:3])
    np.testing.assert_array_equal(
        loaded.score(documents).numpy(), classifier.score(documents).numpy()
    )
    assert isinstance(quality.load_quality_classifier(path), quality.QualityClassifier)


def test_load_quality_classifier_refuses_other_files(tmp_path):
    with pytest.raises(ValueError, match="No quality classifier at .*train-filter"):
        quality.load_quality_classifier(str(tmp_path / "missing.keras"))
    other = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    other.save(tmp_path / "other.keras")
    with pytest.raises(ValueError, match="holds a Sequential, not a QualityClassifier"):
        quality.load_quality_classifier(str(tmp_path / "other.keras"))


def test_filter_step_keeps_by_the_rule(trained):
    classifier, _ = trained
    texts = [f"{t} #{i}" for i, t in enumerate(CURATED * 5 + JUNK * 5)]
    decisions = list(quality.score_documents(tf.data.Dataset.from_tensor_slices(texts), classifier))
    scores = np.array([d["score"] for d in decisions])
    draws = quality.pareto_draws(tf.constant(texts)).numpy()
    expected_keep = draws > 1.0 - scores.astype("float64")
    np.testing.assert_array_equal([d["keep"] for d in decisions], expected_keep)
    kept = quality.filter_documents(tf.data.Dataset.from_tensor_slices(texts), classifier)
    kept = [t.decode() for t in kept.as_numpy_iterator()]
    assert kept == [t for t, keep in zip(texts, expected_keep) if keep]
    curated_kept = np.mean(expected_keep[: len(CURATED) * 5])
    junk_kept = np.mean(expected_keep[len(CURATED) * 5 :])
    assert curated_kept > 0.5 > 0.05 > junk_kept


def test_filtered_source_streams_the_kept_documents(trained):
    classifier, _ = trained
    source = quality.FilteredSource(DocumentList(CURATED + JUNK, name="web"), classifier, seed=3)
    kept = {t.decode() for t in source.documents().as_numpy_iterator()}
    assert source.name == "web" and kept and kept <= set(CURATED) | set(JUNK)
    assert len(kept & set(CURATED)) > len(kept & set(JUNK))
    with pytest.raises(ValueError, match="positive number"):
        quality.FilteredSource(source, classifier, alpha=-1)


def test_training_needs_both_classes_in_both_splits():
    positive = tf.data.Dataset.from_tensor_slices(["only one document"])
    negative = tf.data.Dataset.from_tensor_slices(JUNK)
    with pytest.raises(ValueError, match="positive documents have no (train|validation) document"):
        quality.train_quality_classifier(
            positive,
            negative,
            classifier=quality.QualityClassifier({"num_bins": 64, "max_features": 8}),
        )
