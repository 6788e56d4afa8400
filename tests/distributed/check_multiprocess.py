"""GLaM trained by two processes sharing one 8-device mesh, and its checkpoint on one device.

`python check_multiprocess.py train PROCESS_ID PORT OUTPUT_DIR` (run once per process, ids 0
and 1, each with 4 simulated CPU devices, CPU collectives over gloo): joins the cluster with
`keras.distribution.initialize`, trains a few `fit` steps under `expert_parallel(expert=8)` (the
expert axis spans both processes, so tokens cross processes by all-to-all and each process
holds 4 of the 8 experts) on a `tf.data` pipeline that Keras shards per process, evaluates, and
gathers weights and optimizer state to write a checkpoint from process 0. Process 0 also trains
a single-device reference from the same initial weights on the whole batches. Each process
writes `process_<id>.json`.

`python check_multiprocess.py restore OUTPUT_DIR` (one device): restores that checkpoint into a
fresh model and evaluates it on the same batch; prints `RESULT {json}`.
"""

import json
import os
import sys

import common

TRAINING_STEPS = 3
NUM_PROCESSES = 2


def _datasets():
    import tensorflow as tf

    inputs, labels, weights = common.token_batch(seed=2, rows=common.BATCH_ROWS * TRAINING_STEPS)
    training = tf.data.Dataset.from_tensor_slices((inputs, labels, weights)).batch(
        common.BATCH_ROWS, drop_remainder=True
    )
    evaluation = tf.data.Dataset.from_tensor_slices(common.token_batch(seed=5)).batch(
        common.BATCH_ROWS, drop_remainder=True
    )
    return training, evaluation


def train(process_id, port, output_dir):
    common.use_cpu_devices(4)
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    import keras

    keras.distribution.initialize(f"127.0.0.1:{port}", NUM_PROCESSES, process_id)

    from keras_glam import distribution as glam_distribution
    from keras_glam.training.checkpointing import CheckpointManager

    result = {
        "process_id": jax.process_index(),
        "global_devices": jax.device_count(),
        "local_devices": jax.local_device_count(),
    }
    training, evaluation = _datasets()
    distribution = glam_distribution.expert_parallel(expert=8)
    with distribution.scope():
        lm = common.build_causal_lm(seed=0)
        initial_weights = glam_distribution.gather_to_host(lm.weights)
        expert_kernel = lm.backbone.moe_layers[0].expert_wi.kernel
        result["local_experts"] = sum(
            shard.data.shape[0] for shard in expert_kernel.value.addressable_shards
        )
        lm.compile()
        recorder = common.step_loss_recorder()
        lm.fit(training, epochs=1, shuffle=False, verbose=0, callbacks=[recorder])
        result["step_losses"] = recorder.losses
        result["evaluation"] = lm.evaluate(evaluation, verbose=0, return_dict=True)
        weights = glam_distribution.gather_to_host(lm.weights)
        optimizer_state = glam_distribution.gather_to_host(lm.optimizer.variables)

    if jax.process_index() == 0:
        # One device from here on: a plain model holding the gathered values.
        single = common.build_causal_lm(seed=1)
        single.compile()
        single.optimizer.build(single.trainable_variables)
        single.set_weights(weights)
        for variable, value in zip(single.optimizer.variables, optimizer_state):
            variable.assign(value)
        checkpoint = CheckpointManager(os.path.join(output_dir, "checkpoints")).save(
            single, {"step": TRAINING_STEPS}
        )
        result["checkpoint"] = checkpoint.path

        reference = common.build_causal_lm(
            seed=1, num_routing_groups=distribution.num_model_replicas
        )
        reference.set_weights(initial_weights)
        reference.compile()
        recorder = common.step_loss_recorder()
        reference.fit(training, epochs=1, shuffle=False, verbose=0, callbacks=[recorder])
        result["reference_step_losses"] = recorder.losses
    with open(os.path.join(output_dir, f"process_{process_id}.json"), "w") as file:
        json.dump(result, file)
    jax.distributed.shutdown()


def restore(output_dir):
    common.use_cpu_devices(1)
    from keras_glam.training.checkpointing import CheckpointManager

    with open(os.path.join(output_dir, "process_0.json")) as file:
        checkpoint_path = json.load(file)["checkpoint"]
    lm = common.build_causal_lm(seed=7)
    lm.compile()
    manager = CheckpointManager(os.path.dirname(checkpoint_path))
    state = manager.restore(manager.latest(), lm)
    _, evaluation = _datasets()
    common.emit(
        {
            "state": state,
            "evaluation": lm.evaluate(evaluation, verbose=0, return_dict=True),
            "optimizer_iterations": int(lm.optimizer.iterations.numpy()),
        }
    )


if __name__ == "__main__":
    if sys.argv[1] == "train":
        train(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
    else:
        restore(sys.argv[2])
