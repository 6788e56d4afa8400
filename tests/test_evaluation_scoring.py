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
from keras_glam.evaluation.token_scorer import padded_width

MAX_LENGTH = 64


@pytest.fixture(scope="module")
def causal_lm():
    """glam_tiny_8e (MoE on layer 0) with the shipped tokenizer, random weights."""
    keras.utils.set_random_seed(7)
    lm = keras_glam.GLaMCausalLM.from_preset("glam_tiny_8e", sequence_length=MAX_LENGTH)
    lm.compile(sampler="greedy")
    return lm


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


def test_each_log_likelihood_equals_the_direct_computation(causal_lm):
    # Mixed lengths, 3 rows per pass: several requests share rows and passes.
    requests = random_requests(0, 11)
    scored = TokenScorer(causal_lm, MAX_LENGTH, batch_size=3).score(requests)
    for (context, continuation), (log_prob, is_greedy) in zip(requests, scored):
        expected, expected_greedy = direct_score(causal_lm, context, continuation)
        np.testing.assert_allclose(log_prob, expected, rtol=1e-5, atol=1e-4)
        assert is_greedy == expected_greedy


def test_results_follow_the_input_order(causal_lm):
    requests = random_requests(1, 9)
    scorer = TokenScorer(causal_lm, MAX_LENGTH, batch_size=2)
    forward = scorer.score(requests)
    permutation = np.random.default_rng(3).permutation(len(requests))
    permuted = scorer.score([requests[i] for i in permutation])
    np.testing.assert_allclose(
        [permuted[k][0] for k in range(len(requests))],
        [forward[i][0] for i in permutation],
        rtol=1e-5,
    )


def test_is_greedy_exact(causal_lm):
    context = [2, 100, 200, 300]
    tokens = list(context)
    for _ in range(3):  # The model's own argmax continuation, one token at a time.
        tokens.append(int(model_logits(causal_lm, tokens)[-1].argmax()))
    greedy = tokens[len(context) :]
    other = [*greedy[:-1], (greedy[-1] + 1) % 4096]
    scored = TokenScorer(causal_lm, MAX_LENGTH).score([(context, greedy), (context, other)])
    assert scored[0][1] is True
    assert scored[1][1] is False


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
