"""Where GLaM's weights and activations live on 8 simulated CPU devices, and what moves.

Prints `RESULT {json}` with: the layout of every weight under `expert_parallel(data=2,
expert=4)` (and under `data=2, expert=2, model=2` with a padded vocabulary), the weights no
layout key matches, the experts each device holds, the layout of a training batch, the loss of
one `fit` step on a `tf.data.Dataset`, and the collectives of the compiled training step.
"""

import re

import common

common.use_cpu_devices(8)

import jax  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_glam  # noqa: E402
from keras_glam import distribution as glam_distribution  # noqa: E402

_COLLECTIVE = re.compile(
    r"=\s+(?P<type>\S.*?)\s+(?P<op>all-to-all|all-gather|all-reduce|reduce-scatter|"
    r"collective-permute)(?:-start)?\("
)


def _spec(sharding):
    return [list(entry) if isinstance(entry, tuple) else entry for entry in sharding.spec]


def weight_layouts(model):
    layouts = {}
    for variable in model.weights:
        value = variable.value
        layouts[variable.path] = {
            "shape": list(variable.shape),
            "spec": _spec(value.sharding),
            "shard_shapes": sorted({tuple(s.data.shape) for s in value.addressable_shards}),
        }
    return layouts


def experts_by_device(variable):
    """For each device, the expert indices of `variable` it holds."""
    held = {}
    for shard in variable.value.addressable_shards:
        experts = range(variable.shape[0])[shard.index[0]]
        held[str(shard.device)] = [experts.start, experts.stop]
    return held


def collectives(hlo_text):
    counts, shapes = {}, {}
    for match in _COLLECTIVE.finditer(hlo_text):
        counts[match["op"]] = counts.get(match["op"], 0) + 1
        shapes.setdefault(match["op"], []).append(match["type"])
    return counts, shapes


def training_dataset():
    inputs, labels, weights = common.token_batch(seed=1)
    return tf.data.Dataset.from_tensor_slices((inputs, labels, weights)).batch(
        common.BATCH_ROWS, drop_remainder=True
    )


def main():
    result = {"num_devices": len(jax.devices())}
    distribution = glam_distribution.expert_parallel(data=2, expert=4)
    layout_map = keras_glam.GLaMBackbone.get_layout_map(distribution.device_mesh)
    with distribution.scope():
        lm = common.build_causal_lm(seed=0)
        result["layouts"] = weight_layouts(lm)
        result["unmatched"] = glam_distribution.unmatched_weights(lm, layout_map)
        result["experts_by_device"] = {
            variable.path: experts_by_device(variable)
            for variable in lm.weights
            if variable.path.endswith(("expert_wi/kernel", "expert_wo/kernel"))
        }
        result["routing_groups"] = [
            layer._resolve_num_groups(common.BATCH_ROWS * common.SEQUENCE_LENGTH)
            for layer in lm.backbone.moe_layers
        ]

        lm.compile()
        history = lm.fit(training_dataset(), epochs=1, shuffle=False, verbose=0)
        result["fit_loss"] = history.history["loss"][-1]

        inputs, labels, weights = common.token_batch(seed=1)
        batch = jax.tree.map(
            lambda array: jax.device_put(
                array, distribution.get_data_layout(array.shape).backend_layout
            ),
            (inputs, labels, weights),
        )
        token_ids = batch[0]["token_ids"]
        result["batch_spec"] = _spec(token_ids.sharding)
        result["batch_rows_per_device"] = sorted(
            {s.data.shape[0] for s in token_ids.addressable_shards}
        )
        state = (
            [v.value for v in lm.trainable_variables],
            [v.value for v in lm.non_trainable_variables],
            [v.value for v in lm.optimizer.variables],
            [v.value for v in lm.metrics_variables],
        )
        hlo = jax.jit(lm.train_step).lower(state, batch).compile().as_text()
        result["collectives"], result["collective_types"] = collectives(hlo)
        result["num_moe_layers"] = len(lm.backbone.moe_layers)

    tensor_parallel = glam_distribution.expert_parallel(data=2, expert=2, model=2)
    with tensor_parallel.scope():
        lm = common.build_causal_lm(seed=0, pad_vocabulary_to_multiple_of=2)
        result["tensor_parallel_layouts"] = weight_layouts(lm)
        logits = lm.predict(common.token_batch(seed=1)[0], batch_size=common.BATCH_ROWS, verbose=0)
        result["padded_logits_shape"] = list(logits.shape)
        result["padded_logits_max"] = float(logits[..., common.CONFIG["vocabulary_size"]:].max())
    try:
        with tensor_parallel.scope():
            common.build_causal_lm(seed=0)
    except ValueError as error:
        result["unpadded_vocabulary_error"] = str(error)
    common.emit(result)


if __name__ == "__main__":
    main()
