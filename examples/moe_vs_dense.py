"""GLaM's claim at small scale: an MoE model against its dense twin, on the same tokens.

GLaM's paper compares each MoE model with a dense model of the same activated size: the MoE
model reaches a lower loss for the same compute per token. This script trains `glam_small_16e`
(16 experts on layers 0 and 2) and `glam_small_dense` (same shape, dense FFNs) with the main
job's recipe, on the same batches of Python's documentation in the same order, and prints their
held-out cross-entropy, throughput and parameter counts as a Markdown table.

    python examples/moe_vs_dense.py --steps 300 --output moe_vs_dense

Each model's run directory (checkpoints, preset, plot, metrics.json) lands under `--output`.
"""

import argparse
import dataclasses
import os

from keras_glam import train

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


def markdown_table(results):
    lines = [
        "| model | parameters | activated per token | held-out cross-entropy (nats/token) "
        "| unigram baseline | tokens/s (train) | training time (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for preset, metrics in results.items():
        lines.append(
            f"| `{preset}` | {metrics['parameters']:,} | {metrics['activated_parameters']:,} "
            f"| {metrics['held_out_cross_entropy']:.4f} | {metrics['unigram_entropy']:.4f} "
            f"| {metrics['tokens_per_second']:,.0f} | {metrics['training_seconds']:.0f} |"
        )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="training steps per model")
    parser.add_argument("--output", default="moe_vs_dense", help="directory for both runs")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    results = compare(args.steps, args.output, args.seed)
    tokens = results[MODELS[0]]["tokens_seen"]
    print(f"\nBoth models saw the same {tokens:,} tokens ({args.steps} steps of 8 x 128).\n")
    print(markdown_table(results))


if __name__ == "__main__":
    main()
