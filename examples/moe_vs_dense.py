"""GLaM's claim at small scale: an MoE model against its dense twin, on the same tokens.

GLaM's paper compares each MoE model with a dense model of about the same activated size: the
MoE model reaches a lower loss for the same compute per token. This script trains
`glam_small_16e` (16 experts on layers 0 and 2) and `glam_small_dense` (same shape, dense FFNs)
with the main job's recipe on the same batches in the same order, for several seeds, and prints
a Markdown table per corpus with the mean and spread over seeds:

    pip install ".[eval]"  # or run with PYTHONPATH=. from the repository root
    python examples/moe_vs_dense.py --corpus pydoc stdlib --seeds 0 1 2 --output moe_vs_dense

Two corpora, both in every Python:
- `pydoc`: Python's documentation topics (133K training tokens): 300 steps of 8 x 128 tokens
  see it 2.3 times, a memorisation regime in which extra parameters need not help.
- `stdlib`: the standard library's own sources with their docstrings (about 12 MB, 3M+
  tokens, every `.py` file outside the test suites, one document per file): the models see only
  fresh tokens, the regime of GLaM's claim.

Held-out scores are on whole unseen documents: the job's cross-entropy, and through
`keras_glam.evaluation.perplexity` nats/token and bits per byte (bits per byte compare models
with different tokenizers). `--throughput-rounds` times both models in alternating bursts on
one batch, so both see the same machine load. Each run's directory lands under `--output`.
"""

import argparse
import dataclasses
import os
import pathlib
import statistics
import sysconfig
import time

import numpy as np

from keras_glam import train
from keras_glam.data.embedded_corpus import pydoc_documents
from keras_glam.data.embedded_corpus import split_documents
from keras_glam.models.glam_causal_lm import GLaMCausalLM

MODELS = ("glam_small_16e", "glam_small_dense")
# Held-out text scored by `perplexity`, at most this many characters per run (the start of the
# held-out documents): enough for a stable mean, cheap on a CPU.
PERPLEXITY_CHARACTERS = 100_000


def stdlib_files():
    """The standard library's `.py` files, outside its test suites and IDLE, sorted by path."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    skipped = {"test", "tests", "idlelib", "site-packages"}
    return [
        str(path) for path in sorted(root.rglob("*.py"))
        if not skipped & set(path.relative_to(root).parts) and path.stat().st_size > 0
    ]


def corpus_settings(corpus):
    """(TrainingJob overrides, the held-out documents as the job splits them) of a corpus."""
    if corpus == "pydoc":
        fraction = train.HELD_OUT_FRACTION
        documents = pydoc_documents()
        overrides = {}
    elif corpus == "stdlib":
        fraction = 0.02
        files = stdlib_files()
        documents = [pathlib.Path(f).read_text(encoding="utf-8") for f in files]
        overrides = {"data": tuple(files), "document_boundary": "file"}
    else:
        raise ValueError(f"Unknown corpus {corpus!r}: choose pydoc or stdlib.")
    _, held_out = split_documents(documents, fraction)
    return {**overrides, "held_out_fraction": fraction}, held_out


def perplexity_texts(held_out):
    """The first held-out documents, up to PERPLEXITY_CHARACTERS characters in all."""
    texts, total = [], 0
    for text in held_out:
        if total >= PERPLEXITY_CHARACTERS:
            break
        texts.append(text[: PERPLEXITY_CHARACTERS - total])
        total += len(texts[-1])
    return [text for text in texts if text.strip()]


def compare(corpus, steps, output, seeds):
    """Train both models on identical data for every seed; `{preset: [metrics per seed]}`."""
    from keras_glam.evaluation import perplexity

    overrides, held_out = corpus_settings(corpus)
    texts = perplexity_texts(held_out)
    results = {preset: [] for preset in MODELS}
    for seed in seeds:
        for preset in MODELS:
            job = dataclasses.replace(
                train.TrainingJob(),
                preset=preset,
                steps=steps,
                output=os.path.join(output, corpus, f"seed{seed}", preset),
                seed=seed,
                samples=1,
                verbose=2,
                **overrides,
            )
            metrics = train.run(job)
            lm = GLaMCausalLM.from_preset(os.path.join(job.output, "preset"))
            scores = perplexity(lm, texts, max_length=job.sequence_length)
            metrics.update(nats_per_token=scores.nats_per_token, bits_per_byte=scores.bits_per_byte)
            results[preset].append(metrics)
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


def mean_and_spread(values):
    """'mean ± sample standard deviation' (just the value for one seed)."""
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def markdown_table(results, throughput):
    """One row per model (mean ± spread over seeds) and a row of paired dense - MoE gaps."""
    lines = [
        "| model | parameters | activated per token | held-out cross-entropy (nats/token) "
        "| perplexity text: nats/token | bits/byte | unigram baseline | tokens/s, interleaved |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for preset, runs in results.items():
        column = {key: [run[key] for run in runs]
                  for key in ("held_out_cross_entropy", "nats_per_token", "bits_per_byte")}
        lines.append(
            f"| `{preset}` | {runs[0]['parameters']:,} | {runs[0]['activated_parameters']:,} "
            f"| {mean_and_spread(column['held_out_cross_entropy'])} "
            f"| {mean_and_spread(column['nats_per_token'])} "
            f"| {mean_and_spread(column['bits_per_byte'])} "
            f"| {runs[0]['unigram_entropy']:.4f} | {throughput[preset]:,.0f} |"
        )
    moe, dense = (results[preset] for preset in MODELS)
    gaps = [d["held_out_cross_entropy"] - m["held_out_cross_entropy"] for m, d in zip(moe, dense)]
    lines.append(
        f"| dense - MoE, paired by seed | | | {mean_and_spread(gaps)} | | | | |"
    )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", nargs="+", default=["pydoc", "stdlib"],
                        choices=("pydoc", "stdlib"))
    parser.add_argument("--steps", type=int, default=300, help="training steps per model")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--output", default="moe_vs_dense", help="directory for every run")
    parser.add_argument(
        "--throughput-rounds", type=int, default=6, help="alternating timing rounds (0: skip)"
    )
    args = parser.parse_args(argv)
    tables = {}
    for corpus in args.corpus:
        tables[corpus] = compare(corpus, args.steps, args.output, args.seeds)
    throughput = (
        interleaved_throughput(args.throughput_rounds)
        if args.throughput_rounds
        else {preset: float("nan") for preset in MODELS}
    )
    for corpus, results in tables.items():
        tokens = results[MODELS[0]][0]["tokens_seen"]
        print(f"\n{corpus}: both models saw the same {tokens:,} tokens ({args.steps} steps of "
              f"8 x 128), seeds {args.seeds}.\n")
        print(markdown_table(results, throughput))
    return tables


if __name__ == "__main__":
    main()
