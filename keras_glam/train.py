"""Train GLaM the paper's way: `python -m keras_glam.train` (or the `glam-train` command).

With no arguments, offline, in 4 to 10 minutes on two CPU cores (262 s measured on two idle
cores, about 9 minutes on cores shared with other jobs), it trains the small MoE preset
`glam_small_16e` on Python's own documentation (`pydoc_data.topics`, whole documents held out
by hash), then writes to `--output` (default `glam_run/`):

- `checkpoints/`: atomic training-state checkpoints, each with the data stream's position
  (resume with `--resume`, also after kill -9: the stream continues where it was, nothing is
  read again),
- `preset/`: the trained model (`keras_glam.GLaMCausalLM.from_preset("glam_run/preset")`),
- `training.png`: loss curves (train and held-out) and the per-layer expert load,
- `metrics.json`: held-out cross-entropy, the unigram-entropy baseline, tokens seen, tokens/s,
  steps, skipped steps and rollbacks,
- `tensorboard/`: the same metrics for TensorBoard.

It follows GLaM's recipe (`keras_glam.optimizers.recipe`): packed rows with attention masked at
document boundaries, Adafactor with `rsqrt(max(step, warmup))`, z-loss 1e-4, load-balance loss
0.01 per MoE layer, top-2 routing with capacity factor 2, non-finite steps skipped. Only the
scale differs, for a few minutes of CPU: 400 steps of 8 rows of 128 tokens (GLaM: rows of 1024,
~1M tokens per batch), and the constant phase of the learning rate shortened from 10000 steps
at 0.01 (which would cover the whole run) to 100 steps at 0.05, after which the rate decays as
`1/sqrt(step)` exactly as GLaM's does. Measured here (with the earlier held-out split, every
fifth document), held-out cross-entropy at step 200: 3.55
with this default, 3.59 with GLaM's exact schedule (`--warmup-steps 10000`, rate 0.01 throughout):
Adafactor's parameter-scaled steps make the rate forgiving, and the decay helps a little.

`--preset` takes a builtin name or a directory written by `save_to_preset` (for example an
earlier run's `preset/`): training then starts from its weights.

`--data` streams any corpus, of any size (`keras_glam.data.streaming.StreamingData`): text,
JSON lines, Parquet and TFRecord files, globs of shards, Hugging Face datasets, named and
weighed with `--mixture` (docs/data.md). Start-up reads bounded amounts only: the start of
every source, one batch of training tokens, `--held-out-documents` and `--baseline-tokens`.

A problem the user can fix (a bad flag, an unknown preset or a directory that is not one, a
missing file or a glob matching nothing, a JSON line without its text field, undecodable bytes,
a source without text, a mixture that is negative or names an unknown source, no held-out
document, a vocabulary that does not fit the model, too little text for one batch, an
`--output` that is a file, unwritable or holds an earlier run, a mesh that does not fit,
nothing to resume, a checkpoint whose data state was saved for other data or that predates
streamed resume, a run that diverged) ends the job with one line on stderr naming the problem and the fix, and exit code 2.
Problems with the input are found before the model is built and before anything in `--output`
is touched (what hides in the middle of a shard stops training with the same kind of line,
and the checkpoints written so far are kept).

The command shows only its own output: this module imports nothing heavy until the arguments
are parsed (`--help` is instant), and TensorFlow's, XLA's and SentencePiece's start-up logs are
hidden unless `--verbose 3`. The job itself is the library `keras_glam.training.job`.
"""

import argparse
import contextlib
import dataclasses
import logging
import sys

from keras_glam.cli_support import OneLineErrorParser
from keras_glam.cli_support import native_stderr_hidden
from keras_glam.cli_support import quiet_library_logs
from keras_glam.cli_support import report_user_error

DEFAULT_PRESET = "glam_small_16e"
DEFAULT_SEQUENCE_LENGTH = 128
DEFAULT_BATCH_SIZE = 8
DEFAULT_STEPS = 400
DEFAULT_WARMUP_STEPS = 100
DEFAULT_LEARNING_RATE = 0.05
DEFAULT_CHECKPOINT_INTERVAL = 50
HELD_OUT_FRACTION = 0.2
DEFAULT_HELD_OUT_DOCUMENTS = 1000
DEFAULT_SHUFFLE_BUFFER = 1000
DEFAULT_BASELINE_TOKENS = 2**20
# `--verbose` above Keras' own levels (0-2): also show what the libraries log.
LIBRARY_LOGS_VERBOSITY = 3


@dataclasses.dataclass
class TrainingJob:
    """The settings of one run of the main job (the command-line flags)."""

    output: str = "glam_run"
    preset: str = DEFAULT_PRESET
    data: tuple = ()  # `--data` specs (`keras_glam.data.streaming.parse_data_spec`).
    mixture: str = None  # `NAME=WEIGHT,...` over the named --data sources; None: equal.
    document_boundary: str = "blank_line"
    vocabulary: str = None
    sequence_length: int = DEFAULT_SEQUENCE_LENGTH
    batch_size: int = DEFAULT_BATCH_SIZE
    steps: int = DEFAULT_STEPS
    learning_rate: float = DEFAULT_LEARNING_RATE
    warmup_steps: int = DEFAULT_WARMUP_STEPS
    checkpoint_interval: int = DEFAULT_CHECKPOINT_INTERVAL
    keep_checkpoints: int = 3
    held_out_fraction: float = HELD_OUT_FRACTION
    held_out_documents: int = DEFAULT_HELD_OUT_DOCUMENTS
    shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER
    baseline_tokens: int = DEFAULT_BASELINE_TOKENS
    mixed_precision: bool = False
    mesh: str = None
    resume: bool = False
    seed: int = 0
    samples: int = None  # None: one sample per built-in prompt.
    sample_length: int = 64
    peak_tflops: float = None  # None: the data-sheet table, or a matmul timed on a CPU.
    verbose: object = "auto"


QUICK_SETTINGS = {
    "preset": "glam_tiny_8e",
    "sequence_length": 32,
    "batch_size": 4,
    "steps": 6,
    "checkpoint_interval": 3,
    "samples": 2,
    "sample_length": 12,
    "baseline_tokens": 2**16,
}


def parse_args(argv=None):
    """The command line as a `TrainingJob` (flags given explicitly override `--quick`)."""
    defaults = TrainingJob()
    parser = OneLineErrorParser(
        prog="glam-train",
        description="Train a GLaM mixture-of-experts language model with GLaM's recipe.",
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("--output", help=f"output directory (default: {defaults.output})")
    parser.add_argument(
        "--preset",
        help=(
            "builtin preset name or preset directory (from save_to_preset, e.g. an earlier "
            f"run's preset/) (default: {DEFAULT_PRESET})"
        ),
    )
    parser.add_argument(
        "--data",
        nargs="+",
        metavar="SPEC",
        help=(
            "sources to stream, each [NAME=][FORMAT[,KEY=VALUE...]:]PATH_OR_GLOB: text, jsonl, "
            "parquet, tfrecord files (format from the extension) or hf datasets, e.g. "
            "'shards/*.jsonl' or 'web=jsonl,field=content:crawl/*.jsonl.gz' (docs/data.md; "
            "default: Python's documentation)"
        ),
    )
    parser.add_argument(
        "--mixture",
        metavar="NAME=WEIGHT,...",
        help=(
            "weights of the named --data sources as shares of training tokens, e.g. GLaM's "
            "web=0.42,wikipedia=0.06,conversations=0.28,forums=0.02,books=0.20,news=0.02 "
            "(default: equal)"
        ),
    )
    parser.add_argument(
        "--document-boundary",
        choices=("blank_line", "line", "file"),
        help="how text files split into documents (default: blank_line, i.e. paragraphs)",
    )
    parser.add_argument("--vocabulary", help="a SentencePiece .spm file (default: the preset's)")
    parser.add_argument(
        "--sequence-length", type=int, help=f"tokens per row (default: {DEFAULT_SEQUENCE_LENGTH})"
    )
    parser.add_argument(
        "--batch-size", type=int, help=f"rows per batch (default: {DEFAULT_BATCH_SIZE})"
    )
    parser.add_argument("--steps", type=int, help=f"training steps (default: {DEFAULT_STEPS})")
    parser.add_argument(
        "--learning-rate",
        type=float,
        help=(
            "rate during the constant phase, then decayed as 1/sqrt(step) (default: "
            f"{DEFAULT_LEARNING_RATE}; with only --warmup-steps given, GLaM's 1/sqrt(warmup))"
        ),
    )
    parser.add_argument(
        "--warmup-steps",
        type=int,
        help=f"steps at the constant rate (default: {DEFAULT_WARMUP_STEPS}; GLaM: 10000)",
    )
    parser.add_argument(
        "--checkpoint-interval",
        type=int,
        metavar="STEPS",
        help=f"steps between checkpoints (default: {DEFAULT_CHECKPOINT_INTERVAL})",
    )
    parser.add_argument("--keep-checkpoints", type=int, help="checkpoints kept (default: 3)")
    parser.add_argument(
        "--held-out-fraction",
        type=float,
        help=f"share of whole documents held out, by hash (default: {HELD_OUT_FRACTION})",
    )
    parser.add_argument(
        "--held-out-documents",
        type=int,
        metavar="N",
        help=(
            "held-out documents evaluated, shared out by weight (default: "
            f"{DEFAULT_HELD_OUT_DOCUMENTS})"
        ),
    )
    parser.add_argument(
        "--shuffle-buffer",
        type=int,
        metavar="N",
        help=(
            "documents, then rows, in each source's shuffle buffers; checkpoints hold them "
            f"(default: {DEFAULT_SHUFFLE_BUFFER}; 0: no shuffling)"
        ),
    )
    parser.add_argument(
        "--baseline-tokens",
        type=int,
        metavar="N",
        help=(
            "training tokens counted for the unigram baseline (default: "
            f"{DEFAULT_BASELINE_TOKENS})"
        ),
    )
    parser.add_argument(
        "--mixed-precision",
        action="store_true",
        help="bfloat16 activations, float32 weights (GLaM's setting)",
    )
    parser.add_argument(
        "--mesh",
        help=(
            "device mesh over the axes data, expert, model, e.g. data=2,expert=4 "
            "(keras_glam.distribution.expert_parallel; default: one device)"
        ),
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue from the newest valid checkpoint"
    )
    parser.add_argument("--seed", type=int, help="seeds initialisation and data order (default: 0)")
    parser.add_argument(
        "--samples", type=int, help="samples printed at the end (default: one per built-in prompt)"
    )
    parser.add_argument(
        "--sample-length", type=int, metavar="TOKENS", help="tokens per sample (default: 64)"
    )
    parser.add_argument(
        "--peak-tflops",
        type=float,
        metavar="TFLOPS",
        help=(
            "peak TFLOP/s of one device, for MFU (default: the data-sheet table; on a CPU a "
            "matmul timed at start-up)"
        ),
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run in seconds: glam_tiny_8e, 6 steps of 4 x 32 tokens",
    )
    parser.add_argument(
        "--verbose",
        type=int,
        choices=(0, 1, 2, LIBRARY_LOGS_VERBOSITY),
        help=(
            "training progress: 0 none, 1 a progress bar, 2 a line per checkpoint interval "
            "(default: Keras' choice); 3 as 2, plus what TensorFlow, XLA and SentencePiece "
            "log (hidden otherwise)"
        ),
    )
    given = vars(parser.parse_args(argv))
    settings = dict(QUICK_SETTINGS) if given.pop("quick", False) else {}
    settings.update(given)
    if "data" in settings:
        settings["data"] = tuple(settings["data"])
    if "warmup_steps" in settings and "learning_rate" not in settings:
        settings["learning_rate"] = None  # GLaM's 1/sqrt(warmup_steps).
    return TrainingJob(**settings)


def run(job):
    """The whole main job in this process (`keras_glam.training.job.run`); returns the metrics."""
    from keras_glam.training import job as main_job

    return main_job.run(job, mesh_distribution(job))


def mesh_distribution(job):
    """The distribution of `--mesh` for the job's batch and preset, or None without a mesh."""
    if job.mesh is None:
        return None
    from keras_glam.distribution import mesh_distribution as distribution_of_mesh
    from keras_glam.models.presets import local_backbone_config

    num_experts = local_backbone_config(job.preset).get("num_experts")
    return distribution_of_mesh(job.mesh, job.batch_size, num_experts)


def main(argv=None):
    """Console entry point (`glam-train`, `python -m keras_glam.train`).

    Returns:
        The exit code: 0 when done, 2 for a problem the user can fix (reported in one line on
        stderr), 130 when interrupted.
    """
    job = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    library_logs = job.verbose == LIBRARY_LOGS_VERBOSITY
    if not library_logs:
        quiet_library_logs()
    try:
        with contextlib.nullcontext() if library_logs else native_stderr_hidden():
            # Imported here, after the arguments and the log levels: `--help` needs none of it.
            from keras_glam.training import job as main_job

            data = main_job.prepare(job, mesh_distribution(job))
        main_job.train(job, data)
    except KeyboardInterrupt:
        print(
            "glam-train: interrupted. Checkpoints already written are kept: continue with "
            "--resume.",
            file=sys.stderr,
        )
        return 130
    except Exception as error:
        return report_user_error("glam-train", error)
    return 0


if __name__ == "__main__":
    sys.exit(main())
