"""GLaM's text-quality filter: a linear classifier on hashed word n-grams, and the Pareto rule.

GLaM (Du et al. 2021, section 3, "Training Dataset") filtered its web pages with its own text
quality classifier: a feature-hash-based linear classifier (chosen for inference speed) trained
to tell a collection of curated text (Wikipedia, books and a few selected websites) from other
web pages. Pages were then *sampled* by score with a Pareto distribution, so that some
lower-scored pages get in and the classifier's systematic biases do not shape the corpus
alone. GLaM cites GPT-3 (Brown et al. 2020, "Language Models are Few-Shot Learners", appendix A)
for this, whose rule is: keep a document iff

    np.random.pareto(alpha) > 1 - document_score,    alpha = 9,

with a logistic regression on Spark's standard tokenizer (lower-case, split on whitespace) and
HashingTF features. GLaM does not state its alpha; 9, GPT-3's, is the default here.

Here, with Keras and TensorFlow parts:

- `QualityFeatures` (a preprocessing layer, TensorFlow ops, so it runs inside `tf.data` whatever
  the Keras backend): lower-case, split on whitespace, word 1- and 2-grams, hashed into
  `num_bins` buckets with `keras.layers.Hashing` (`count` mode = term frequencies), then
  `log1p` and L2-normalised per document (a deviation from raw counts, so that one score
  scale fits short and long documents; `sublinear_tf=False` keeps raw counts). The output is a
  `tf.SparseTensor` with exactly `max_features` entries per document (padding entries hold 0),
  so that every batch has the same shape and the classifier compiles once.
- `QualityClassifier` (a `keras.Model`): logistic regression, one `keras.layers.Dense(1,
  "sigmoid")` over the sparse features, trained with `fit` on a `tf.data` pipeline
  (`train_quality_classifier`), saved and loaded like any Keras model
  (`classifier.save("filter.keras")`, `keras.saving.load_model`).
- `score_documents` / `filter_documents`: the filter as one `tf.data` step. Scores are computed
  with TensorFlow from the classifier's weights (`QualityClassifier.score`), and each document's
  Pareto draw comes from a keyed hash of its text (`pareto_draws`): the same document gets the
  same decision on every run and every host, independent of order, so filtering commutes with
  shuffling, sharding and the held-out split, and a resumed stream filters exactly as before.

With `numpy.random.pareto`'s distribution (Lomax: `P(X > x) = (1 + x) ** -alpha`), a document
of score `s` is kept with probability `(2 - s) ** -alpha` (`keep_probability`): 1 at s = 1,
0.42 at s = 0.9, 0.026 at s = 0.5, 0.002 at s = 0.
"""

import hashlib
import math
import os

import keras
import numpy as np
import tensorflow as tf

from keras_glam.data.sources import DocumentSource
from keras_glam.data.sources import held_out_mask
from keras_glam.utils.checks import check_positive_integers

DEFAULT_ALPHA = 9.0
# Uniform draws come from a 53-bit hash: every float64 in [0, 1) with that resolution.
_DRAW_BITS = 53
# Key of the document hash behind the Pareto draws (SipHash; `seed` is the other key word).
_DRAW_KEY = 0x676C616D  # "glam"
_VALIDATION_SALT = "quality-classifier-validation:"


class QualityFeatures:
    """Hashed word n-gram term frequencies of documents, as a fixed-shape `tf.SparseTensor`.

    TensorFlow ops (call it inside `tf.data`, or on `tf` tensors), whatever the Keras backend;
    the hashing is `keras.layers.Hashing`. It has no weights: a `QualityClassifier` keeps its
    settings in its config.

    Args:
        num_bins: int, hash buckets (features). Defaults to 2**18 (Spark HashingTF's default).
        ngram_widths: tuple of ints, word n-gram lengths. Defaults to `(1, 2)`.
        max_words: int, words read per document (the start of long documents). Defaults to
            4096.
        max_features: int, distinct buckets kept per document (the first in bucket order when
            there are more); also the fixed number of sparse entries per row. Defaults to
            4096.
        sublinear_tf: bool, `log1p` the counts. Defaults to True.
        normalize: bool, L2-normalise each document's vector. Defaults to True.

    Example:

    >>> features = QualityFeatures(num_bins=64, max_features=8)
    >>> x = features(tf.constant(["the cat sat", "spam spam spam"]))
    >>> x.dense_shape.numpy().tolist(), int(tf.shape(x.values)[0])
    ([2, 64], 16)
    """

    def __init__(
        self,
        num_bins=2**18,
        ngram_widths=(1, 2),
        max_words=4096,
        max_features=4096,
        sublinear_tf=True,
        normalize=True,
    ):
        check_positive_integers(num_bins=num_bins, max_words=max_words, max_features=max_features)
        ngram_widths = tuple(int(width) for width in ngram_widths)
        if not ngram_widths or min(ngram_widths) < 1:
            raise ValueError(
                f"`ngram_widths` must be positive integers. Received: {ngram_widths!r}"
            )
        self.num_bins = num_bins
        self.ngram_widths = ngram_widths
        self.max_words = max_words
        self.max_features = max_features
        self.sublinear_tf = sublinear_tf
        self.normalize = normalize
        self.hashing = keras.layers.Hashing(
            num_bins=num_bins, output_mode="count", sparse=True, name="hashing"
        )
        # A TensorFlow graph, also when called eagerly (Keras layers run the backend's ops
        # outside of one).
        self._features = tf.function(
            self._compute, input_signature=[tf.TensorSpec([None], tf.string)]
        )

    def __call__(self, documents):
        """Features `[batch, num_bins]` of a 1-D `tf.string` tensor (or list) of documents."""
        return self._features(tf.convert_to_tensor(documents, tf.string))

    def weighted_buckets(self, documents):
        """`(buckets, values)`: each document's hash buckets and their weights, as two
        `[batch, (features)]` ragged tensors (at most `max_features` per document). The
        compact form that scoring uses; `__call__` pads it into a fixed-shape sparse tensor."""
        words = tf.strings.split(tf.strings.lower(documents, encoding="utf-8"))[:, : self.max_words]
        ngrams = tf.strings.ngrams(words, ngram_width=self.ngram_widths, separator=" ")
        counts = self.hashing(ngrams)
        num_documents = tf.shape(documents, out_type=tf.int64)[0]
        rows = counts.indices[:, 0]
        buckets = tf.RaggedTensor.from_value_rowids(counts.indices[:, 1], rows, num_documents)
        values = tf.RaggedTensor.from_value_rowids(counts.values, rows, num_documents)
        if self.sublinear_tf:
            values = tf.math.log1p(values)
        if self.normalize:
            norms = tf.sqrt(tf.reduce_sum(tf.square(values), axis=1, keepdims=True))
            values = values / tf.maximum(norms, 1e-12)
        return buckets[:, : self.max_features], values[:, : self.max_features]

    def _compute(self, documents):
        buckets, values = self.weighted_buckets(documents)
        shape = [None, self.max_features]
        buckets = buckets.to_tensor(default_value=0, shape=shape)
        values = values.to_tensor(default_value=0.0, shape=shape)
        num_documents = tf.shape(documents, out_type=tf.int64)[0]
        row_ids = tf.repeat(tf.range(num_documents), self.max_features)
        return tf.SparseTensor(
            indices=tf.stack([row_ids, tf.reshape(buckets, [-1])], axis=1),
            values=tf.reshape(values, [-1]),
            dense_shape=tf.stack([num_documents, tf.constant(self.num_bins, tf.int64)]),
        )

    def get_config(self):
        return {
            "num_bins": self.num_bins,
            "ngram_widths": list(self.ngram_widths),
            "max_words": self.max_words,
            "max_features": self.max_features,
            "sublinear_tf": self.sublinear_tf,
            "normalize": self.normalize,
        }


@keras.saving.register_keras_serializable(package="keras_glam")
class QualityClassifier(keras.Model):
    """Logistic regression on `QualityFeatures`: the probability that a document is curated.

    `call` takes the sparse features (as `fit` and `predict` get them from a `tf.data`
    pipeline mapped with `classifier.features`); `score` takes documents and computes the same
    probability with TensorFlow ops, for use inside `tf.data`.

    Args:
        features: the `QualityFeatures` (or their config dict). Defaults to
            `QualityFeatures()`: 2**18 buckets of word 1- and 2-grams.

    Example:

    >>> classifier = QualityClassifier(QualityFeatures(num_bins=1024, max_features=64))
    >>> scores = classifier.score(tf.constant(["A curated sentence.", "buy buy buy"]))
    >>> [round(float(s), 2) for s in scores]  # Untrained: the bias and kernel start at 0.
    [0.5, 0.5]
    """

    def __init__(self, features=None, **kwargs):
        super().__init__(**kwargs)
        if isinstance(features, dict):
            features = QualityFeatures(**features)
        self.features = features or QualityFeatures()
        self.logistic_regression = keras.layers.Dense(
            1, activation="sigmoid", kernel_initializer="zeros", name="logistic_regression"
        )
        self.logistic_regression.build((None, self.features.num_bins))
        self.built = True

    def call(self, features):
        return self.logistic_regression(features)

    def score(self, documents):
        """Probabilities `[batch]` (float32 `tf.Tensor`) that each document is curated text.

        TensorFlow ops on the current weights (see `scorer`).
        """
        return self.scorer()(documents)

    def scorer(self):
        """A function from a 1-D `tf.string` tensor of documents to their scores, made of
        TensorFlow ops on a copy of the current weights: call it inside `tf.data` (this
        method itself must run eagerly, where the weights can be read)."""
        kernel = np.asarray(self.logistic_regression.kernel, dtype="float32")
        bias = np.asarray(self.logistic_regression.bias, dtype="float32")
        return lambda texts: self._score(tf.convert_to_tensor(texts, tf.string), kernel, bias)

    @tf.function(
        input_signature=[
            tf.TensorSpec([None], tf.string),
            tf.TensorSpec([None, 1], tf.float32),
            tf.TensorSpec([1], tf.float32),
        ]
    )
    def _score(self, documents, kernel, bias):
        # The same sum as `Dense` over `features(documents)`, without the padding entries.
        buckets, values = self.features.weighted_buckets(documents)
        logits = tf.reduce_sum(tf.gather(kernel[:, 0], buckets) * values, axis=1) + bias[0]
        return tf.sigmoid(logits)

    def get_config(self):
        return {"name": self.name, "features": self.features.get_config()}


def keep_probability(score, alpha=DEFAULT_ALPHA):
    """P(keep) under the rule `pareto(alpha) > 1 - score`: `(2 - score) ** -alpha`.

    Example:

    >>> keep_probability([1.0, 0.9, 0.5, 0.0]).round(3).tolist()
    [1.0, 0.424, 0.026, 0.002]
    """
    return (2.0 - np.asarray(score, dtype="float64")) ** -float(alpha)


def pareto_draws(documents, alpha=DEFAULT_ALPHA, seed=0):
    """One `numpy.random.pareto(alpha)`-distributed draw per document, from its text.

    The uniform `u` is a keyed hash of the document (`tf.strings.to_hash_bucket_strong`,
    SipHash with key `[seed, _DRAW_KEY]`, 53 bits); the draw is the inverse of the Lomax CDF,
    `(1 - u) ** (-1 / alpha) - 1`. Identical documents get identical draws.

    Args:
        documents: 1-D `tf.string` tensor.
        alpha: float > 0, the Pareto shape.
        seed: int, another seed gives independent draws.

    Returns:
        float64 `tf.Tensor` of draws, shape `[batch]`.
    """
    hashes = tf.strings.to_hash_bucket_strong(documents, 2**_DRAW_BITS, key=[seed, _DRAW_KEY])
    uniform = (tf.cast(hashes, tf.float64) + 0.5) / float(2**_DRAW_BITS)
    return (1.0 - uniform) ** (-1.0 / alpha) - 1.0


def _check_alpha(alpha):
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"The Pareto `alpha` must be a positive number. Received: {alpha!r}")


def _decisions(documents, classifier, alpha, seed, batch_size):
    """Batches `{"text", "score", "keep"}` of the keep rule over `documents`."""
    _check_alpha(alpha)
    scorer = classifier.scorer()

    def decide(texts):
        scores = scorer(texts)
        keep = pareto_draws(texts, alpha, seed) > 1.0 - tf.cast(scores, tf.float64)
        return {"text": texts, "score": scores, "keep": keep}

    return documents.batch(batch_size).map(decide, num_parallel_calls=tf.data.AUTOTUNE)


def score_documents(documents, classifier, alpha=DEFAULT_ALPHA, seed=0, batch_size=256):
    """Scores documents and applies the keep rule: the filter's decisions as a `tf.data` step.

    Args:
        documents: a `tf.data.Dataset` of scalar `tf.string` documents.
        classifier: a trained `QualityClassifier`.
        alpha: the Pareto shape of the keep rule. Defaults to 9 (GPT-3's).
        seed: int, seeds the per-document draws.
        batch_size: documents scored at once.

    Returns:
        A `tf.data.Dataset` of `{"text": tf.string, "score": float32, "keep": bool}`, in the
        order of `documents`.
    """
    return _decisions(documents, classifier, alpha, seed, batch_size).unbatch()


def filter_documents(documents, classifier, alpha=DEFAULT_ALPHA, seed=0, batch_size=256):
    """The documents that `score_documents` keeps (a `tf.data` step; `documents.apply` it).

    Example:

    >>> classifier = QualityClassifier(QualityFeatures(num_bins=1024, max_features=64))
    >>> texts = ["a"] * 4 + [f"doc {i}" for i in range(4000)]
    >>> documents = tf.data.Dataset.from_tensor_slices(texts)
    >>> kept = filter_documents(documents, classifier)  # Score 0.5 everywhere: keeps 1.5**-9.
    >>> 60 < sum(1 for _ in kept) < 150
    True
    """
    decisions = _decisions(documents, classifier, alpha, seed, batch_size)
    return decisions.map(lambda d: tf.boolean_mask(d["text"], d["keep"])).unbatch()


class FilteredSource(DocumentSource):
    """A `DocumentSource` filtered by GLaM's quality rule as it streams (`filter_documents`).

    Args:
        source: the `DocumentSource` to filter; its name is kept.
        classifier: a trained `QualityClassifier`.
        alpha: the Pareto shape of the keep rule. Defaults to 9.
        seed: seeds the per-document draws.
    """

    def __init__(self, source, classifier, alpha=DEFAULT_ALPHA, seed=0):
        _check_alpha(alpha)
        super().__init__(source.name)
        self.source = source
        self.classifier = classifier
        self.alpha = alpha
        self.seed = seed

    def documents(self, num_hosts=1, host_index=0, shuffle_seed=None):
        documents = self.source.documents(num_hosts, host_index, shuffle_seed)
        return filter_documents(documents, self.classifier, self.alpha, self.seed)

    def first_documents(self, count, num_hosts=1, host_index=0):
        documents = self.source.first_documents(count, num_hosts, host_index)
        return filter_documents(documents, self.classifier, self.alpha, self.seed)

    def check(self):
        self.source.check()

    def describe_error(self, error):
        return self.source.describe_error(error)

    def __repr__(self):
        kernel = np.asarray(self.classifier.logistic_regression.kernel)
        digest = hashlib.sha256(kernel.tobytes()).hexdigest()[:12]
        return (
            f"FilteredSource({self.source!r}, classifier={digest}, alpha={self.alpha}, "
            f"seed={self.seed})"
        )


def _labelled(documents, label, max_documents):
    if max_documents is not None:
        documents = documents.take(max_documents)
    return documents.map(lambda text: (text, tf.constant(label, tf.float32)))


def train_quality_classifier(
    positive_documents,
    negative_documents,
    classifier=None,
    epochs=3,
    batch_size=256,
    learning_rate=0.01,
    validation_fraction=0.1,
    max_documents_per_class=None,
    shuffle_buffer=10_000,
    seed=0,
    verbose=0,
):
    """Fits a `QualityClassifier` with `fit` on a `tf.data` pipeline of both classes.

    Both classes weigh equally in the loss (each example is weighted by `n / (2 n_class)`, the
    class sizes counted in one streaming pass), so that the score does not just reflect how
    much of each was at hand. Whole documents are held out for validation by a salted hash
    (`validation_fraction`), independent of the language model's held-out split.

    Args:
        positive_documents: `tf.data.Dataset` of scalar `tf.string`: curated text (label 1).
        negative_documents: `tf.data.Dataset` of scalar `tf.string`: raw web text (label 0).
        classifier: a `QualityClassifier` to train; defaults to a new one with default settings.
        epochs: passes over the training documents.
        batch_size: documents per step.
        learning_rate: Adam's learning rate.
        validation_fraction: share of documents held out (by hash) for the metrics.
        max_documents_per_class: read at most this many documents of each class.
        shuffle_buffer: documents in the shuffle buffer.
        seed: seeds the shuffle.
        verbose: `fit` verbosity.

    Returns:
        `(classifier, metrics)`: the trained classifier and a dict with the validation
        `accuracy`, `auc` and `loss`, the document counts per class and split, and the
        mean validation score of each class.

    Raises:
        ValueError: a class has no training or no validation document.
    """
    classifier = QualityClassifier() if classifier is None else classifier
    labelled = {
        "positive": _labelled(positive_documents, 1.0, max_documents_per_class),
        "negative": _labelled(negative_documents, 0.0, max_documents_per_class),
    }
    splits = {}
    counts = {}

    def validation(text, label):
        # Salted: independent of the language model's held-out split (unsalted).
        return held_out_mask(text, validation_fraction, salt=_VALIDATION_SALT)

    for name, documents in labelled.items():
        held_out = documents.filter(validation)
        train = documents.filter(lambda text, label: tf.logical_not(validation(text, label)))
        splits[name] = (train, held_out)
        counts[name] = {
            "train": int(train.reduce(0, lambda count, _: count + 1)),
            "validation": int(held_out.reduce(0, lambda count, _: count + 1)),
        }
        for split, count in counts[name].items():
            if count == 0:
                raise ValueError(
                    f"The {name} documents have no {split} document ({counts[name]}). Give "
                    "more documents of each class, or change `validation_fraction`."
                )
    total = counts["positive"]["train"] + counts["negative"]["train"]
    class_weight = {
        label: total / (2.0 * counts[name]["train"])
        for label, name in ((1.0, "positive"), (0.0, "negative"))
    }

    def features(texts, labels):
        weights = tf.where(labels > 0.5, class_weight[1.0], class_weight[0.0])
        return classifier.features(texts), labels[:, None], weights

    train = splits["positive"][0].concatenate(splits["negative"][0])
    train = train.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True).repeat()
    # Full batches only (one compiled step): an epoch is the whole batches of the documents.
    train = train.batch(batch_size, drop_remainder=True).map(features).prefetch(tf.data.AUTOTUNE)
    validation = splits["positive"][1].concatenate(splits["negative"][1])
    validation = validation.batch(batch_size).map(features).prefetch(tf.data.AUTOTUNE)
    validation_documents = counts["positive"]["validation"] + counts["negative"]["validation"]
    validation = validation.apply(
        tf.data.experimental.assert_cardinality(-(-validation_documents // batch_size))
    )

    classifier.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss="binary_crossentropy",
        weighted_metrics=["accuracy", keras.metrics.AUC(name="auc")],
    )
    classifier.fit(
        train,
        epochs=epochs,
        steps_per_epoch=max(1, total // batch_size),
        shuffle=False,  # The dataset is shuffled.
        verbose=verbose,
    )
    evaluation = classifier.evaluate(validation, return_dict=True, verbose=0)
    mean_scores = {}
    for name, (_, held_out) in splits.items():
        scores = [
            classifier.score(texts).numpy()
            for texts, _ in held_out.batch(batch_size).as_numpy_iterator()
        ]
        mean_scores[name] = float(np.concatenate(scores).mean())
    metrics = {
        "accuracy": float(evaluation["accuracy"]),
        "auc": float(evaluation["auc"]),
        "loss": float(evaluation["loss"]),
        "documents": counts,
        "mean_validation_score": mean_scores,
    }
    return classifier, metrics


def load_quality_classifier(path):
    """`keras.saving.load_model(path)`, checked to be a `QualityClassifier`.

    Raises:
        ValueError: the file is missing or holds another kind of model.
    """
    if not os.path.isfile(path):
        raise ValueError(
            f"No quality classifier at {path}: train one with `glam-data train-filter`."
        )
    model = keras.saving.load_model(path)
    if not isinstance(model, QualityClassifier):
        raise ValueError(
            f"{path} holds a {type(model).__name__}, not a QualityClassifier (made by "
            "`glam-data train-filter`)."
        )
    return model
