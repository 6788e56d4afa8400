"""Log-likelihoods of token continuations: many requests packed into each compiled forward pass."""

import logging

import jax
import jax.numpy as jnp
import numpy as np

logger = logging.getLogger(__name__)

# Requests shorter than this share rows (packed, attention kept within each request), so short
# multiple-choice requests fill whole rows instead of padding.
MIN_ROW_WIDTH = 256
# Auto batch size: rows of a forward pass hold about this many tokens, fewer for large
# vocabularies (the float32 logits of a pass take 4 * tokens * vocabulary bytes). Larger passes
# gain nothing on CPUs, where the logits' memory traffic then slows every token (measured on
# glam_small_16e: 2,700 tokens/s in [32 x 256] passes, 4,000-5,300 in [4-16 x 128-256]).
MAX_TOKENS_PER_PASS = 2048
MAX_LOGIT_BYTES = 2**25


def padded_width(length, max_length):
    """The static width a row of `length` tokens is padded to: 4 widths per octave.

    16, 20, 24, 28, 32, 40, 48, 56, 64, 80, ... (at most a quarter wasted), capped at
    `max_length`, so XLA compiles a handful of programs however many lengths there are.

    Example:

    >>> [padded_width(n, 1024) for n in (3, 17, 33, 100, 129, 1000)]
    [16, 20, 40, 112, 160, 1024]
    """
    if length <= 16:
        width = 16
    else:
        step = 2 ** (length.bit_length() - 3)
        width = -(-length // step) * step
    return min(width, max_length)


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
    whether each of them is the model's most likely next token (`is_greedy`). Requests are
    sorted by length and packed into rows of a few static widths (several requests per row,
    attention kept within each request, so nothing depends on the neighbours: GLaM has only
    relative positions, and MoE layers drop no token outside training unless the backbone's
    `eval_capacity_factor` asks for it); XLA compiles once per width and row count. Results come
    back in input order. Sequences longer than `max_length + 1` tokens lose their oldest tokens
    (the model reads the last `max_length`), with one warning.

    Args:
        causal_lm: a `GLaMCausalLM`.
        max_length: the most tokens the model reads at once.
        batch_size: rows per forward pass; None picks about 2048 tokens per pass (fewer for
            large vocabularies).

    Example:
    ```python
    scorer = TokenScorer(keras_glam.GLaMCausalLM.from_preset("glam_tiny_8e"), max_length=128)
    [(log_prob, is_greedy)] = scorer.score([([2, 40, 41], [42, 43])])
    ```
    """

    def __init__(self, causal_lm, max_length, batch_size=None):
        if not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"max_length must be a positive integer, got {max_length!r}.")
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"batch_size must be a positive integer or None, got {batch_size!r}.")
        self.causal_lm = causal_lm
        self.max_length = max_length
        self.batch_size = batch_size
        self._log_probabilities = jax.jit(self._forward)
        self._warned_truncation = False

    def rows_per_pass(self, width):
        """Rows of one forward pass at `width` tokens."""
        if self.batch_size is not None:
            return self.batch_size
        vocabulary_rows = self.causal_lm.backbone.token_embedding.input_dim
        budget = min(MAX_TOKENS_PER_PASS, MAX_LOGIT_BYTES // (4 * vocabulary_rows))
        return max(1, budget // width)

    def score(self, requests, progress=None):
        """`[(log_probability, is_greedy)]` of `requests`, in their order.

        Args:
            requests: `(context_ids, continuation_ids)` pairs; the context holds at least the
                start token, the continuation at least one token.
            progress: optional callable, called with the number of requests just scored.
        """
        sequences = []
        for index, (context, continuation) in enumerate(requests):
            if len(context) == 0 or len(continuation) == 0:
                raise ValueError(
                    f"Request {index} has an empty {'context' if not context else 'continuation'}"
                    ": the context must hold at least the start token and the continuation at "
                    "least one token."
                )
            tokens = [*context, *continuation]
            if len(tokens) - 1 > self.max_length:
                self._warn_truncation(len(tokens) - 1)
                tokens = tokens[-(self.max_length + 1) :]
            sequences.append((tokens, min(len(continuation), len(tokens) - 1)))

        results = [None] * len(sequences)
        for width, rows in self._pack([len(tokens) - 1 for tokens, _ in sequences]):
            self._score_pass(width, rows, sequences, results)
            if progress is not None:
                progress(sum(len(row) for row in rows))
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

    def _pack(self, lengths):
        """Yield `(width, rows)`: each row a list of request indices whose lengths fit `width`.

        Longest first; each row starts with the longest request left and is topped up with the
        next longest, else the shortest, that still fit.
        """
        order = sorted(range(len(lengths)), key=lambda index: -lengths[index])
        first, last = 0, len(order) - 1
        while first <= last:
            longest = lengths[order[first]]
            width = max(padded_width(longest, self.max_length), min(MIN_ROW_WIDTH, self.max_length))
            rows = []
            while first <= last and len(rows) < self.rows_per_pass(width):
                row, used = [order[first]], lengths[order[first]]
                first += 1
                while first <= last:
                    if used + lengths[order[first]] <= width:
                        row.append(order[first])
                        used += lengths[order[first]]
                        first += 1
                    elif used + lengths[order[last]] <= width:
                        row.append(order[last])
                        used += lengths[order[last]]
                        last -= 1
                    else:
                        break
                rows.append(row)
            yield width, rows

    def _score_pass(self, width, rows, sequences, results):
        # Row counts rounded up to a power of two: few distinct shapes for the last passes.
        num_rows = min(self.rows_per_pass(width), 1 << (len(rows) - 1).bit_length())
        token_ids = np.zeros((num_rows, width), "int32")
        segment_ids = np.zeros((num_rows, width), "int32")
        targets = np.zeros((num_rows, width), "int32")
        spans = []
        for row_index, row in enumerate(rows):
            offset = 0
            for segment, index in enumerate(row, start=1):
                tokens, scored = sequences[index]
                length = len(tokens) - 1
                token_ids[row_index, offset : offset + length] = tokens[:-1]
                targets[row_index, offset : offset + length] = tokens[1:]
                segment_ids[row_index, offset : offset + length] = segment
                spans.append((index, row_index, offset + length - scored, offset + length))
                offset += length

        model = self.causal_lm
        log_probs, is_greedy = self._log_probabilities(
            [variable.value for variable in model.trainable_variables],
            [variable.value for variable in model.non_trainable_variables],
            token_ids,
            segment_ids,
            targets,
        )
        zero_column = np.zeros((num_rows, 1))
        summed = np.concatenate([zero_column, np.cumsum(np.asarray(log_probs, "float64"), 1)], 1)
        greedy = np.concatenate([zero_column, np.cumsum(np.asarray(is_greedy, "int64"), 1)], 1)
        for index, row_index, start, end in spans:
            results[index] = (
                float(summed[row_index, end] - summed[row_index, start]),
                bool(greedy[row_index, end] - greedy[row_index, start] == end - start),
            )

    def _forward(
        self, trainable_variables, non_trainable_variables, token_ids, segment_ids, targets
    ):
        logits, _ = self.causal_lm.stateless_call(
            trainable_variables,
            non_trainable_variables,
            {"token_ids": token_ids, "padding_mask": segment_ids},
            training=False,
        )
        logits = logits.astype("float32")
        target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
        log_probs = target_logits - jax.nn.logsumexp(logits, axis=-1)
        return log_probs, jnp.argmax(logits, axis=-1) == targets
