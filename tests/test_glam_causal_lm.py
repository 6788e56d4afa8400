import numpy as np
import pytest
from glam_inputs import glam_inputs as _inputs

import keras_glam


def _lm(config, **kwargs):
    return keras_glam.GLaMCausalLM(keras_glam.GLaMBackbone(**config, **kwargs))


def test_logits_are_the_tied_embedding_scaled_by_inverse_sqrt_hidden(tiny_config):
    lm = _lm(tiny_config)
    inputs = _inputs([[1, 2, 3]])
    hidden = np.asarray(lm.backbone(inputs))
    table = np.asarray(lm.backbone.token_embedding.embeddings)
    expected = hidden * tiny_config["hidden_dim"] ** -0.5 @ table.T
    logits = lm(inputs)
    assert logits.dtype == "float32"
    np.testing.assert_allclose(np.asarray(logits), expected, rtol=1e-5, atol=1e-5)


def test_cached_decoding_equals_the_full_forward_pass(tiny_config):
    lm = _lm(tiny_config)
    token_ids = np.random.default_rng(0).integers(1, 97, size=(2, 9)).astype("int32")
    full = np.asarray(lm(_inputs(token_ids)))
    cache = lm.empty_cache(2, 9)
    # Prompt of 4 in one call, then one token at a time.
    logits, _, cache = lm.call_with_cache(token_ids[:, :4], cache, 0)
    steps = [np.asarray(logits)]
    for index in range(4, 9):
        logits, _, cache = lm.call_with_cache(token_ids[:, index : index + 1], cache, index)
        steps.append(np.asarray(logits))
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=2e-5)


def test_a_cache_of_the_wrong_form_or_mask_is_one_clear_error(tiny_config):
    lm = _lm(tiny_config)
    token_ids = np.array([[2, 5, 6]], dtype="int32")
    cache = lm.empty_cache(1, 8)
    stacked = tuple(np.stack(pair, axis=1) for pair in cache)  # The old per-layer layout.
    bad_caches = (
        (stacked, "a tuple of 3 items of type ndarray"),
        (cache[:-1], "a tuple of 2 items of type tuple"),
        (list(cache), "list"),
    )
    for bad, found in bad_caches:
        with pytest.raises(ValueError, match=f"tuple of 3 per-layer .*got {found}.*empty_cache"):
            lm.call_with_cache(token_ids, bad, 0)
    with pytest.raises(ValueError, match=r"whole cache, \[batch, max_len\] = \[1, 8\], got shape \[1, 4\]"):
        lm.call_with_cache(token_ids, cache, 0, padding_mask=np.ones((1, 4), bool))


@pytest.mark.slow
def test_left_padded_cached_rows_equal_their_unpadded_forward_pass(tiny_config):
    # Rows of 3, 7 and 10 tokens left-padded to 10 share one cache; each row's logits, in the
    # prompt pass and in two cached decoding steps, must equal the plain forward pass on that
    # row's own tokens alone.
    lm = _lm(tiny_config)
    rng = np.random.default_rng(5)
    lengths, width, steps = (3, 7, 10), 10, 2
    sequences = [rng.integers(1, 97, size=n + steps).tolist() for n in lengths]
    token_ids = np.zeros((3, width + steps), "int32")
    padding_mask = np.zeros((3, width + steps), bool)
    for row, (sequence, n) in enumerate(zip(sequences, lengths)):
        token_ids[row, width - n :] = sequence
        padding_mask[row, width - n :] = True
    cache = lm.empty_cache(3, width + steps)
    logits, _, cache = lm.call_with_cache(token_ids[:, :width], cache, 0, padding_mask)
    outputs = [np.asarray(logits)]
    for index in range(width, width + steps):
        logits, _, cache = lm.call_with_cache(
            token_ids[:, index : index + 1], cache, index, padding_mask=padding_mask
        )
        outputs.append(np.asarray(logits))
    padded = np.concatenate(outputs, axis=1)
    for row, (sequence, n) in enumerate(zip(sequences, lengths)):
        expected = np.asarray(lm(_inputs([sequence])))[0]
        np.testing.assert_allclose(padded[row, width - n :], expected, rtol=1e-5, atol=1e-5)


def test_output_logits_of_some_positions_equal_the_models_logits(tiny_config):
    lm = _lm(tiny_config, pad_vocabulary_to_multiple_of=8)  # Padding rows masked here too.
    inputs = _inputs(np.random.default_rng(6).integers(1, 97, size=(2, 6)))
    positions = np.array([[5], [2]])
    hidden = np.take_along_axis(np.asarray(lm.backbone(inputs)), positions[..., None], axis=1)
    expected = np.take_along_axis(np.asarray(lm(inputs)), positions[..., None], axis=1)
    np.testing.assert_allclose(np.asarray(lm.output_logits(hidden)), expected, atol=1e-5)


def test_greedy_generation_equals_a_step_by_step_argmax_of_full_passes(tiny_config):
    lm = _lm(tiny_config)
    lm.compile(sampler="greedy")
    prompt = [5, 6, 7]
    tokens = list(prompt)
    for _ in range(6):
        logits = np.asarray(lm(_inputs([tokens])))
        tokens.append(int(np.argmax(logits[0, -1])))
    length = 9
    padded = np.zeros((1, length), "int32")
    padded[0, :3] = prompt
    mask = np.zeros((1, length), bool)
    mask[0, :3] = True
    out = lm.generate({"token_ids": padded, "padding_mask": mask}, stop_token_ids=None)
    assert out["token_ids"][0].tolist() == tokens


@pytest.mark.parametrize("sampler", ["top_k", "top_p", "random", "beam"])
def test_every_keras_hub_sampler_generates_valid_tokens(tiny_config, sampler):
    lm = _lm(tiny_config)
    lm.compile(sampler=sampler)
    padded = np.zeros((2, 8), "int32")
    padded[:, :2] = [[3, 4], [5, 6]]
    mask = padded != 0
    out = lm.generate({"token_ids": padded, "padding_mask": mask}, stop_token_ids=None)
    ids = np.asarray(out["token_ids"])
    assert ids.shape == (2, 8)
    np.testing.assert_array_equal(ids[:, :2], padded[:, :2])
    assert ids.min() >= 0 and ids.max() < tiny_config["vocabulary_size"]


def test_beam_search_finds_a_sequence_at_least_as_likely_as_greedy(tiny_config):
    lm = _lm(tiny_config)

    def log_prob(tokens, prompt_length):
        logits = np.asarray(lm(_inputs([tokens])))[0].astype("float64")
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        return sum(logp[i - 1, tokens[i]] for i in range(prompt_length, len(tokens)))

    padded = np.zeros((1, 7), "int32")
    padded[0, :2] = [8, 9]
    inputs = {"token_ids": padded, "padding_mask": padded != 0}
    lm.compile(sampler="greedy")
    greedy = np.asarray(lm.generate(inputs, stop_token_ids=None)["token_ids"])[0].tolist()
    lm.compile(sampler=keras_glam_beam(num_beams=4))
    beam = np.asarray(lm.generate(inputs, stop_token_ids=None)["token_ids"])[0].tolist()
    assert log_prob(beam, 2) >= log_prob(greedy, 2) - 1e-6


def keras_glam_beam(num_beams):
    import keras_hub

    return keras_hub.samplers.BeamSampler(num_beams=num_beams)


def test_generation_stops_at_a_stop_token(tiny_config):
    lm = _lm(tiny_config)
    lm.compile(sampler="greedy")
    padded = np.zeros((1, 10), "int32")
    padded[0, :2] = [3, 4]
    inputs = {"token_ids": padded, "padding_mask": padded != 0}
    free = np.asarray(lm.generate(inputs, stop_token_ids=None)["token_ids"])[0]
    stop = int(free[3])  # the second generated token
    out = lm.generate(inputs, stop_token_ids=[stop])
    first_stop = next(i for i in range(2, 10) if free[i] == stop)
    expected = [i <= first_stop for i in range(10)]
    assert np.asarray(out["padding_mask"])[0].tolist() == expected


def test_generate_rejects_out_of_range_prompt_ids(tiny_config):
    lm = _lm(tiny_config)
    padded = np.array([[3, 500, 0, 0]], "int32")
    with pytest.raises(ValueError, match=r"token_ids must lie in \[0, 97\)"):
        lm.generate({"token_ids": padded, "padding_mask": padded != 0}, stop_token_ids=None)


def test_mixed_bfloat16_keeps_logits_router_and_attention_in_float32(tiny_config):
    lm = _lm(tiny_config, dtype="mixed_bfloat16")
    logits = lm(_inputs([[1, 2, 3]]))
    assert logits.dtype == "float32"
    assert {w.dtype for w in lm.backbone.trainable_weights} == {"float32"}
    reference = _lm(tiny_config)
    reference.set_weights(lm.get_weights())
    np.testing.assert_allclose(
        np.asarray(logits), np.asarray(reference(_inputs([[1, 2, 3]]))), atol=0.15
    )


def test_lora_trains_only_adapters_and_keeps_outputs_at_start(tiny_config):
    lm = _lm(tiny_config)
    inputs = _inputs([[1, 2, 3, 4]])
    before = np.asarray(lm(inputs))
    lm.backbone.enable_lora(rank=2)
    np.testing.assert_allclose(np.asarray(lm(inputs)), before, atol=1e-6)
    trainable = {w.path for w in lm.trainable_weights}
    assert trainable and all("lora" in path for path in trainable)


def test_int8_quantization_runs_and_stays_close(tiny_config):
    lm = _lm(tiny_config)
    inputs = _inputs([[1, 2, 3, 4, 5]])
    before = np.asarray(lm(inputs))
    lm.quantize("int8")
    after = np.asarray(lm(inputs))
    assert any(w.dtype == "int8" for w in lm.weights)
    expert_kernels = [w for w in lm.weights if "expert_wi" in w.path]
    assert any(w.dtype == "int8" for w in expert_kernels)
    np.testing.assert_allclose(after, before, atol=0.2 * np.abs(before).max())
    lm.compile(sampler="greedy")
    padded = np.zeros((1, 6), "int32")
    padded[0, :2] = [3, 4]
    out = lm.generate({"token_ids": padded, "padding_mask": padded != 0}, stop_token_ids=None)
    assert np.asarray(out["token_ids"]).shape == (1, 6)
