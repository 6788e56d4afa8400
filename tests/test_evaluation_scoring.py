"""Batched scoring and decoding of keras_glam.evaluation against the model's own logits."""

import logging
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

import keras_glam
from keras_glam.evaluation import BatchedGenerator
from keras_glam.evaluation import TokenScorer
from keras_glam.evaluation import load_causal_lm
from keras_glam.evaluation import perplexity
from keras_glam.evaluation import rolling_windows
from keras_glam.evaluation.token_scorer import ContinuationTooLongError
from keras_glam.evaluation.token_scorer import context_rows_per_pass
from keras_glam.evaluation.token_scorer import continuation_rows_per_pass
from keras_glam.evaluation.token_scorer import padded_width

MAX_LENGTH = 64


@pytest.fixture(scope="module")
def causal_lm():
    """glam_tiny_8e (MoE on layer 0) with the shipped tokenizer, random weights."""
    keras.utils.set_random_seed(7)
    lm = keras_glam.GLaMCausalLM.from_preset("glam_tiny_8e", sequence_length=MAX_LENGTH)
    lm.compile(sampler="greedy")
    return lm


@pytest.fixture(scope="module")
def scorer(causal_lm):
    """One auto-sized scorer: the tests that use it share its compiled passes."""
    return TokenScorer(causal_lm, MAX_LENGTH)


REFERENCE_WIDTH = 128


def model_logits(causal_lm, token_ids):
    """float64 logits of one sequence from the model's own (eager) forward pass.

    Padded on the right to one width, masked, so that JAX's per-operation compilations are
    reused: causal attention keeps the real positions' logits independent of the padding.
    """
    length = len(token_ids)
    ids = np.zeros((1, REFERENCE_WIDTH), "int32")
    ids[0, :length] = token_ids
    mask = (np.arange(REFERENCE_WIDTH) < length)[None].astype("int32")
    logits = causal_lm({"token_ids": ids, "padding_mask": mask})
    return np.asarray(logits, "float64")[0, :length]


def direct_log_probs(causal_lm, token_ids):
    """`log p(token_ids[i + 1] | token_ids[: i + 1])` and whether each is the argmax (float64)."""
    logits = model_logits(causal_lm, token_ids)
    shifted = logits - logits.max(-1, keepdims=True)
    log_softmax = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    targets = np.asarray(token_ids[1:])
    return log_softmax[np.arange(len(targets)), targets], logits.argmax(-1)[:-1] == targets


def direct_score(causal_lm, context, continuation):
    log_probs, greedy = direct_log_probs(causal_lm, [*context, *continuation])
    return log_probs[-len(continuation) :].sum(), bool(greedy[-len(continuation) :].all())


def random_requests(seed, count, vocabulary=4096):
    rng = np.random.default_rng(seed)
    return [
        (
            [2, *rng.integers(3, vocabulary, rng.integers(0, 30)).tolist()],
            rng.integers(3, vocabulary, rng.integers(1, 8)).tolist(),
        )
        for _ in range(count)
    ]


def test_padded_widths_are_few_and_cover_the_length():
    widths = {padded_width(n, 1024) for n in range(1, 1025)}
    assert len(widths) <= 30
    for n in (1, 16, 17, 100, 513, 1024):
        assert n <= padded_width(n, 1024) <= max(16, 1.25 * n)


def test_each_log_likelihood_equals_the_direct_computation(causal_lm, scorer):
    # Mixed lengths in one pass (test_shared_contexts...[2] splits them over several passes).
    requests = random_requests(0, 6)
    scored = scorer.score(requests)
    for (context, continuation), (log_prob, is_greedy) in zip(requests, scored):
        expected, expected_greedy = direct_score(causal_lm, context, continuation)
        np.testing.assert_allclose(log_prob, expected, rtol=1e-5, atol=1e-4)
        assert is_greedy == expected_greedy


def test_results_follow_the_input_order(scorer):
    requests = random_requests(1, 9)
    forward = scorer.score(requests)
    permutation = np.random.default_rng(3).permutation(len(requests))
    permuted = scorer.score([requests[i] for i in permutation])
    np.testing.assert_allclose(
        [permuted[k][0] for k in range(len(requests))],
        [forward[i][0] for i in permutation],
        rtol=1e-5,
    )


def test_is_greedy_exact(causal_lm, scorer):
    context = [2, 100, 200, 300]
    tokens = list(context)
    for _ in range(3):  # The model's own argmax continuation, one token at a time.
        tokens.append(int(model_logits(causal_lm, tokens)[-1].argmax()))
    greedy = tokens[len(context) :]
    other = [*greedy[:-1], (greedy[-1] + 1) % 4096]
    scored = scorer.score([(context, greedy), (context, other)])
    assert scored[0][1] is True
    assert scored[1][1] is False


@pytest.mark.parametrize("batch_size", [pytest.param(2, marks=pytest.mark.slow), None])
def test_shared_contexts_score_as_the_direct_computation(causal_lm, scorer, batch_size):
    # Several choices per context, contexts of 1 (`<s>` alone: an empty context) to 31 tokens,
    # continuations of 1 to 9 tokens, among them the model's own greedy continuations; shuffled.
    # batch_size=2 splits contexts and continuations over several passes.
    rng = np.random.default_rng(11)
    contexts = [[2], [2, *rng.integers(3, 4096, 5)], [2, *rng.integers(3, 4096, 30)],
                [2, *rng.integers(3, 4096, 12)]]
    requests = []
    for context in contexts:
        context = [int(token) for token in context]
        greedy = list(context)
        for _ in range(3):
            greedy.append(int(model_logits(causal_lm, greedy)[-1].argmax()))
        requests.append((context, greedy[len(context) : len(context) + 1]))
        requests.append((context, greedy[len(context) :]))
        for length in (1, 4, 9):
            requests.append((context, rng.integers(3, 4096, length).tolist()))
    requests = [requests[index] for index in rng.permutation(len(requests))]
    if batch_size is not None:
        scorer = TokenScorer(causal_lm, MAX_LENGTH, batch_size=batch_size)
    scored = scorer.score(requests)
    greedy_count = 0
    for (context, continuation), (log_prob, is_greedy) in zip(requests, scored):
        expected, expected_greedy = direct_score(causal_lm, context, continuation)
        np.testing.assert_allclose(log_prob, expected, rtol=1e-5, atol=1e-4)
        assert is_greedy == expected_greedy
        greedy_count += is_greedy
    assert greedy_count >= 2 * len(contexts)  # The greedy choices, at least.


def test_context_passes_are_sized_by_tokens_not_by_logits_they_do_not_compute():
    # A context pass projects one position per row: a large vocabulary must not shrink it.
    for width in (16, 64, 256, 1024):
        assert context_rows_per_pass(width, 32000) == context_rows_per_pass(width, 4096)
        assert context_rows_per_pass(width, 32000) == 2048 // width
    assert context_rows_per_pass(64, 32000, batch_size=3) == 3
    # Continuation passes project every position: 32 MiB of float32 logits at most.
    for width in (1, 4, 16, 64):
        rows = continuation_rows_per_pass(width, 64, 32000)
        assert rows * width * 32000 * 4 <= 2**25 and rows & (rows - 1) == 0
        assert 2 * rows * width * 32000 * 4 > 2**25 or 2 * rows * (64 + width) > 8192


def _recorded_shapes(vocabulary, requests, batch_size):
    """The shapes of the compiled passes a scorer runs on `requests`, its model faked."""
    import types

    embedding = types.SimpleNamespace(input_dim=vocabulary)
    fake_lm = types.SimpleNamespace(
        backbone=types.SimpleNamespace(token_embedding=embedding),
        trainable_variables=[],
        non_trainable_variables=[],
    )
    scorer = TokenScorer(fake_lm, 2048, batch_size)
    context_shapes, continuation_shapes = set(), set()

    def context_pass(state, token_ids, padding_mask):
        context_shapes.add(token_ids.shape)
        rows, width = token_ids.shape
        cache = ((np.zeros((rows, 1, width, 1), "float32"),) * 2,)
        return cache, np.zeros((rows, vocabulary), "float32"), np.zeros(rows, "int32")

    def copy_caches(cache, context_rows, width):
        assert width >= cache[0][0].shape[2]
        return ((np.zeros((len(context_rows), 1, width, 1), "float32"),) * 2,)

    def continuation_pass(state, cache, padding_mask, token_ids, targets):
        assert padding_mask.shape[1] == cache[0][0].shape[2] + token_ids.shape[1]
        continuation_shapes.add((cache[0][0].shape[2], token_ids.shape))
        return np.zeros(token_ids.shape, "float32"), np.zeros(token_ids.shape, bool)

    scorer._context_pass = context_pass
    scorer._copy_caches = copy_caches
    scorer._continuation_pass = continuation_pass
    scorer.score(requests)
    return context_shapes, continuation_shapes


@pytest.mark.parametrize("vocabulary, batch_size", [(4096, 8), (32000, None)])
def test_an_arc_like_run_compiles_few_programs(vocabulary, batch_size):
    # 250 questions x 4 choices, contexts of 20-80 tokens, answers of 1-30 (ARC-Challenge).
    rng = np.random.default_rng(0)
    requests = []
    for _ in range(250):
        context = [2, *rng.integers(3, 4000, rng.integers(20, 80)).tolist()]
        requests += [(context, rng.integers(3, 4000, rng.integers(1, 30)).tolist()) for _ in "abcd"]
    context_shapes, continuation_shapes = _recorded_shapes(vocabulary, requests, batch_size)
    # Before: 9 + 42 programs at batch_size=8, 9 + 43 (59 context passes) at V=32000.
    assert len(context_shapes) <= 9 and len(continuation_shapes) <= 20
    for cache_width, (rows, _) in continuation_shapes:
        assert rows & (rows - 1) == 0 and cache_width & (cache_width - 1) == 0


def test_continuations_longer_than_max_length_are_refused_naming_the_request(causal_lm):
    scorer = TokenScorer(causal_lm, max_length=8)
    with pytest.raises(ContinuationTooLongError, match=r"Request 1 .* 9 tokens, more than max_len"
                       r"gth=8 .*raise max_length \(glam-eval --max-length\) to at least 9"):
        scorer.score([([2, 5], [6]), ([2, 5], list(range(10, 19)))])


def test_too_long_requests_lose_their_oldest_tokens_with_one_warning(causal_lm, caplog):
    rng = np.random.default_rng(4)
    long_context = [2, *rng.integers(3, 4096, 80).tolist()]
    continuation = [11, 12, 13]
    scorer = TokenScorer(causal_lm, max_length=32)
    with caplog.at_level(logging.WARNING, logger="keras_glam.evaluation.token_scorer"):
        (log_prob, _), _ = scorer.score([(long_context, continuation)] * 2)
    kept = [*long_context, *continuation][-33:]
    expected, _ = direct_score(causal_lm, kept[:-3], continuation)
    np.testing.assert_allclose(log_prob, expected, rtol=1e-5, atol=1e-4)
    assert sum("left truncation" in record.message for record in caplog.records) == 1


def test_rolling_windows_are_lm_evals():
    utils = pytest.importorskip("lm_eval.utils")
    tokens = list(range(10, 33))
    for max_length in (1, 2, 5, 8, 23, 24, 40):
        expected = [
            tuple(map(list, utils.make_disjoint_window(window)))
            for window in utils.get_rolling_token_windows(tokens, 2, max_length, context_len=1)
        ]
        assert [tuple(w) for w in rolling_windows(tokens, 2, max_length)] == expected


def test_rolling_log_likelihood_is_the_sum_over_a_one_window_document(causal_lm):
    document = np.random.default_rng(5).integers(3, 4096, 30).tolist()
    (total,) = TokenScorer(causal_lm, MAX_LENGTH).score_documents([document], 2)
    log_probs, _ = direct_log_probs(causal_lm, [2, *document])
    np.testing.assert_allclose(total, log_probs.sum(), rtol=1e-5)


@pytest.mark.parametrize("window", [4, 7, 16, 31])
def test_rolling_log_likelihood_is_consistent_across_window_sizes(causal_lm, window):
    # Reference: every token scored once, after the `window` tokens before it at most, counted
    # from whole-window forward passes computed here independently of `rolling_windows`.
    document = np.random.default_rng(6).integers(3, 4096, 30).tolist()
    sequence = [2, *document]
    expected, predicted = 0.0, 0
    while predicted < len(document):
        end = min(predicted + window, len(document))
        start = max(0, end - window)  # Index in `sequence` of the first input token.
        log_probs, _ = direct_log_probs(causal_lm, sequence[start : end + 1])
        expected += log_probs[predicted - start :].sum()
        predicted = end
    (total,) = TokenScorer(causal_lm, window).score_documents([document], 2)
    np.testing.assert_allclose(total, expected, rtol=1e-5)


def test_perplexity_reports_nats_per_token_and_bits_per_byte(causal_lm):
    texts = ["def f(x):\n    return x + 1\n", "The assert statement checks a condition."]
    result = perplexity(causal_lm, texts, max_length=MAX_LENGTH)
    tokenizer = causal_lm.preprocessor.tokenizer
    total, tokens = 0.0, 0
    for text in texts:
        ids = tokenizer.tokenize(text).tolist()
        total += direct_log_probs(causal_lm, [tokenizer.start_token_id, *ids])[0].sum()
        tokens += len(ids)
    num_bytes = sum(len(text.encode()) for text in texts)
    assert (result.tokens, result.bytes, result.documents) == (tokens, num_bytes, 2)
    np.testing.assert_allclose(result.nats_per_token, -total / tokens, rtol=1e-5)
    np.testing.assert_allclose(result.bits_per_byte, -total / np.log(2) / num_bytes, rtol=1e-5)


def greedy_references(causal_lm, prompts, new_tokens):
    """The text `GLaMCausalLM.generate` (greedy) continues each prompt with, and the prompts' ids.

    One batched call of keras-hub's own generation loop on token ids (greedy rows do not depend
    on each other): `new_tokens` tokens after `<s> + prompt`, or fewer up to `</s>`.
    """
    tokenizer = causal_lm.preprocessor.tokenizer
    token_prompts = [[tokenizer.start_token_id, *tokenizer.tokenize(p).tolist()] for p in prompts]
    width = max(map(len, token_prompts)) + new_tokens
    token_ids = np.zeros((len(prompts), width), "int32")
    for row, prompt in enumerate(token_prompts):
        token_ids[row, : len(prompt)] = prompt
    plain = keras_glam.GLaMCausalLM(causal_lm.backbone, preprocessor=None)
    plain.compile(sampler="greedy")
    output = plain.generate(
        {"token_ids": token_ids, "padding_mask": token_ids != 0}, stop_token_ids=None
    )["token_ids"]
    texts = []
    for row, prompt in enumerate(token_prompts):
        generated = np.asarray(output)[row, len(prompt) : len(prompt) + new_tokens].tolist()
        if tokenizer.end_token_id in generated:
            generated = generated[: generated.index(tokenizer.end_token_id)]
        texts.append(tokenizer.detokenize(generated) if generated else "")
    return texts, token_prompts


@pytest.mark.slow
def test_greedy_generation_equals_generate_cut_at_the_stop_string(causal_lm):
    prompts = ["def main():", "The quick brown fox", "x", "import os\nimport sys"]
    references, token_prompts = greedy_references(causal_lm, prompts, 12)
    stop = references[1][3:5]  # Cuts at least the second continuation.
    assert stop
    generator = BatchedGenerator(causal_lm, MAX_LENGTH, batch_size=4, check_every=3)
    texts = generator.generate(token_prompts, 12, stop=[stop])
    assert texts == [reference.split(stop)[0] for reference in references]
    assert len(texts[1]) < len(references[1])


@pytest.mark.slow
def test_beam_search_equals_generate_with_a_beam_sampler(causal_lm):
    import keras_hub

    tokenizer = causal_lm.preprocessor.tokenizer
    prompts = ["def main():", "class A:", "The quick brown fox"]
    generator = BatchedGenerator(causal_lm, MAX_LENGTH, batch_size=4)
    token_prompts = [[tokenizer.start_token_id, *tokenizer.tokenize(p).tolist()] for p in prompts]
    texts = generator.generate(token_prompts, 8, num_beams=3)
    beam_lm = keras_glam.GLaMCausalLM(causal_lm.backbone, causal_lm.preprocessor)
    beam_lm.compile(sampler=keras_hub.samplers.BeamSampler(num_beams=3))
    expected = [
        beam_lm.generate(prompt, max_length=len(ids) + 8, strip_prompt=True)
        for prompt, ids in zip(prompts, token_prompts)
    ]
    assert texts == expected


def generated_alone(causal_lm, sampler, token_prompt, new_tokens):
    """The text `GLaMCausalLM.generate` continues one prompt (token ids) with, by itself."""
    tokenizer = causal_lm.preprocessor.tokenizer
    plain = keras_glam.GLaMCausalLM(causal_lm.backbone, preprocessor=None)
    plain.compile(sampler=sampler)
    token_ids = np.zeros((1, len(token_prompt) + new_tokens), "int32")
    token_ids[0, : len(token_prompt)] = token_prompt
    output = plain.generate(
        {"token_ids": token_ids, "padding_mask": token_ids != 0}, stop_token_ids=None
    )["token_ids"]
    generated = np.asarray(output)[0, len(token_prompt) :].tolist()
    if tokenizer.end_token_id in generated:
        generated = generated[: generated.index(tokenizer.end_token_id)]
    return tokenizer.detokenize(generated) if generated else ""


MIXED_PROMPTS = [
    "x",
    "The assert statement checks a condition and raises an error when the condition is false, "
    "with an optional message that explains what went wrong in the program.",
    "def main():",
    "import os",
]


@pytest.mark.slow
def test_left_padded_greedy_batches_equal_generate_one_prompt_at_a_time(causal_lm):
    # Prompts of 2 to about 35 tokens in one left-padded batch.
    tokenizer = causal_lm.preprocessor.tokenizer
    token_prompts = [[tokenizer.start_token_id, *tokenizer.tokenize(p).tolist()] for p in MIXED_PROMPTS]
    assert max(map(len, token_prompts)) >= 10 * min(map(len, token_prompts))
    references = [generated_alone(causal_lm, "greedy", p, 10) for p in token_prompts]
    stop = references[1][2:4]
    assert stop
    generator = BatchedGenerator(causal_lm, MAX_LENGTH, batch_size=4, check_every=3)
    texts = generator.generate(token_prompts, 10, stop=[stop])
    assert texts == [reference.split(stop)[0] for reference in references]


@pytest.mark.slow
def test_beam_batches_of_mixed_lengths_equal_beam_search_one_prompt_at_a_time(causal_lm):
    import keras_hub

    tokenizer = causal_lm.preprocessor.tokenizer
    token_prompts = [[tokenizer.start_token_id, *tokenizer.tokenize(p).tolist()] for p in MIXED_PROMPTS]
    sampler = keras_hub.samplers.BeamSampler(num_beams=3)
    references = [generated_alone(causal_lm, sampler, p, 6) for p in token_prompts]
    generator = BatchedGenerator(causal_lm, MAX_LENGTH, batch_size=4)
    assert generator.generate(token_prompts, 6, num_beams=3) == references


def reference_beam_search(log_probs, last_token, steps, num_beams, end):
    """Beam search over a Markov table `log_probs[last, next]`, with finished hypotheses: a
    beam that produced `end` keeps its score and its slot. The best beam's tokens before `end`."""
    beams = [((), 0.0)]
    for _ in range(steps):
        candidates = []
        for tokens, score in beams:
            if end in tokens:
                candidates.append((tokens, score))
                continue
            last = tokens[-1] if tokens else last_token
            candidates += [
                ((*tokens, token), score + log_prob)
                for token, log_prob in enumerate(log_probs[last])
            ]
        beams = sorted(candidates, key=lambda beam: -beam[1])[:num_beams]
    tokens = max(beams, key=lambda beam: beam[1])[0]
    return list(tokens[: tokens.index(end)] if end in tokens else tokens)


def test_beam_search_keeps_finished_beams_and_never_ranks_text_after_the_end_token(causal_lm):
    import jax.numpy as jnp

    tokenizer = causal_lm.preprocessor.tokenizer
    start, end, vocabulary = tokenizer.start_token_id, tokenizer.end_token_id, 8
    rng = np.random.default_rng(5)
    table = rng.normal(0, 2, (vocabulary, vocabulary))
    # After `<s>`: `</s>` (-0.5) or "3" (-1.0), then "3 </s>" (-0.1); text after `</s>` costs
    # about 1 per token. Ranked on text after `</s>`, "3" would win; GLaM's beam search says "".
    table[start] = -20.0
    table[start, end], table[start, 3] = 0.0, -0.5
    table[3] = -3.0
    table[3, end] = 0.0
    table[end] = -1.0
    table[end, 5] = 1.0
    log_probs = table - np.log(np.exp(table).sum(-1, keepdims=True))
    assert log_probs[start, end] > log_probs[start, 3] + log_probs[3, end]

    def markov_logits(token_ids, cache, index, padding_mask):
        last = jnp.take_along_axis(token_ids, jnp.full((len(token_ids), 1), index - 1), axis=1)
        return jnp.asarray(log_probs, "float32")[last[:, 0]], None, cache

    generator = BatchedGenerator(causal_lm, MAX_LENGTH, batch_size=4)
    generator._next_token_logits = markov_logits  # Hand-made log-probabilities, tiny vocabulary.
    generator._filled_cache = lambda prompt_ids, padding_mask: ()
    prompts = [[start], [start, 100, 200, 6], [start, 300, 7]]
    assert generator.generate(prompts, 5, num_beams=3)[0] == ""
    # The tokens (ids below 8 mostly decode to ""), one batch of mixed lengths and a spare row.
    generated = generator._beam_batch(generator._buffers(prompts, 5), len(prompts), 5, 3)
    generated = [tokens[: tokens.index(end)] if end in tokens else tokens for tokens in generated]
    expected = [reference_beam_search(log_probs, prompt[-1], 5, 3, end) for prompt in prompts]
    assert expected[0] == [] and any(expected[1:])
    assert generated == expected


def test_models_without_a_tokenizer_are_refused_before_building():
    with pytest.raises(ValueError, match="has no tokenizer"):
        load_causal_lm("glam_64b_64e")  # 1.2T parameters: only a check can be this quick.


@pytest.mark.slow
def test_the_package_imports_without_lm_eval_and_says_how_to_install_it():
    script = textwrap.dedent(
        """
        import sys

        class NoLmEval:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "lm_eval":
                    raise ModuleNotFoundError(f"No module named {name!r}", name=name)

        sys.meta_path.insert(0, NoLmEval())
        import keras_glam.evaluation as evaluation

        assert callable(evaluation.perplexity) and len(evaluation.GLAM_TASKS) == 29
        try:
            evaluation.GLaMLM
        except ImportError as error:
            print(error)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env={**os.environ, "KERAS_BACKEND": "jax"},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'pip install "keras-glam[eval]"' in result.stdout
