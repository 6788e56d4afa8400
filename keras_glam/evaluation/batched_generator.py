"""Continuations of many prompts at once: KV-cached, compiled, stopped by strings or tokens."""

import logging

import jax
import jax.numpy as jnp
import keras_hub
import numpy as np

from keras_glam.evaluation.stateless import model_state
from keras_glam.evaluation.stateless import stateless_scope
from keras_glam.evaluation.token_scorer import padded_rows
from keras_glam.evaluation.token_scorer import padded_width
from keras_glam.utils.checks import check_positive_integers

logger = logging.getLogger(__name__)

DEFAULT_ROWS = 16


class BatchedGenerator:
    """Generates text after token prompts with a `GLaMCausalLM`, several prompts per batch.

    The prompts of a batch are left-padded to one width, so they all end at the same position
    and every row generates from there in step (`GLaMCausalLM.call_with_cache` with a
    `padding_mask` keeps each row's attention off its padding; GLaM's relative positions make a
    shifted row compute what it computes alone). Greedy decoding (the default) runs one token at
    a time inside a compiled loop and, every `check_every` tokens, decodes each row and retires
    the rows that produced the end token, a stop string or `max_new_tokens` tokens; the batch
    ends when all rows are retired. Its tokens are those of `generate()` with
    `keras_hub.samplers.GreedySampler` on each prompt alone. `num_beams > 1` decodes with
    `keras_hub.samplers.BeamSampler` and GLaM's (Lingvo's) finished hypotheses: a beam that
    produced the end token is finished, keeps its score and occupies its slot unchanged (it
    only adds end tokens of log-probability 0), so beams are never ranked on text after `</s>`
    and each row's result depends on that row alone; the search stops when every beam has
    finished or after `max_new_tokens` steps (a beam search cannot stop at a string without
    changing its result); the text is cut at the end token and the first stop string
    afterwards.

    Prompts are sorted by length and batched in that order (little left padding), to a few
    static widths (`padded_width`); a prompt longer than `max_length - max_new_tokens` loses its
    oldest tokens, with one warning.

    Args:
        causal_lm: a `GLaMCausalLM` with a preprocessor (its tokenizer decodes the text).
        max_length: the most tokens (prompt and continuation) the model reads at once.
        batch_size: prompts per batch; None: 16.
        check_every: greedy steps between two looks for stop strings.

    Example:
    ```python
    causal_lm = keras_glam.GLaMCausalLM.from_preset("glam_tiny_8e")
    generator = BatchedGenerator(causal_lm, max_length=128)
    generator.generate([[2, 40, 41], [2, 50]], max_new_tokens=8, stop=["\\n"])
    ```
    """

    def __init__(self, causal_lm, max_length, batch_size=None, check_every=16):
        self.causal_lm = causal_lm
        self.tokenizer = causal_lm.preprocessor.tokenizer
        self.max_length = max_length
        self.batch_size = batch_size or DEFAULT_ROWS
        self.check_every = check_every
        self._greedy = keras_hub.samplers.GreedySampler()
        self._prefill = jax.jit(self._prefill_cache)
        self._decode = jax.jit(self._decode_steps, static_argnames=("steps",))
        self._beam_search = jax.jit(
            self._beam_search_tokens, static_argnames=("max_new_tokens", "num_beams")
        )
        self._warned_truncation = False

    def generate(self, prompts, max_new_tokens, stop=(), num_beams=1, progress=None):
        """The text generated after each prompt, cut before the first stop string.

        Args:
            prompts: token id lists, each starting with the start token.
            max_new_tokens: the most tokens generated per prompt.
            stop: strings that end a continuation (not included in the text).
            num_beams: 1 for greedy decoding, more for beam search.
            progress: optional callable, called with the number of prompts just finished.

        Returns:
            One string per prompt, in their order.
        """
        if not isinstance(max_new_tokens, int) or not 0 < max_new_tokens < self.max_length:
            raise ValueError(
                f"max_new_tokens must be an integer in [1, max_length={self.max_length}), got "
                f"{max_new_tokens!r}: the prompt needs room too."
            )
        check_positive_integers(num_beams=num_beams)
        stop = [text for text in stop if text]
        longest_prompt = self.max_length - max_new_tokens
        prompts = [self._truncated(list(prompt), longest_prompt) for prompt in prompts]
        texts = [None] * len(prompts)
        order = sorted(range(len(prompts)), key=lambda index: -len(prompts[index]))
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            buffers = self._buffers([prompts[index] for index in batch], max_new_tokens)
            if num_beams == 1:
                generated = self._greedy_batch(buffers, len(batch), max_new_tokens, stop)
            else:
                generated = self._beam_batch(buffers, len(batch), max_new_tokens, num_beams)
            for index, token_ids in zip(batch, generated):
                texts[index] = _cut_at_stop(self._detokenize(token_ids), stop)
            if progress is not None:
                progress(len(batch))
        return texts

    def _truncated(self, prompt, longest):
        if len(prompt) <= longest:
            return prompt
        if not self._warned_truncation:
            self._warned_truncation = True
            logger.warning(
                "A prompt of %d tokens leaves no room for the continuation within "
                "max_length=%d: its oldest tokens are dropped (left truncation; said once).",
                len(prompt),
                self.max_length,
            )
        return prompt[-longest:]

    def _detokenize(self, token_ids):
        end = self.tokenizer.end_token_id
        if end in token_ids:
            token_ids = token_ids[: token_ids.index(end)]
        return self.tokenizer.detokenize(token_ids) if token_ids else ""

    def _buffers(self, prompts, max_new_tokens):
        """`(token_ids, padding_mask)` `[rows, prompt_width + max_new_tokens]`: the prompts
        left-padded to `prompt_width` (`padded_width` of the longest), the padding mask False at
        the padding and on spare rows."""
        num_rows = padded_rows(len(prompts), self.batch_size)
        prompt_width = padded_width(
            max(map(len, prompts)), self.max_length - max_new_tokens
        )
        token_ids = np.zeros((num_rows, prompt_width + max_new_tokens), "int32")
        padding_mask = np.zeros(token_ids.shape, bool)
        for row, prompt in enumerate(prompts):
            token_ids[row, prompt_width - len(prompt) : prompt_width] = prompt
            padding_mask[row, prompt_width - len(prompt) :] = True
        return token_ids, padding_mask

    def _greedy_batch(self, buffers, num_prompts, max_new_tokens, stop):
        token_ids, padding_mask = buffers
        prompt_width = token_ids.shape[1] - max_new_tokens
        state = model_state(self.causal_lm)
        cache = self._prefill(state, token_ids[:, :prompt_width], padding_mask)
        done = np.arange(len(token_ids)) >= num_prompts  # Spare rows never generate.
        index = prompt_width
        end = self.tokenizer.end_token_id
        while not done.all() and index < token_ids.shape[1]:
            token_ids, cache, index, done = self._decode(
                state, token_ids, padding_mask, cache, index, done, steps=self.check_every
            )
            host_ids, index, done = np.asarray(token_ids), int(index), np.array(done)
            for row in range(num_prompts):
                if done[row]:
                    continue
                generated = host_ids[row, prompt_width:index].tolist()
                done[row] = len(generated) >= max_new_tokens or end in generated
                if stop and not done[row]:
                    text = self._detokenize(generated)
                    done[row] = any(stop_text in text for stop_text in stop)
        host_ids = np.asarray(token_ids)
        return [host_ids[row, prompt_width:index].tolist() for row in range(num_prompts)]

    def _beam_batch(self, buffers, num_prompts, max_new_tokens, num_beams):
        token_ids, padding_mask = buffers
        output = self._beam_search(
            model_state(self.causal_lm),
            token_ids,
            padding_mask,
            max_new_tokens=max_new_tokens,
            num_beams=num_beams,
        )
        return np.asarray(output)[:num_prompts, -max_new_tokens:].tolist()

    def _filled_cache(self, prompt_ids, padding_mask):
        """The KV cache (`GLaMCausalLM.empty_cache`, `width` positions) holding the
        left-padded prompts `prompt_ids` `[rows, prompt_width]`; `width` is `padding_mask`'s."""
        cache = self.causal_lm.empty_cache(*padding_mask.shape)
        # The prompts' logits are not needed (jit drops them): decoding starts from the cache.
        _, _, cache = self.causal_lm.call_with_cache(
            prompt_ids, cache, 0, padding_mask=padding_mask
        )
        return cache

    def _next_token_logits(self, token_ids, cache, index, padding_mask):
        """Logits `[rows, V]` after the token at `index - 1`, and the updated cache."""
        previous = jax.lax.dynamic_slice_in_dim(token_ids, index - 1, 1, axis=1)
        logits, hidden_states, cache = self.causal_lm.call_with_cache(
            previous, cache, index - 1, padding_mask=padding_mask
        )
        return logits[:, 0], hidden_states[:, 0], cache

    def _prefill_cache(self, state, prompt_ids, padding_mask):
        with stateless_scope(self.causal_lm, state):
            return self._filled_cache(prompt_ids, padding_mask)

    def _decode_steps(self, state, token_ids, padding_mask, cache, index, done, steps):
        width = token_ids.shape[1]
        end = self.tokenizer.end_token_id
        sampler = self._greedy

        def keep_going(carry):
            _, _, index, done, step = carry
            return (step < steps) & (index < width) & ~jnp.all(done)

        def step_once(carry):
            token_ids, cache, index, done, step = carry
            logits, _, cache = self._next_token_logits(token_ids, cache, index, padding_mask)
            next_token = sampler.get_next_token(sampler.compute_probabilities(logits))
            next_token = next_token.astype(token_ids.dtype)
            token_ids = jax.lax.dynamic_update_slice(token_ids, next_token[:, None], (0, index))
            done = done | (next_token == end)
            return token_ids, cache, index + 1, done, step + 1

        with stateless_scope(self.causal_lm, state):
            carry = (token_ids, cache, jnp.asarray(index, "int32"), done, 0)
            token_ids, cache, index, done, _ = jax.lax.while_loop(keep_going, step_once, carry)
        return token_ids, cache, index, done

    def _beam_search_tokens(self, state, token_ids, padding_mask, max_new_tokens, num_beams):
        prompt_width = token_ids.shape[1] - max_new_tokens
        end = self.tokenizer.end_token_id
        # The sampler repeats every row `num_beams` times (and reorders beams within a row
        # only), so each beam reads its row's padding mask repeated alike.
        beam_padding_mask = jnp.repeat(padding_mask, num_beams, axis=0)
        # Spare rows (no prompt) count as finished from the start.
        spare = ~jnp.any(beam_padding_mask, axis=1)
        generated = jnp.arange(token_ids.shape[1]) >= prompt_width

        def next(token_ids, cache, index):
            logits, hidden_states, cache = self._next_token_logits(
                token_ids, cache, index, beam_padding_mask
            )
            written = generated & (jnp.arange(token_ids.shape[1]) < index)
            finished = spare | jnp.any((token_ids == end) & written, axis=1)
            # A finished beam adds log-probability 0 (another end token) at every later step.
            frozen_logits = jnp.where(jnp.arange(logits.shape[1]) == end, 0.0, -1e9)
            logits = jnp.where(finished[:, None], frozen_logits.astype(logits.dtype), logits)
            return logits, hidden_states, cache

        with stateless_scope(self.causal_lm, state):
            cache = self._filled_cache(token_ids[:, :prompt_width], padding_mask)
            # `mask` (the prompts' positions) keeps the prompts out of the search for end
            # tokens: the loop stops once every beam of every row has one.
            return keras_hub.samplers.BeamSampler(num_beams=num_beams)(
                next=next,
                prompt=token_ids,
                cache=cache,
                index=prompt_width,
                mask=jnp.broadcast_to(~generated, token_ids.shape),
                stop_token_ids=(end,),
                model=self.causal_lm,
            )


def _cut_at_stop(text, stop):
    """`text` up to the first occurrence of any stop string (lm-eval's rule)."""
    for stop_text in stop:
        text = text.split(stop_text)[0]
    return text
