"""Sharded GLaM computes what one device computes: loss, gradients, training steps, tokens.

On 8 simulated CPU devices, a reference model without distribution and models under
`expert_parallel(data=2, expert=4)`, `expert_parallel(data=8)` and `expert_parallel(data=2,
expert=2, model=2)` (padded vocabulary) get the same weights. Routing groups decide capacity
and drops, so each reference uses the grouping of the mesh it is compared with: the
distributed models route one group per batch shard (`num_routing_groups=None`), the references
get that number explicitly. Prints `RESULT {json}` with the worst relative differences.
"""

import sys

import common

common.use_cpu_devices(8)

import jax  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from keras_glam import distribution as glam_distribution  # noqa: E402

TRAINING_STEPS = 3
PROMPT_LENGTH = 8


def loss_and_gradients(lm, batch, distribution=None):
    """One jitted loss and gradient of `lm` on `batch`, laid out like `fit` lays it out."""
    if distribution is not None:
        batch = jax.tree.map(
            lambda array: jax.device_put(
                array, distribution.get_data_layout(array.shape).backend_layout
            ),
            batch,
        )
    inputs, labels, weights = batch
    if not lm.optimizer.built:
        lm.optimizer.build(lm.trainable_variables)
    state = (
        [v.value for v in lm.trainable_variables],
        [v.value for v in lm.non_trainable_variables],
        [v.value for v in lm.metrics_variables],
    )
    optimizer_state = [v.value for v in lm.optimizer.variables]
    gradient_fn = jax.jit(
        jax.value_and_grad(lm.compute_loss_and_updates, has_aux=True),
        static_argnames="training",
    )
    (loss, _), gradients = gradient_fn(
        *state, inputs, labels, weights, training=True, optimizer_variables=optimizer_state
    )
    return float(loss), {
        v.path: np.asarray(g) for v, g in zip(lm.trainable_variables, gradients)
    }


def relative_difference(actual, expected):
    scale = max(float(np.max(np.abs(expected))), 1e-12)
    return float(np.max(np.abs(actual - expected))) / scale


def worst_difference(actual, expected):
    return max(relative_difference(actual[key], expected[key]) for key in expected)


def train(lm):
    """`fit` a few steps on a `tf.data` pipeline; per-step cross-entropy and final weights."""
    inputs, labels, weights = common.token_batch(seed=2, rows=common.BATCH_ROWS * TRAINING_STEPS)
    dataset = tf.data.Dataset.from_tensor_slices((inputs, labels, weights)).batch(
        common.BATCH_ROWS, drop_remainder=True
    )
    recorder = common.step_loss_recorder()
    lm.fit(dataset, epochs=1, shuffle=False, verbose=0, callbacks=[recorder])
    return recorder.losses, {v.path: np.asarray(v.value) for v in lm.trainable_variables}


def _prompts():
    """8 left-aligned prompts (one per batch shard: `generate` splits its batch like `fit`)."""
    rng = np.random.default_rng(3)
    lengths = rng.integers(2, 6, size=common.BATCH_ROWS)
    mask = (np.arange(PROMPT_LENGTH)[None, :] < lengths[:, None]).astype("int32")
    tokens = rng.integers(1, common.CONFIG["vocabulary_size"], (common.BATCH_ROWS, PROMPT_LENGTH))
    return {"token_ids": tokens.astype("int32") * mask, "padding_mask": mask}


def _padded(weights, lm):
    """`weights` of the unpadded model, with rows of 3.0 for a padded embedding."""
    extra_rows = lm.backbone.token_embedding.embeddings.shape[0] - weights[0].shape[0]
    padding = np.full((extra_rows, weights[0].shape[1]), 3.0, "float32")
    return [np.concatenate([weights[0], padding])] + weights[1:]


def check_gradients():
    """Loss and gradients on three meshes, and greedy tokens on data=2 x expert=4."""
    result = {}
    batch = common.token_batch(seed=1)
    prompts = _prompts()
    references = {}
    for groups in (8, 4):
        references[groups] = common.build_causal_lm(seed=0, num_routing_groups=groups)
        references[groups].compile(sampler="greedy")
    weights = references[8].get_weights()
    references[4].set_weights(weights)
    expected = {groups: loss_and_gradients(lm, batch) for groups, lm in references.items()}
    # Grouping decides capacity and drops: one group of all 128 tokens routes differently.
    one_group = common.build_causal_lm(seed=0, num_routing_groups=1)
    one_group.compile()
    one_group.set_weights(weights)
    result["one_group_loss"] = loss_and_gradients(one_group, batch)[0]
    expected_tokens = references[8].generate(
        prompts, max_length=PROMPT_LENGTH, stop_token_ids=None
    )
    result["reference_tokens"] = np.asarray(expected_tokens["token_ids"]).tolist()

    meshes = {
        "data2_expert4": ({"data": 2, "expert": 4}, {}),
        "data8": ({"data": 8}, {}),
        "data2_expert2_model2": (
            {"data": 2, "expert": 2, "model": 2},
            {"pad_vocabulary_to_multiple_of": 2},
        ),
    }
    for name, (mesh, overrides) in meshes.items():
        distribution = glam_distribution.expert_parallel(**mesh)
        groups = distribution.num_model_replicas
        with distribution.scope():
            lm = common.build_causal_lm(seed=0, **overrides)
            lm.set_weights(_padded(weights, lm) if overrides else weights)
            lm.compile(sampler="greedy")
            loss, gradients = loss_and_gradients(lm, batch, distribution)
            expected_loss, expected_gradients = expected[groups]
            vocabulary = common.CONFIG["vocabulary_size"]
            embedding_gradient = gradients["token_embedding/embeddings"]
            gradients["token_embedding/embeddings"] = embedding_gradient[:vocabulary]
            outcome = {
                "routing_groups": groups,
                "loss": loss,
                "expected_loss": expected_loss,
                "gradient_difference": worst_difference(gradients, expected_gradients),
                "padding_rows_gradient": float(
                    np.abs(embedding_gradient[vocabulary:]).max(initial=0.0)
                ),
            }
            if name == "data2_expert4":
                tokens = lm.generate(prompts, max_length=PROMPT_LENGTH, stop_token_ids=None)
                outcome["tokens"] = np.asarray(tokens["token_ids"]).tolist()
            result[name] = outcome
    return result


def check_training():
    """Per-step losses and weights after a few `fit` steps on data=2 x expert=4 and data=8."""
    reference = common.build_causal_lm(seed=0, num_routing_groups=8)
    reference.compile()
    weights = reference.get_weights()
    expected_steps, expected_weights = train(reference)
    result = {"reference_step_losses": expected_steps}
    for name, mesh in (("data2_expert4", {"data": 2, "expert": 4}), ("data8", {"data": 8})):
        distribution = glam_distribution.expert_parallel(**mesh)
        with distribution.scope():
            lm = common.build_causal_lm(seed=0)
            lm.set_weights(weights)
            lm.compile()
            steps, trained = train(lm)
        result[name] = {
            "step_losses": steps,
            "weights_difference": worst_difference(trained, expected_weights),
        }
    return result


if __name__ == "__main__":
    checks = {"gradients": check_gradients, "training": check_training}
    common.emit(checks[sys.argv[1]]())
