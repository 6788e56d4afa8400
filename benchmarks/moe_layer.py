"""Forward + backward time of one `MoEFeedForward` layer against a FLOP-matched dense FFN and
KerasHub's Mixtral MoE block.

Three layers with the same tokens `T`, model dim `M`, expert hidden dim `H`, `E` experts, top-2:

- `MoEFeedForward` (this package), training mode (capacity, drops).
- A dense FFN with the same active FLOPs: `relu(x W1) W2` with hidden `2H` (top-2 runs two
  `M x H` experts per token), no bias.
- KerasHub's `MixtralSparseMoeBlock`, which runs every expert on every token and masks. Its
  experts are SwiGLU (three matrices), so it does 1.5x the expert FLOPs of ours per token as well.

Each step is `jax.value_and_grad` of `sum(outputs * cotangent) + added losses` with respect to the
trainable weights and the inputs, through `layer.stateless_call`, compiled with `jax.jit`. Every
implementation is compiled and warmed up first; then the timed repetitions of `MoEFeedForward` and
the dense FFN run round-robin, so a noisy neighbour on a shared machine slows both alike, and the
KerasHub block is timed after them (its temporaries of several GB disturb whatever runs next).
The report gives medians, and ratios to the dense FFN measured in the same run: compare ratios,
not absolute times across runs. A second
table times the forward pass alone: the evaluation path (no capacity, no drops) against the
training path and the dense FFN.

Usage:
    python benchmarks/moe_layer.py            # defaults: T=4096 M=256 H=1024 E=64 cf=2.5
    python benchmarks/moe_layer.py --quick    # a smaller, faster run
    python benchmarks/moe_layer.py --dispatch einsum --groups 8 --capacity-factor 1.25
"""

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Runs from a checkout without installing the package.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras_hub.src.models.mixtral.mixtral_decoder import MixtralSparseMoeBlock  # noqa: E402

from keras_glam.layers.expert_loop import default_row_block  # noqa: E402
from keras_glam.layers.moe_feedforward import MoEFeedForward  # noqa: E402
from keras_glam.layers.routing import expert_capacity  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=4096, help="T = batch x length")
    parser.add_argument("--sequence-length", type=int, default=512)
    parser.add_argument("--model-dim", type=int, default=256, help="M")
    parser.add_argument("--hidden-dim", type=int, default=1024, help="H, per expert")
    parser.add_argument("--experts", type=int, default=64, help="E")
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--capacity-factor", type=float, default=2.5)
    parser.add_argument(
        "--dispatch", default="auto", choices=["auto", "einsum", "sort", "sort_loop"]
    )
    parser.add_argument("--groups", type=int, default=1, help="routing groups G")
    parser.add_argument("--router-skew", type=float, default=0.0,
                        help="> 0 favours high-index experts (uneven load, more drops)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--keras-hub-repeats", type=int, default=2)
    parser.add_argument("--skip-keras-hub", action="store_true")
    parser.add_argument("--dtype", default="float32", help="a Keras dtype policy")
    parser.add_argument("--quick", action="store_true",
                        help="T=1024, E=16, 5 repetitions (1 for KerasHub)")
    args = parser.parse_args(argv)
    if args.quick:
        args.tokens, args.experts, args.repeats, args.keras_hub_repeats = 1024, 16, 5, 1
    args.sequence_length = min(args.sequence_length, args.tokens)
    if args.tokens % args.sequence_length:
        parser.error("--tokens must be a multiple of --sequence-length")
    return args


def build_layers(args):
    model_dim, hidden_dim = args.model_dim, args.hidden_dim
    input_shape = (args.tokens // args.sequence_length, args.sequence_length, model_dim)
    moe = MoEFeedForward(
        num_experts=args.experts,
        intermediate_dim=hidden_dim,
        top_k=args.top_k,
        capacity_factor=args.capacity_factor,
        num_groups=args.groups,
        dispatch=args.dispatch,
        name="moe",
    )
    moe.build(input_shape)
    # Tokens share the component `skew * v` (see `make_inputs`), which the router maps to a logit
    # offset growing with the expert index.
    if args.router_skew:
        offsets = np.outer(shared_direction(model_dim), np.linspace(0.0, 1.0, args.experts))
        moe.router.kernel.assign(np.asarray(moe.router.kernel.value) + offsets)
    dense = keras.Sequential(
        [
            keras.layers.Dense(args.top_k * hidden_dim, activation="relu", use_bias=False),
            keras.layers.Dense(model_dim, use_bias=False),
        ],
        name="dense_ffn",
    )
    dense.build(input_shape)
    layers = {"MoEFeedForward": moe, "dense FFN (hidden kH)": dense}
    if not args.skip_keras_hub:
        mixtral = MixtralSparseMoeBlock(
            hidden_dim=model_dim,
            intermediate_dim=hidden_dim,
            num_experts=args.experts,
            top_k=args.top_k,
            name="mixtral_moe",
        )
        mixtral.build(input_shape)
        layers["KerasHub MixtralSparseMoeBlock"] = mixtral
    return input_shape, layers


def shared_direction(model_dim):
    """The unit vector along which `--router-skew` shifts every token."""
    return np.ones(model_dim) / np.sqrt(model_dim)


def compile_step(layer, inputs, cotangent):
    """A compiled `(trainable, non_trainable, x) -> ((loss, non_trainable), grads)` and its
    compile time in seconds."""

    def loss(trainable, non_trainable, x):
        outputs, non_trainable, losses = layer.stateless_call(
            trainable, non_trainable, x, training=True, return_losses=True
        )
        if isinstance(outputs, tuple):  # MixtralSparseMoeBlock returns (outputs, router_logits)
            outputs = outputs[0]
        value = jnp.sum(outputs.astype("float32") * cotangent) + sum(losses)
        return value, non_trainable

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 2), has_aux=True))
    state = (
        [v.value for v in layer.trainable_variables],
        [v.value for v in layer.non_trainable_variables],
        inputs,
    )
    start = time.perf_counter()
    compiled = step.lower(*state).compile()
    compile_seconds = time.perf_counter() - start
    flops = (compiled.cost_analysis() or {}).get("flops", float("nan"))
    return compiled, state, compile_seconds, flops


def compile_forward(layer, inputs, training):
    """A compiled forward pass `(trainable, non_trainable, x) -> outputs` (evaluation timing)."""

    def forward(trainable, non_trainable, x):
        outputs, _ = layer.stateless_call(trainable, non_trainable, x, training=training)
        return outputs

    state = (
        [v.value for v in layer.trainable_variables],
        [v.value for v in layer.non_trainable_variables],
        inputs,
    )
    return jax.jit(forward).lower(*state).compile(), state


def time_once(compiled, state):
    """Wall and CPU seconds of one call (CPU time sums the threads: it is the work done, and
    is less sensitive than wall time to neighbours competing for the cores)."""
    cpu, wall = time.process_time(), time.perf_counter()
    jax.block_until_ready(compiled(*state))
    return time.perf_counter() - wall, time.process_time() - cpu


def run_round_robin(programs, repeats):
    """Time every program `repeats` times, alternating between them."""
    times = {name: [] for name in programs}
    for _ in range(repeats):
        for name, (compiled, state) in programs.items():
            times[name].append(time_once(compiled, state))
    return times


def medians(samples):
    return tuple(statistics.median(column) for column in zip(*samples))


def active_flops(args):
    """Forward + backward FLOPs of the useful work: `k` experts per token (2 matmuls of
    `T x M x H`, each 3x for forward + backward) and the router."""
    experts = 3 * 2 * 2 * args.tokens * args.model_dim * args.hidden_dim * args.top_k
    router = 3 * 2 * args.tokens * args.model_dim * args.experts
    return experts + router


def expert_rows(args, moe, inputs):
    """Rows the experts multiply in one step, and the `E x G x C` capacity slots.

    Batched matmuls (`"einsum"`, `"sort"`) multiply every slot; the expert loop (`"sort_loop"`)
    multiplies each expert's filled rows rounded up to its row block.
    """
    capacity = expert_capacity(args.tokens // args.groups, args.experts, args.capacity_factor)
    slots = args.experts * args.groups * capacity
    if moe._dispatch_mode() != "sort_loop":
        return slots, slots

    def dispatched_per_expert(trainable, non_trainable, x):
        (_, routing), _ = moe.stateless_call(
            trainable, non_trainable, x, training=True, return_routing=True
        )
        return routing.metrics.dispatched_per_expert

    dispatched = np.asarray(
        jax.jit(dispatched_per_expert)(
            [v.value for v in moe.trainable_variables],
            [v.value for v in moe.non_trainable_variables],
            inputs,
        )
    )
    block = default_row_block(args.groups * capacity)
    return int(np.sum(np.ceil(dispatched / block) * block)), slots


def main(argv=None):
    args = parse_args(argv)
    keras.config.set_dtype_policy(args.dtype)
    keras.utils.set_random_seed(0)
    input_shape, layers = build_layers(args)
    rng = np.random.default_rng(0)
    compute_dtype = keras.config.dtype_policy().compute_dtype
    tokens = rng.normal(size=input_shape) + args.router_skew * shared_direction(args.model_dim)
    inputs = jnp.asarray(tokens, dtype=compute_dtype)
    cotangent = jnp.asarray(rng.normal(size=input_shape), dtype="float32")

    print(
        f"T={args.tokens} M={args.model_dim} H={args.hidden_dim} E={args.experts} "
        f"top-{args.top_k} capacity_factor={args.capacity_factor} groups={args.groups} "
        f"dispatch={args.dispatch} ({layers['MoEFeedForward']._dispatch_mode()}) "
        f"dtype={args.dtype} on {jax.devices()[0].device_kind}, "
        f"{os.cpu_count()} CPU cores visible"
    )
    compiled = {}
    for name, layer in layers.items():
        step, state, compile_seconds, flops = compile_step(layer, inputs, cotangent)
        compiled[name] = (step, state, compile_seconds, flops)
        print(f"  compiled {name} in {compile_seconds:.1f} s")
    # The KerasHub block is timed after the others: interleaved, its multi-GB temporaries
    # slowed the next MoEFeedForward step about 2.5x (allocator and cache state), which no
    # training loop would see.
    keras_hub_name = "KerasHub MixtralSparseMoeBlock"
    programs = {
        name: (step, state)
        for name, (step, state, _, _) in compiled.items()
        if name != keras_hub_name
    }
    for program in programs.values():
        time_once(*program)  # warm-up
    times = run_round_robin(programs, args.repeats)
    if keras_hub_name in compiled:
        keras_hub_program = compiled[keras_hub_name][:2]
        time_once(*keras_hub_program)  # warm-up
        times.update(run_round_robin({keras_hub_name: keras_hub_program}, args.keras_hub_repeats))

    moe = layers["MoEFeedForward"]
    (_, non_trainable), _ = compiled["MoEFeedForward"][0](*compiled["MoEFeedForward"][1])
    stats = dict(zip([v.name for v in moe.non_trainable_variables], non_trainable))
    dropped = np.asarray(stats["dropped_fraction"])
    load = np.asarray(stats["expert_load"])

    dense_name = "dense FFN (hidden kH)"
    dense_wall, dense_cpu = medians(times[dense_name])
    useful = active_flops(args)
    print()
    print("Training step (forward + backward):")
    print()
    print("| layer | compile (s) | median step (ms) | runs | wall / dense FFN | CPU time / dense "
          "FFN | useful GFLOP/s | XLA-counted GFLOP |")
    print("|---|---|---|---|---|---|---|---|")
    expert_loop = moe._dispatch_mode() == "sort_loop"
    for name, (_, _, compile_seconds, flops) in compiled.items():
        wall, cpu = medians(times[name])
        # XLA's cost analysis does not look inside the expert loop's body.
        counted = "n/a" if expert_loop and name == "MoEFeedForward" else f"{flops / 1e9:.1f}"
        print(
            f"| {name} | {compile_seconds:.1f} | {1e3 * wall:.1f} | {len(times[name])} "
            f"| {wall / dense_wall:.2f}x | {cpu / dense_cpu:.2f}x | {useful / wall / 1e9:.0f} "
            f"| {counted} |"
        )
    if keras_hub_name in compiled:
        speedup = medians(times[keras_hub_name])[0] / medians(times["MoEFeedForward"])[0]
        print(f"\nMoEFeedForward is {speedup:.0f}x faster than {keras_hub_name} (wall time).")
    print(
        "MoEFeedForward routing: dropped "
        + ", ".join(f"top-{j + 1} {100 * d:.2f}%" for j, d in enumerate(dropped))
        + f"; tokens per expert max/mean {load.max() / load.mean():.2f}, "
        f"experts without tokens {int((load == 0).sum())}"
    )
    rows, slots = expert_rows(args, moe, inputs)
    choices = args.tokens * args.top_k
    print(
        f"Expert rows multiplied: {rows} = {rows / choices:.2f}x the {choices} choices "
        f"(E x G x C = {slots} capacity slots)"
    )

    forward = {
        dense_name: compile_forward(layers[dense_name], inputs, training=False),
        "MoEFeedForward, evaluation (no capacity, no drops)": compile_forward(
            moe, inputs, training=False
        ),
        "MoEFeedForward, training capacity": compile_forward(moe, inputs, training=True),
    }
    for program in forward.values():
        time_once(*program)
    times = run_round_robin(forward, args.repeats)
    dense_wall, dense_cpu = medians(times[dense_name])
    print()
    print("Forward pass only:")
    print()
    print("| layer | median (ms) | wall / dense FFN | CPU time / dense FFN |")
    print("|---|---|---|---|")
    for name in forward:
        wall, cpu = medians(times[name])
        print(f"| {name} | {1e3 * wall:.1f} | {wall / dense_wall:.2f}x | {cpu / dense_cpu:.2f}x |")


if __name__ == "__main__":
    main()
