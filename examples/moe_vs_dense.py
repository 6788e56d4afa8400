"""GLaM's claim at small scale: an MoE model against its dense twin, on the same tokens.

GLaM's paper compares each MoE model with a dense model of about the same activated size: the
MoE model reaches a lower loss for the same compute per token. This script trains
`glam_small_16e` (16 experts on layers 0 and 2) and `glam_small_dense` (same shape, dense FFNs)
with the main job's recipe on the same batches of Python's documentation in the same order, then
measures their training throughput side by side, and prints a Markdown table.

    pip install .  # or run with PYTHONPATH=. from the repository root
    python examples/moe_vs_dense.py --steps 300 --output moe_vs_dense

Throughput is measured separately from the training runs, in one process that alternates short
bursts of steps of the two models on the same batch, so that both see the same machine load (the
training runs' own tokens/s also depend on whatever else the machine was doing at the time).
Each model's run directory (checkpoints, preset, plot, metrics.json) lands under `--output`.
"""

import argparse
import dataclasses
import os
import statistics
import time

import numpy as np

from keras_glam import train
from keras_glam.models.glam_causal_lm import GLaMCausalLM

MODELS = ("glam_small_16e", "glam_small_dense")


def compare(steps, output, seed=0):
    """Train both models on identical data; returns `{preset: metrics}`."""
    results = {}
    for preset in MODELS:
        job = dataclasses.replace(
            train.TrainingJob(),
            preset=preset,
            steps=steps,
            output=os.path.join(output, preset),
            seed=seed,
            samples=1,
            verbose=2,
        )
        results[preset] = train.run(job)
    return results


def interleaved_throughput(rounds=6, steps_per_round=5, batch_size=8, sequence_length=128):
    """Training tokens/s of each model, timed in alternating bursts on one batch.

    Returns:
        `{preset: median tokens/s over the rounds}`.
    """
    rng = np.random.default_rng(0)
    x = {
        "token_ids": rng.integers(4, 4096, size=(batch_size, sequence_length)).astype("int32"),
        "padding_mask": np.ones((batch_size, sequence_length), "int32"),
    }
    y = rng.integers(4, 4096, size=(batch_size, sequence_length)).astype("int32")
    models = {}
    for preset in MODELS:
        lm = GLaMCausalLM.from_preset(preset, preprocessor=None)
        lm.compile()
        lm.train_on_batch(x, y)  # Compile before timing.
        models[preset] = lm
    rates = {preset: [] for preset in MODELS}
    for _ in range(rounds):
        for preset, lm in models.items():
            start = time.perf_counter()
            for _ in range(steps_per_round):
                lm.train_on_batch(x, y)
            elapsed = time.perf_counter() - start
            rates[preset].append(steps_per_round * batch_size * sequence_length / elapsed)
    return {preset: statistics.median(values) for preset, values in rates.items()}


def markdown_table(results, throughput):
    lines = [
        "| model | parameters | activated per token | held-out cross-entropy (nats/token) "
        "| unigram baseline | tokens/s, interleaved | tokens/s, during its run |",
        "|---|---|---|---|---|---|---|",
    ]
    for preset, metrics in results.items():
        lines.append(
            f"| `{preset}` | {metrics['parameters']:,} | {metrics['activated_parameters']:,} "
            f"| {metrics['held_out_cross_entropy']:.4f} | {metrics['unigram_entropy']:.4f} "
            f"| {throughput[preset]:,.0f} | {metrics['tokens_per_second']:,.0f} |"
        )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="training steps per model")
    parser.add_argument("--output", default="moe_vs_dense", help="directory for both runs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--throughput-rounds", type=int, default=6, help="alternating timing rounds (0: skip)"
    )
    args = parser.parse_args(argv)
    results = compare(args.steps, args.output, args.seed)
    throughput = (
        interleaved_throughput(args.throughput_rounds)
        if args.throughput_rounds
        else {preset: float("nan") for preset in MODELS}
    )
    tokens = results[MODELS[0]]["tokens_seen"]
    print(f"\nBoth models saw the same {tokens:,} tokens ({args.steps} steps of 8 x 128).\n")
    print(markdown_table(results, throughput))


if __name__ == "__main__":
    main()
