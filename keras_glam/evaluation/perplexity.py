"""Held-out perplexity of texts: nats per token and bits per byte, in lm-eval's rolling windows."""

import dataclasses
import math

from keras_glam.evaluation.model_loading import load_causal_lm
from keras_glam.evaluation.token_scorer import TokenScorer


@dataclasses.dataclass(frozen=True)
class Perplexity:
    """How well a model predicts some text.

    Attributes:
        log_likelihood: summed log-likelihood of every token (natural log).
        tokens: tokens predicted (every token of every text, `<s>` excluded).
        bytes: UTF-8 bytes of the texts.
        documents: number of texts.
    """

    log_likelihood: float
    tokens: int
    bytes: int
    documents: int

    @property
    def nats_per_token(self):
        """Mean negative log-likelihood per predicted token."""
        return -self.log_likelihood / self.tokens

    @property
    def bits_per_byte(self):
        """Negative log-likelihood in bits per UTF-8 byte: comparable across tokenizers."""
        return -self.log_likelihood / (math.log(2) * self.bytes)

    @classmethod
    def total(cls, parts):
        """The `Perplexity` of several texts together."""
        return cls(
            log_likelihood=sum(part.log_likelihood for part in parts),
            tokens=sum(part.tokens for part in parts),
            bytes=sum(part.bytes for part in parts),
            documents=sum(part.documents for part in parts),
        )


def perplexity(model, texts, *, max_length=None, batch_size=None):
    """Score whole texts with a GLaM model: nats per token and bits per byte, over all of them.

    Each text is one document: it is read after `<s>` (the start-token convention of training
    and `generate`), every one of its tokens is predicted once, in windows of `max_length`
    tokens with as much preceding text as fits (lm-eval's `loglikelihood_rolling`, the same code
    as `GLaMLM.loglikelihood_rolling`), and the log-likelihoods are summed over all texts.
    Needs no lm-eval.

    Args:
        model: a `GLaMCausalLM` with a tokenizer, or a preset handle.
        texts: a list of non-empty strings, one per document.
        max_length: window length in tokens; None: the preprocessor's `sequence_length`.
        batch_size: rows per forward pass; None: automatic.

    Returns:
        A `Perplexity` (`nats_per_token`, `bits_per_byte`, counts).

    Example:
    ```python
    from keras_glam.evaluation import perplexity

    result = perplexity("glam_tiny_8e", ["def f(x):\n    return x\n"], max_length=64)
    print(f"{result.nats_per_token:.3f} nats/token, {result.bits_per_byte:.3f} bits/byte")
    ```
    """
    return Perplexity.total(
        text_perplexities(model, texts, max_length=max_length, batch_size=batch_size)
    )


def text_perplexities(model, texts, *, max_length=None, batch_size=None):
    """One `Perplexity` per text, scored together (arguments as `perplexity`)."""
    if isinstance(texts, str) or not all(isinstance(text, str) and text for text in texts):
        raise TypeError("texts must be a list of non-empty strings, one per document.")
    if not texts:
        raise ValueError("perplexity needs at least one text.")
    causal_lm = load_causal_lm(model)
    tokenizer = causal_lm.preprocessor.tokenizer
    scorer = TokenScorer(
        causal_lm, max_length or causal_lm.preprocessor.sequence_length, batch_size
    )
    documents = [[int(token) for token in tokenizer.tokenize(text)] for text in texts]
    log_likelihoods = scorer.score_documents(documents, tokenizer.start_token_id)
    return [
        Perplexity(log_likelihood, len(document), len(text.encode("utf-8")), 1)
        for log_likelihood, document, text in zip(log_likelihoods, documents, texts)
    ]
