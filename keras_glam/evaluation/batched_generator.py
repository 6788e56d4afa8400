"""Continuations of many prompts at once: KV-cached, compiled, stopped by strings or tokens."""

import itertools
import logging

import jax
import jax.numpy as jnp
import keras
import keras_hub
import numpy as np

from keras_glam.evaluation.token_scorer import padded_width

logger = logging.getLogger(__name__)

DEFAULT_ROWS = 16


class BatchedGenerator:
    """Generates text after token prompts with a `GLaMCausalLM`, several prompts per batch.

    Greedy decoding (the default) runs `GLaMCausalLM.call_with_cache` one token at a time inside
    a compiled loop and, every `check_every` tokens, decodes each row and retires the rows that
    produced the end token, a stop string or `max_new_tokens` tokens; the batch ends when all
    rows are retired. Its tokens are exactly those of `generate()` with
    `keras_hub.samplers.GreedySampler` (the same prefill, the same cached steps, the same
    argmax). `num_beams > 1` decodes with `keras_hub.samplers.BeamSampler` through
    `GLaMCausalLM.generate_step` up to `max_new_tokens` (a beam search cannot stop at a string
    without changing its result); its text is cut at the first stop string afterwards.

    Prompts are sorted by length, batched with others of similar length (a batch decodes from
    its shortest prompt on) and padded to a few static widths (`padded_width`); a prompt longer
    than `max_length - max_new_tokens` loses its oldest tokens, with one warning.

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
        self._beam_search = jax.jit(self._beam_search_tokens, static_argnames=("num_beams",))
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
        if not isinstance(num_beams, int) or num_beams < 1:
            raise ValueError(f"num_beams must be a positive integer, got {num_beams!r}.")
        stop = [text for text in stop if text]
        longest_prompt = self.max_length - max_new_tokens
        prompts = [self._truncated(list(prompt), longest_prompt) for prompt in prompts]
        texts = [None] * len(prompts)
        # A batch decodes from its shortest prompt on, re-reading the longer prompts' tokens:
        # a spread of half the new tokens costs at most half more steps. keras-hub's
        # BeamSampler ranks beams by the top candidates' log-probabilities also where a longer
        # prompt's token is forced, so a row's beams would depend on its neighbours: beam
        # batches hold prompts of one length.
        max_spread = max(8, max_new_tokens // 2) if num_beams == 1 else 0
        for batch in self._batches(prompts, max_spread):
            batch_prompts = [prompts[index] for index in batch]
            if num_beams == 1:
                generated = self._greedy_batch(batch_prompts, max_new_tokens, stop)
            else:
                generated = self._beam_batch(batch_prompts, max_new_tokens, num_beams)
            for index, token_ids in zip(batch, generated):
                texts[index] = _cut_at_stop(self._detokenize(token_ids), stop)
            if progress is not None:
                progress(len(batch))
        return texts

    def _batches(self, prompts, max_spread):
        """Prompt indices, longest first, in batches of at most `batch_size` whose prompt
        lengths differ by at most `max_spread` tokens."""
        order = sorted(range(len(prompts)), key=lambda index: -len(prompts[index]))
        batch = []
        for index in order:
            if batch and (
                len(batch) == self.batch_size
                or len(prompts[batch[0]]) - len(prompts[index]) > max_spread
            ):
                yield batch
                batch = []
            batch.append(index)
        if batch:
            yield batch

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

    def _buffers(self, prompts, max_new_tokens, exact_width=False):
        """Right-padded prompt buffers `[rows, width]` and their prompt masks; spare rows masked.

        The width is `padded_width` of the longest prompt plus `max_new_tokens`, or exactly that
        sum with `exact_width` (a beam search picks its best beam at the buffer's end).
        """
        # Row counts rounded up to a multiple of 4 (or a power of two below): few shapes to
        # compile, at most 3 spare rows decoded for nothing.
        num_rows = min(
            self.batch_size, -(-len(prompts) // 4) * 4, 1 << (len(prompts) - 1).bit_length()
        )
        width = max(map(len, prompts)) + max_new_tokens
        if not exact_width:
            width = padded_width(width, self.max_length)
        token_ids = np.zeros((num_rows, width), "int32")
        prompt_mask = np.ones((num_rows, width), bool)
        prompt_mask[: len(prompts)] = False
        for row, prompt in enumerate(prompts):
            token_ids[row, : len(prompt)] = prompt
            prompt_mask[row, : len(prompt)] = True
        return token_ids, prompt_mask

    def _greedy_batch(self, prompts, max_new_tokens, stop):
        token_ids, prompt_mask = self._buffers(prompts, max_new_tokens)
        state = self._state()
        cache = self._prefill(state, token_ids)
        lengths = [len(prompt) for prompt in prompts]
        done = np.arange(len(token_ids)) >= len(prompts)  # Spare rows never generate.
        index = min(lengths)
        end = self.tokenizer.end_token_id
        while not done.all() and index < token_ids.shape[1]:
            token_ids, cache, index, done = self._decode(
                state, token_ids, prompt_mask, cache, index, done, steps=self.check_every
            )
            host_ids, index, done = np.asarray(token_ids), int(index), np.array(done)
            for row, length in enumerate(lengths):
                if done[row]:
                    continue
                generated = host_ids[row, length : min(index, length + max_new_tokens)].tolist()
                done[row] = len(generated) >= max_new_tokens or end in generated
                if stop and not done[row]:
                    text = self._detokenize(generated)
                    done[row] = any(stop_text in text for stop_text in stop)
        host_ids = np.asarray(token_ids)
        return [
            host_ids[row, length : min(index, length + max_new_tokens)].tolist()
            for row, length in enumerate(lengths)
        ]

    def _beam_batch(self, prompts, max_new_tokens, num_beams):
        # The prompt mask is the padding mask: spare rows, all prompt, never generate.
        token_ids, prompt_mask = self._buffers(prompts, max_new_tokens, exact_width=True)
        output = np.asarray(
            self._beam_search(self._state(), token_ids, prompt_mask, num_beams=num_beams)
        )
        return [
            output[row, len(prompt) : len(prompt) + max_new_tokens].tolist()
            for row, prompt in enumerate(prompts)
        ]

    def _state(self):
        model = self.causal_lm
        return (
            [variable.value for variable in model.trainable_variables],
            [variable.value for variable in model.non_trainable_variables],
        )

    def _scope(self, state):
        model = self.causal_lm
        mapping = itertools.chain(
            zip(model.trainable_variables, state[0]),
            zip(model.non_trainable_variables, state[1]),
        )
        return keras.StatelessScope(state_mapping=mapping)

    def _prefill_cache(self, state, token_ids):
        backbone = self.causal_lm.backbone
        rows, width = token_ids.shape
        shape = (rows, backbone.num_layers, 2, width, backbone.num_heads, backbone.head_dim)
        with self._scope(state):
            cache = jnp.zeros(shape, self.causal_lm.compute_dtype)
            _, _, cache = self.causal_lm.call_with_cache(token_ids, cache, 0)
        return cache

    def _decode_steps(self, state, token_ids, prompt_mask, cache, index, done, steps):
        width = token_ids.shape[1]
        end = self.tokenizer.end_token_id
        sampler = self._greedy

        def keep_going(carry):
            _, _, index, done, step = carry
            return (step < steps) & (index < width) & ~jnp.all(done)

        def step_once(carry):
            token_ids, cache, index, done, step = carry
            previous = jax.lax.dynamic_slice_in_dim(token_ids, index - 1, 1, axis=1)
            logits, _, cache = self.causal_lm.call_with_cache(previous, cache, index - 1)
            next_token = sampler.get_next_token(sampler.compute_probabilities(logits[:, 0]))
            in_prompt = jnp.take(prompt_mask, index, axis=1)
            next_token = jnp.where(in_prompt, jnp.take(token_ids, index, axis=1), next_token)
            next_token = next_token.astype(token_ids.dtype)
            token_ids = jax.lax.dynamic_update_slice(token_ids, next_token[:, None], (0, index))
            done = done | ((next_token == end) & ~in_prompt)
            return token_ids, cache, index + 1, done, step + 1

        with self._scope(state):
            carry = (token_ids, cache, jnp.asarray(index, "int32"), done, 0)
            token_ids, cache, index, done, _ = jax.lax.while_loop(keep_going, step_once, carry)
        return token_ids, cache, index, done

    def _beam_search_tokens(self, state, token_ids, padding_mask, num_beams):
        model = self.causal_lm
        # `generate_step` decodes with the model's own sampler: lend it a beam sampler while
        # this function is traced (GLaMCausalLM.generate_step takes no sampler argument).
        own_sampler = model.sampler
        model.sampler = keras_hub.samplers.BeamSampler(num_beams=num_beams)
        try:
            with self._scope(state):
                outputs = model.generate_step(
                    {"token_ids": token_ids, "padding_mask": padding_mask},
                    stop_token_ids=(self.tokenizer.end_token_id,),
                )
        finally:
            model.sampler = own_sampler
        return outputs["token_ids"]


def _cut_at_stop(text, stop):
    """`text` up to the first occurrence of any stop string (lm-eval's rule)."""
    for stop_text in stop:
        text = text.split(stop_text)[0]
    return text
