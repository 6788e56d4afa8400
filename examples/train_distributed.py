"""Train GLaM with data, expert and tensor parallelism under `keras.distribution` (JAX).

One machine, 8 simulated CPU devices (no accelerator needed; ~1 minute):

    python examples/train_distributed.py --simulate-cpu-devices 8 --expert 4

Two processes on this machine, 4 simulated devices each, one 8-device mesh (CPU collectives
over gloo); start both:

    python examples/train_distributed.py --simulate-cpu-devices 4 --expert 8 \
        --coordinator 127.0.0.1:12355 --num-processes 2 --process-id 0
    python examples/train_distributed.py --simulate-cpu-devices 4 --expert 8 \
        --coordinator 127.0.0.1:12355 --num-processes 2 --process-id 1

A multi-GPU host: `python examples/train_distributed.py --expert 8`. A TPU pod slice: run the
same command on every host with `--multi-host` (the hosts find each other); each host reads
its own shard of the documents. Only the plan, for any device count:

    python examples/train_distributed.py --preset glam_64b_64e --plan-only --num-devices 512 \
        --batch-size 512 --sequence-length 1024 --remat --device-memory-gib 32

See docs/distributed.md.
"""

import argparse
import os


def parse_arguments():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="glam_tiny_8e", help="a keras_glam preset")
    parser.add_argument("--data", type=int, help="data-parallel axis (default: proposed)")
    parser.add_argument("--expert", type=int, help="expert axis (default: proposed)")
    parser.add_argument("--model", type=int, default=None, help="tensor-parallel axis")
    parser.add_argument("--fsdp", action="store_true", help="also split dense weights")
    parser.add_argument("--remat", action="store_true",
                        help="plan with per-layer remat (the training here does not remat)")
    parser.add_argument("--batch-size", type=int, help="global rows per step (default: 2 per "
                        "batch shard)")
    parser.add_argument("--sequence-length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--output-dir", default="glam_distributed_run")
    parser.add_argument("--simulate-cpu-devices", type=int, help="N simulated CPU devices")
    parser.add_argument("--coordinator", help="host:port of process 0 (several processes)")
    parser.add_argument("--num-processes", type=int, default=1)
    parser.add_argument("--process-id", type=int, default=0)
    parser.add_argument("--multi-host", action="store_true",
                        help="TPU pod / cluster: let JAX discover the processes")
    parser.add_argument("--plan-only", action="store_true", help="print the plan and exit")
    parser.add_argument("--num-devices", type=int, help="devices to plan for (--plan-only)")
    parser.add_argument("--device-memory-gib", type=float, help="memory of one device")
    return parser.parse_args()


def mesh_arguments(args, num_devices):
    """`expert_parallel` keyword arguments: the ones given, the proposed ones otherwise."""
    from keras_glam import distribution as glam_distribution

    if args.expert is None and args.data is None and args.model is None:
        batch_tokens = args.batch_size * args.sequence_length if args.batch_size else None
        return glam_distribution.propose_mesh(
            num_devices, args.preset, batch_tokens=batch_tokens,
            sequence_length=args.sequence_length, device_memory_gib=args.device_memory_gib,
            remat=args.remat,
        )
    return {"data": args.data, "expert": args.expert or 1, "model": args.model or 1,
            "fsdp": args.fsdp}


def plan_only(args):
    from keras_glam import distribution as glam_distribution

    num_devices = args.num_devices or 1
    mesh = mesh_arguments(args, num_devices)
    fsdp = mesh.pop("fsdp")
    if mesh["data"] is None:
        mesh["data"] = num_devices // (mesh["expert"] * mesh["model"])
    rows = args.batch_size or mesh["data"] * mesh["expert"]
    print(glam_distribution.plan(
        args.preset, mesh, batch_tokens=rows * args.sequence_length,
        sequence_length=args.sequence_length, fsdp=fsdp, remat=args.remat,
        device_memory_gib=args.device_memory_gib,
    ))


def join_processes(args):
    """Make every process of the run part of one JAX runtime (no-op for a single process)."""
    import jax
    import keras

    if args.coordinator:
        # Collectives between CPU devices of different processes (GPUs and TPUs have their own).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        keras.distribution.initialize(args.coordinator, args.num_processes, args.process_id)
    elif args.multi_host:
        keras.distribution.initialize()


def main():
    args = parse_arguments()
    if args.simulate_cpu_devices:
        os.environ["XLA_FLAGS"] = (
            f"--xla_force_host_platform_device_count={args.simulate_cpu_devices}"
        )
    os.environ.setdefault("KERAS_BACKEND", "jax")
    if args.plan_only:
        return plan_only(args)
    join_processes(args)

    import jax
    import keras

    import keras_glam
    from keras_glam import distribution as glam_distribution
    from keras_glam.data import packed_lm_dataset
    from keras_glam.data.embedded_corpus import pydoc_documents

    is_primary = jax.process_index() == 0
    mesh = mesh_arguments(args, jax.device_count())
    # Each process reads its own documents (below), so Keras must not shard them again.
    distribution = glam_distribution.expert_parallel(**mesh, auto_shard_dataset=False)
    batch_shards = distribution.num_model_replicas
    batch_size = args.batch_size or 2 * batch_shards
    if is_primary:
        print(glam_distribution.plan(
            args.preset, dict(zip(distribution.device_mesh.axis_names,
                                  distribution.device_mesh.shape)),
            batch_tokens=batch_size * args.sequence_length,
            sequence_length=args.sequence_length, fsdp=mesh["fsdp"],
        ))

    with distribution.scope():
        keras.utils.set_random_seed(0)
        lm = keras_glam.GLaMCausalLM.from_preset(
            args.preset,
            dispatch="einsum",  # GShard's dispatch: one all-to-all each way under the mesh
            eval_capacity_factor=2.0,  # evaluation and decoding move tokens, not expert weights
            pad_vocabulary_to_multiple_of=distribution.device_mesh.shape[2],
            sequence_length=args.sequence_length,
        )
        tokenizer, preprocessor = lm.preprocessor.tokenizer, lm.preprocessor
        dataset = packed_lm_dataset(
            pydoc_documents(),
            tokenizer,
            sequence_length=args.sequence_length,
            batch_size=batch_size // jax.process_count(),
            num_shards=jax.process_count(),
            shard_index=jax.process_index(),
            seed=0,
            repeat=True,
        )
        lm.compile(sampler="greedy")
        lm.preprocessor = None  # the batches are token ids already (KerasHub's way)
        lm.fit(dataset, steps_per_epoch=args.steps, epochs=1, shuffle=False,
               verbose=2 if is_primary else 0)
        lm.preprocessor = preprocessor
        if jax.process_count() == 1:
            prompts = ["def main():"] * batch_shards  # a batch that divides over the shards
            print(lm.generate(prompts, max_length=32)[0])
        # Every process takes part in the gathering; one writes weights any mesh can load.
        weights = glam_distribution.gather_to_host(lm.weights)

    if is_primary:
        single_device = keras_glam.GLaMCausalLM.from_preset(
            args.preset, pad_vocabulary_to_multiple_of=distribution.device_mesh.shape[2]
        )
        single_device.set_weights(weights)
        os.makedirs(args.output_dir, exist_ok=True)
        path = os.path.join(args.output_dir, "model.weights.h5")
        single_device.save_weights(path)
        print(f"Saved {path}")


if __name__ == "__main__":
    main()
