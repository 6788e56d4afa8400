"""Log-likelihoods of token continuations: each context read once, its continuations batched."""

import logging

import jax
import jax.numpy as jnp
import numpy as np

from keras_glam.evaluation.stateless import model_state
from keras_glam.evaluation.stateless import stateless_scope
from keras_glam.utils.checks import check_positive_integers

logger = logging.getLogger(__name__)

# Auto batch size: rows of a forward pass hold about this many tokens, and its float32 logits
# (4 bytes per scored position and vocabulary entry) at most MAX_LOGIT_BYTES. Larger passes
# gain nothing on CPUs, where the logits' memory traffic then slows every token (measured on
# glam_small_16e: 2,700 tokens/s in [32 x 256] passes, 4,000-5,300 in [4-16 x 128-256]).
MAX_TOKENS_PER_PASS = 2048
MAX_LOGIT_BYTES = 2**25
# A continuation pass copies its rows' context caches: at most this many cached positions.
MAX_CACHED_POSITIONS_PER_PASS = 4 * MAX_TOKENS_PER_PASS


class ContinuationTooLongError(ValueError):
    """A continuation has more tokens than the model reads at once (`max_length`)."""


def padded_width(length, max_length, smallest=16):
    """The static width a row of `length` tokens is padded to: 4 widths per octave.

    16, 20, 24, 28, 32, 40, 48, 56, 64, 80, ... (at most a quarter wasted), capped at
    `max_length`, so XLA compiles a handful of programs however many lengths there are.
    Below 16 the widths are the powers of two from `smallest` (a power of two up to 16).

    Example:

    >>> [padded_width(n, 1024) for n in (3, 17, 33, 100, 129, 1000)]
    [16, 20, 40, 112, 160, 1024]
    >>> [padded_width(n, 1024, smallest=1) for n in (0, 1, 3, 5, 9)]
    [1, 1, 4, 8, 16]
    """
    if length <= 16:
        width = max(smallest, 1 << max(length - 1, 0).bit_length())
    else:
        step = 2 ** (length.bit_length() - 3)
        width = -(-length // step) * step
    return min(width, max_length)


def cache_width(width):
    """The width a context pass's KV cache is copied at for continuation passes: the power of
    two from `width` (at least 16), so that continuations after contexts of the 4-per-octave
    `padded_width`s share compiled programs; the extra slots are masked.

    Example:

    >>> [cache_width(n) for n in (1, 16, 20, 40, 1024)]
    [16, 16, 32, 64, 1024]
    """
    return max(16, 1 << (width - 1).bit_length())


def scored_tokens_per_pass(vocabulary_size):
    """Tokens of a pass that projects every position onto the vocabulary: about
    `MAX_TOKENS_PER_PASS`, fewer where their float32 logits would pass `MAX_LOGIT_BYTES`."""
    return min(MAX_TOKENS_PER_PASS, MAX_LOGIT_BYTES // (4 * vocabulary_size))


def context_rows_per_pass(width, vocabulary_size, batch_size=None):
    """Contexts of one context pass at `width` tokens: `batch_size`, or about
    `MAX_TOKENS_PER_PASS` tokens; a context pass projects one position per row onto the
    vocabulary, so its logits cap the rows at `MAX_LOGIT_BYTES / (4 vocabulary_size)`.

    Example:

    >>> [context_rows_per_pass(width, 32000) for width in (16, 128, 1024, 4096)]
    [128, 16, 2, 1]
    """
    if batch_size is not None:
        return batch_size
    return max(1, min(MAX_TOKENS_PER_PASS // width, MAX_LOGIT_BYTES // (4 * vocabulary_size)))


def continuation_rows_per_pass(width, context_width, vocabulary_size, batch_size=None):
    """Rows of one continuation pass of `width` tokens after caches of `context_width`
    positions, a power of two: every position is projected onto the vocabulary, so the rows
    hold about `MAX_TOKENS_PER_PASS` tokens and `MAX_LOGIT_BYTES` of logits (`batch_size`
    rounded up to a power of two when given), and at most `MAX_CACHED_POSITIONS_PER_PASS`
    copied cache positions.

    Example:

    >>> [continuation_rows_per_pass(width, 64, 32000) for width in (1, 4, 16, 64)]
    [64, 64, 16, 4]
    """
    if batch_size is not None:
        budget = 1 << (batch_size - 1).bit_length()
    else:
        budget = scored_tokens_per_pass(vocabulary_size) // width
    rows = max(1, min(budget, MAX_CACHED_POSITIONS_PER_PASS // (context_width + width)))
    return 1 << (rows.bit_length() - 1)


def padded_rows(count, most):
    """Rows of a pass holding `count` rows, at most `most`: a multiple of 4 (or a power of two
    below), so that the last passes of a run compile few shapes and waste at most 3 rows.

    Example:

    >>> [padded_rows(n, 21) for n in (1, 3, 5, 17, 21)]
    [1, 4, 8, 20, 21]
    """
    return min(most, -(-count // 4) * 4, 1 << (count - 1).bit_length())


def rolling_windows(token_ids, prefix_token_id, max_length):
    """lm-eval's rolling windows over a document, as disjoint `(context, continuation)` pairs.

    The first window conditions on `prefix_token_id` (the start token) and predicts the first
    `max_length` tokens; each later one predicts up to `max_length` more, conditioned on as many
    preceding tokens as fit. Every token is predicted exactly once. Equal to
    `lm_eval.utils.get_rolling_token_windows(..., context_len=1)` made disjoint with
    `lm_eval.utils.make_disjoint_window`.

    Example:

    >>> rolling_windows([10, 11, 12, 13, 14], prefix_token_id=2, max_length=3)
    [([2], [10, 11, 12]), ([11, 12], [13, 14])]
    """
    token_ids = list(token_ids)
    if not token_ids:
        return []
    first = min(max_length, len(token_ids))
    windows = [([prefix_token_id], token_ids[:first])]
    predicted = first
    while predicted < len(token_ids):
        count = min(len(token_ids) - predicted, max_length)
        end = predicted + count
        context = token_ids[end - max_length - 1 : end - count]
        windows.append((context, token_ids[predicted:end]))
        predicted = end
    return windows


class TokenScorer:
    """Scores token continuations with a `GLaMCausalLM`, batched and compiled.

    Each request `(context, continuation)` is scored as the model reads `context + continuation`:
    the log-probability of every continuation token given all tokens before it, summed, and
    whether each of them is the model's most likely next token (`is_greedy`).

    Requests that share a context (the choices of a multiple-choice question) share its
    computation, in two kinds of compiled passes:

    1. Context passes: the distinct contexts, longest first, left-padded to one of a few
       static widths, run through `GLaMCausalLM.call_with_cache`; only the last position is
       projected onto the vocabulary (`GLaMCausalLM.output_logits`): its log-softmax scores
       the first token of every continuation of that context.
    2. Continuation passes: the other continuation tokens of every request, sorted by length
       and right-padded, each row attending to a copy of its context's KV cache; every
       position of these rows is scored, so the projection runs on scored positions only.

    A one-token continuation costs no pass of its own (lm-eval's `group_by="contexts"` idea,
    taken to continuations of any length). GLaM has only relative positions, so the padding
    shifts nothing, and MoE layers drop no token outside training unless the backbone's
    `eval_capacity_factor` asks for it: each score equals the one of the plain forward pass on
    `context + continuation` alone. XLA compiles once per shape, and the shapes are few: context
    widths 4 per octave (`padded_width`), continuation passes read copies of the context caches
    at power-of-two widths (`cache_width`, extra slots masked) and hold a power of two of rows
    (spare rows are dropped). Results come back in input order. Contexts too long to fit before
    their continuation within `max_length` lose their oldest tokens, with one warning; a
    continuation longer than `max_length` is refused (`ContinuationTooLongError`), as lm-eval's
    models refuse it.

    Args:
        causal_lm: a `GLaMCausalLM`.
        max_length: the most tokens the model reads at once.
        batch_size: contexts per context pass (and, rounded up to a power of two, rows per
            continuation pass); None sizes passes to about 2048 tokens and 32 MiB of logits
            (`context_rows_per_pass`, `continuation_rows_per_pass`).

    Example:
    ```python
    scorer = TokenScorer(keras_glam.GLaMCausalLM.from_preset("glam_tiny_8e"), max_length=128)
    [(log_prob, is_greedy)] = scorer.score([([2, 40, 41], [42, 43])])
    ```
    """

    def __init__(self, causal_lm, max_length, batch_size=None):
        check_positive_integers(max_length=max_length)
        if batch_size is not None:
            check_positive_integers(batch_size=batch_size)
        self.causal_lm = causal_lm
        self.max_length = max_length
        self.batch_size = batch_size
        self._context_pass = jax.jit(self._read_contexts)
        self._copy_caches = jax.jit(_copied_caches, static_argnames=("width",))
        self._continuation_pass = jax.jit(self._read_continuations)
        self._warned_truncation = False

    @property
    def vocabulary_size(self):
        return self.causal_lm.backbone.token_embedding.input_dim

    def rows_per_pass(self, width):
        """Rows of one pass at `width` tokens that projects every position (full logits)."""
        if self.batch_size is not None:
            return self.batch_size
        return max(1, scored_tokens_per_pass(self.vocabulary_size) // width)

    def score(self, requests, progress=None):
        """`[(log_probability, is_greedy)]` of `requests`, in their order.

        Args:
            requests: `(context_ids, continuation_ids)` pairs; the context holds at least the
                start token, the continuation at least one token.
            progress: optional callable, called with the number of requests just scored.
        """
        context_index, contexts, continuations = {}, [], []
        for index, (context, continuation) in enumerate(requests):
            if len(context) == 0 or len(continuation) == 0:
                raise ValueError(
                    f"Request {index} has an empty {'context' if not context else 'continuation'}"
                    ": the context must hold at least the start token and the continuation at "
                    "least one token."
                )
            if len(continuation) > self.max_length:
                raise ContinuationTooLongError(
                    f"Request {index} has a continuation of {len(continuation)} tokens, more "
                    f"than max_length={self.max_length} (the most the model reads at once): "
                    f"raise max_length (glam-eval --max-length) to at least {len(continuation)}."
                )
            tokens = [*context, *continuation]
            if len(tokens) - 1 > self.max_length:
                self._warn_truncation(len(tokens) - 1)
                tokens = tokens[-(self.max_length + 1) :]
            # The model reads `tokens[:-1]`; the continuation's tokens are predicted.
            scored = len(continuation)
            key = tuple(tokens[:-scored])
            if key not in context_index:
                context_index[key] = len(contexts)
                contexts.append((key, []))
            contexts[context_index[key]][1].append(index)
            continuations.append(tokens[-scored:])

        results = [None] * len(requests)
        order = sorted(range(len(contexts)), key=lambda index: -len(contexts[index][0]))
        start = 0
        while start < len(order):
            width = padded_width(len(contexts[order[start]][0]), self.max_length)
            most = context_rows_per_pass(width, self.vocabulary_size, self.batch_size)
            batch = [contexts[index] for index in order[start : start + most]]
            start += len(batch)
            self._score_contexts(width, batch, continuations, results)
            if progress is not None:
                progress(sum(len(members) for _, members in batch))
        return results

    def score_documents(self, documents, prefix_token_id, progress=None):
        """Log-likelihood of each whole document (token ids), through `rolling_windows`."""
        windows, owners = [], []
        for index, token_ids in enumerate(documents):
            document_windows = rolling_windows(token_ids, prefix_token_id, self.max_length)
            windows += document_windows
            owners += [index] * len(document_windows)
        totals = [0.0] * len(documents)
        for owner, (log_probability, _) in zip(owners, self.score(windows, progress)):
            totals[owner] += log_probability
        return totals

    def _warn_truncation(self, length):
        if not self._warned_truncation:
            self._warned_truncation = True
            logger.warning(
                "A request of %d tokens is longer than max_length=%d: its oldest tokens are "
                "dropped (left truncation; said once per scorer).",
                length,
                self.max_length,
            )

    def _score_contexts(self, width, batch, continuations, results):
        """One context pass over `batch` (`(context, request indices)` pairs), then the
        continuation passes of their requests."""
        num_rows = padded_rows(
            len(batch), context_rows_per_pass(width, self.vocabulary_size, self.batch_size)
        )
        token_ids = np.zeros((num_rows, width), "int32")
        padding_mask = np.zeros((num_rows, width), bool)
        for row, (context, _) in enumerate(batch):
            token_ids[row, width - len(context) :] = context
            padding_mask[row, width - len(context) :] = True
        state = model_state(self.causal_lm)
        cache, first_log_probs, first_greedy = self._context_pass(state, token_ids, padding_mask)
        first_log_probs, first_greedy = np.asarray(first_log_probs), np.asarray(first_greedy)
        # Continuations read copies of the caches at a coarse width, the extra slots masked.
        copy_width = cache_width(width)
        padding_mask = np.pad(padding_mask, [(0, 0), (copy_width - width, 0)])

        rest = []  # (request, context row) of continuations longer than one token
        for row, (_, members) in enumerate(batch):
            for index in members:
                first = continuations[index][0]
                results[index] = (float(first_log_probs[row, first]), bool(first_greedy[row] == first))
                if len(continuations[index]) > 1:
                    rest.append((index, row))
        rest.sort(key=lambda item: -len(continuations[item[0]]))
        start = 0
        while start < len(rest):
            rest_width = padded_width(
                len(continuations[rest[start][0]]) - 1, self.max_length, smallest=1
            )
            most = continuation_rows_per_pass(
                rest_width, width, self.vocabulary_size, self.batch_size
            )
            self._score_continuations(
                cache, padding_mask, rest_width, rest[start : start + most], continuations,
                results,
            )
            start += most

    def _score_continuations(self, cache, context_mask, width, rows, continuations, results):
        """Tokens after the first of `rows` (`(request, context row)` pairs), after copies of
        their contexts' caches (`context_mask` wide); added to the first tokens' scores in
        `results`. Spare rows (up to a power of two) repeat context 0 and are dropped."""
        num_rows = 1 << (len(rows) - 1).bit_length()
        token_ids = np.zeros((num_rows, width), "int32")
        targets = np.zeros((num_rows, width), "int32")
        padding_mask = np.zeros((num_rows, width), bool)
        context_rows = np.zeros(num_rows, "int32")
        for row, (index, context_row) in enumerate(rows):
            continuation = continuations[index]
            token_ids[row, : len(continuation) - 1] = continuation[:-1]
            targets[row, : len(continuation) - 1] = continuation[1:]
            padding_mask[row, : len(continuation) - 1] = True
            context_rows[row] = context_row
        padding_mask = np.concatenate([context_mask[context_rows], padding_mask], axis=1)
        log_probs, is_greedy = self._continuation_pass(
            model_state(self.causal_lm),
            self._copy_caches(cache, context_rows, width=context_mask.shape[1]),
            padding_mask,
            token_ids,
            targets,
        )
        log_probs = np.asarray(log_probs, "float64")
        is_greedy = np.asarray(is_greedy)
        for row, (index, _) in enumerate(rows):
            count = len(continuations[index]) - 1
            first_log_prob, first_greedy = results[index]
            results[index] = (
                first_log_prob + float(log_probs[row, :count].sum()),
                bool(first_greedy and is_greedy[row, :count].all()),
            )

    def _read_contexts(self, state, token_ids, padding_mask):
        """KV caches of left-padded contexts, and the log-softmax after each context."""
        model = self.causal_lm
        with stateless_scope(model, state):
            cache = model.empty_cache(*token_ids.shape)
            # Only the last position predicts a scored token; XLA drops the unused logits.
            _, hidden_states, cache = model.call_with_cache(
                token_ids, cache, 0, padding_mask=padding_mask
            )
            logits = model.output_logits(hidden_states[:, -1]).astype("float32")
        return cache, jax.nn.log_softmax(logits, axis=-1), jnp.argmax(logits, axis=-1)

    def _read_continuations(self, state, cache, padding_mask, token_ids, targets):
        """Log-probabilities of `targets` and whether each is the argmax, reading `token_ids`
        after the contexts in `cache` (`GLaMCausalLM.empty_cache`'s form, `context width`
        positions)."""
        context_width, width = cache[0][0].shape[2], token_ids.shape[1]
        positions = [(0, 0), (0, 0), (0, width), (0, 0)]
        cache = jax.tree.map(lambda array: jnp.pad(array, positions), cache)
        with stateless_scope(self.causal_lm, state):
            logits, _, _ = self.causal_lm.call_with_cache(
                token_ids, cache, context_width, padding_mask=padding_mask
            )
        logits = logits.astype("float32")
        target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
        log_probs = target_logits - jax.nn.logsumexp(logits, axis=-1)
        return log_probs, jnp.argmax(logits, axis=-1) == targets


def _copied_caches(cache, context_rows, width):
    """The caches of `context_rows`, left-padded to `width` positions."""
    return jax.tree.map(
        lambda array: jnp.pad(
            jnp.take(array, context_rows, axis=0),
            [(0, 0), (0, 0), (width - array.shape[2], 0), (0, 0)],
        ),
        cache,
    )
