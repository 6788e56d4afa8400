"""Train GLaM the paper's way: `python -m keras_glam.train` (or the `glam-train` command).

With no arguments, offline, in 4 to 10 minutes on two CPU cores (262 s measured on two idle
cores, about 9 minutes on cores shared with other jobs), it trains the small MoE preset
`glam_small_16e` on Python's own documentation (`pydoc_data.topics`, held-out split by whole
documents), then writes to `--output` (default `glam_run/`):

- `checkpoints/`: atomic training-state checkpoints (resume with `--resume`, also after kill -9),
- `preset/`: the trained model (`keras_glam.GLaMCausalLM.from_preset("glam_run/preset")`),
- `training.png`: loss curves (train and held-out) and the per-layer expert load,
- `metrics.json`: held-out cross-entropy, the unigram-entropy baseline, tokens seen, tokens/s,
  steps, skipped steps and rollbacks,
- `tensorboard/`: the same metrics for TensorBoard.

It follows GLaM's recipe (`keras_glam.training.recipe`): packed rows with attention masked at
document boundaries, Adafactor with `rsqrt(max(step, warmup))`, z-loss 1e-4, load-balance loss
0.01 per MoE layer, top-2 routing with capacity factor 2, non-finite steps skipped. Only the
scale differs, for a few minutes of CPU: 400 steps of 8 rows of 128 tokens (GLaM: rows of 1024,
~1M tokens per batch), and the constant phase of the learning rate shortened from 10000 steps
at 0.01 (which would cover the whole run) to 100 steps at 0.05, after which the rate decays as
`1/sqrt(step)` exactly as GLaM's does. Measured here, held-out cross-entropy at step 200: 3.55
with this default, 3.59 with GLaM's exact schedule (`--warmup-steps 10000`, rate 0.01 throughout):
Adafactor's parameter-scaled steps make the rate forgiving, and the decay helps a little.

Bad input (no text, undecodable bytes, a vocabulary that does not fit the model, too little text
for one batch, an output directory holding an earlier run) stops the job with a message saying
what to fix, before the model is built and before anything in `--output` is touched.
"""

import argparse
import codecs
import dataclasses
import functools
import glob
import importlib.util
import json
import logging
import math
import os
import shutil
import sys
import time
import uuid

import keras
import keras_hub
import numpy as np
import tensorflow as tf

from keras_glam.data.embedded_corpus import pydoc_documents
from keras_glam.data.embedded_corpus import split_documents
from keras_glam.data.packing import packed_lm_dataset
from keras_glam.data.text_sources import text_files
from keras_glam.distribution import MESH_AXES
from keras_glam.distribution import expert_parallel
from keras_glam.models import preset_loading
from keras_glam.models.glam_causal_lm import GLaMCausalLM
from keras_glam.models.glam_causal_lm_preprocessor import GLaMCausalLMPreprocessor
from keras_glam.models.glam_tokenizer import GLaMTokenizer
from keras_glam.models.parameter_count import count_params
from keras_glam.training.callbacks import skipped_steps
from keras_glam.training.plots import plot_training
from keras_glam.training.recipe import MIXED_PRECISION_POLICY
from keras_glam.training.recipe import glam_optimizer
from keras_glam.training.trainer import Trainer

DEFAULT_PRESET = "glam_small_16e"
DEFAULT_SEQUENCE_LENGTH = 128
DEFAULT_BATCH_SIZE = 8
DEFAULT_STEPS = 400
DEFAULT_WARMUP_STEPS = 100
DEFAULT_LEARNING_RATE = 0.05
DEFAULT_CHECKPOINT_INTERVAL = 50
HELD_OUT_FRACTION = 0.2
SAMPLE_PROMPTS = ("The ", "If the ", "Note that ", "For example, ")


@dataclasses.dataclass
class TrainingJob:
    """The settings of one run of the main job (the command-line flags)."""

    output: str = "glam_run"
    preset: str = DEFAULT_PRESET
    data: tuple = ()
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
    mixed_precision: bool = False
    mesh: str = None
    resume: bool = False
    seed: int = 0
    samples: int = len(SAMPLE_PROMPTS)
    sample_length: int = 64
    verbose: object = "auto"


QUICK_SETTINGS = {
    "preset": "glam_tiny_8e",
    "sequence_length": 32,
    "batch_size": 4,
    "steps": 6,
    "checkpoint_interval": 3,
    "samples": 2,
    "sample_length": 12,
}


def parse_args(argv=None):
    """The command line as a `TrainingJob` (flags given explicitly override `--quick`)."""
    defaults = TrainingJob()
    parser = argparse.ArgumentParser(
        prog="glam-train",
        description="Train a GLaM mixture-of-experts language model with GLaM's recipe.",
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("--output", help=f"output directory (default: {defaults.output})")
    parser.add_argument(
        "--preset",
        help=f"builtin preset name or preset directory (default: {DEFAULT_PRESET})",
    )
    parser.add_argument(
        "--data",
        nargs="+",
        metavar="FILE",
        help="UTF-8 text files or glob patterns to train on (default: Python's documentation)",
    )
    parser.add_argument(
        "--document-boundary",
        choices=("blank_line", "line", "file"),
        help="how --data files split into documents (default: blank_line, i.e. paragraphs)",
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
        help=f"share of whole documents held out (default: {HELD_OUT_FRACTION})",
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
        "--samples", type=int, help=f"samples printed at the end (default: {len(SAMPLE_PROMPTS)})"
    )
    parser.add_argument(
        "--sample-length", type=int, metavar="TOKENS", help="tokens per sample (default: 64)"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run in seconds: glam_tiny_8e, 6 steps of 4 x 32 tokens",
    )
    parser.add_argument("--verbose", type=int, choices=(0, 1, 2), help="Keras fit verbosity")
    given = vars(parser.parse_args(argv))
    settings = dict(QUICK_SETTINGS) if given.pop("quick", False) else {}
    settings.update(given)
    if "data" in settings:
        settings["data"] = tuple(settings["data"])
    if "warmup_steps" in settings and "learning_rate" not in settings:
        settings["learning_rate"] = None  # GLaM's 1/sqrt(warmup_steps).
    return TrainingJob(**settings)


def check_job(job):
    """Validate the settings (no file is read, nothing is built). Raises `ValueError`."""
    for name in ("sequence_length", "batch_size", "steps", "warmup_steps", "checkpoint_interval"):
        value = getattr(job, name)
        if not (isinstance(value, int) and value >= 1):
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {value}.")
    if job.sequence_length < 2:
        raise ValueError("--sequence-length must be at least 2 (a token and its successor).")
    if job.learning_rate is not None and not job.learning_rate > 0:
        raise ValueError(f"--learning-rate must be positive, got {job.learning_rate}.")
    if not 0 < job.held_out_fraction < 1:
        raise ValueError(f"--held-out-fraction must be in (0, 1), got {job.held_out_fraction}.")
    if job.keep_checkpoints < 1:
        raise ValueError(f"--keep-checkpoints must be at least 1, got {job.keep_checkpoints}.")
    if job.mesh is not None:
        _parse_mesh(job.mesh)
    checkpoints = os.path.join(job.output, "checkpoints")
    has_checkpoints = os.path.isdir(checkpoints) and any(
        name.startswith("ckpt-") for name in os.listdir(checkpoints)
    )
    if has_checkpoints and not job.resume:
        raise ValueError(
            f"{job.output} already holds checkpoints of an earlier run (nothing was changed). "
            "Pass --resume to continue it, or choose another --output."
        )
    if job.resume and not has_checkpoints:
        raise ValueError(
            f"--resume: {checkpoints} holds no checkpoint to resume from. Run without --resume "
            "to start training, or point --output at the earlier run."
        )


def _parse_mesh(spec):
    """`"data=2,expert=4"` -> `{"data": 2, "expert": 4}` (axes of `MESH_AXES`)."""
    axes = {}
    for part in spec.split(","):
        name, _, size = (piece.strip() for piece in part.partition("="))
        if name not in MESH_AXES or name in axes or not size.isdigit() or int(size) < 1:
            raise ValueError(
                f"--mesh must be axis=size pairs over the axes {', '.join(MESH_AXES)}, e.g. "
                f"data=2,expert=4; got {spec!r}."
            )
        axes[name] = int(size)
    return axes


def mesh_distribution(job):
    """The `keras_glam.distribution.expert_parallel` distribution of `--mesh`, or None.

    Checks that the mesh fits the devices, the batch and the preset's experts.
    """
    if job.mesh is None:
        return None
    axes = _parse_mesh(job.mesh)
    batch_shards = axes.get("data", 1) * axes.get("expert", 1)
    if job.batch_size % batch_shards:
        raise ValueError(
            f"--batch-size {job.batch_size} cannot be split over the {batch_shards} batch shards "
            f"of --mesh {job.mesh} (data x expert): choose a multiple of {batch_shards}."
        )
    experts = preset_config(job.preset).get("num_experts")
    if experts and experts % axes.get("expert", 1):
        raise ValueError(
            f"--mesh {job.mesh}: the expert axis must divide the preset's {experts} experts."
        )
    devices = keras.distribution.list_devices()
    needed = batch_shards * axes.get("model", 1)
    if "data" in axes and needed != len(devices):
        raise ValueError(
            f"--mesh {job.mesh} needs {needed} devices, there are {len(devices)}. Leave out "
            "`data=` to use every device, or on CPU set "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={needed} before starting."
        )
    return expert_parallel(
        data=axes.get("data"), expert=axes.get("expert", 1), model=axes.get("model", 1)
    )


def check_text_files(paths):
    """Expand glob patterns and check that every file is non-empty, decodable UTF-8 text.

    Returns:
        The sorted list of matching file paths.

    Raises:
        FileNotFoundError: a pattern matches nothing.
        ValueError: a file has bytes that are not UTF-8 (naming the file, byte offset and line).
    """
    files = []
    for pattern in paths:
        matches = sorted(glob.glob(os.fspath(pattern)))
        if not matches:
            raise FileNotFoundError(f"--data: no file matches {os.fspath(pattern)!r}.")
        files.extend(path for path in matches if os.path.isfile(path))
    for path in files:
        decoder = codecs.getincrementaldecoder("utf-8")()
        offset, line = 0, 1
        with open(path, "rb") as file:
            for block in iter(lambda: file.read(1 << 20), b""):
                try:
                    decoder.decode(block)
                except UnicodeDecodeError as error:
                    position = offset + error.start
                    line += block[: error.start].count(b"\n")
                    raise ValueError(
                        f"--data: {path} is not UTF-8 text: byte {position} (line {line}) is "
                        f"{block[error.start:error.start + 1]!r}. Convert the file to UTF-8 (e.g. "
                        f"`iconv -f latin1 -t utf-8 {path}`) or leave it out."
                    ) from None
                offset += len(block)
                line += block.count(b"\n")
            try:
                decoder.decode(b"", final=True)
            except UnicodeDecodeError:
                raise ValueError(
                    f"--data: {path} ends in the middle of a UTF-8 character (truncated file?). "
                    "Repair or leave out the file."
                ) from None
    return files


def load_documents(job):
    """The corpus as a list of documents: `--data` files, or Python's documentation."""
    if not job.data:
        return pydoc_documents()
    files = check_text_files(job.data)
    documents = [
        document.decode("utf-8")
        for document in text_files(files, job.document_boundary).as_numpy_iterator()
    ]
    documents = [document for document in documents if document.strip()]
    if not documents:
        raise ValueError(
            f"--data: {', '.join(files)} hold no text (every document is empty or blank). "
            "Pass files with text."
        )
    return documents


def load_tokenizer(job):
    """`--vocabulary` as a `GLaMTokenizer`, or the preset's tokenizer."""
    if job.vocabulary is not None:
        if not os.path.isfile(job.vocabulary):
            raise FileNotFoundError(f"--vocabulary: {job.vocabulary} does not exist.")
        return GLaMTokenizer(proto=job.vocabulary)
    return GLaMTokenizer.from_preset(job.preset)


def preset_config(preset):
    """The backbone config of a builtin preset or a preset directory (nothing is built)."""
    config = preset_loading.builtin_backbone_config(preset)
    if config is None:
        preset_loading.check_handle(preset)
        with open(os.path.join(preset, "config.json"), encoding="utf-8") as file:
            config = json.load(file)["config"]
    return config


def token_counts(documents, tokenizer, vocabulary_size):
    """Token frequencies of `documents` as the packer sees them (each ends with `</s>`)."""
    counts = np.zeros(vocabulary_size, dtype="float64")
    for document in documents:
        ids = np.asarray(tokenizer(document))
        np.add.at(counts, ids, 1.0)
        counts[tokenizer.end_token_id] += 1.0
    return counts


def unigram_cross_entropy(train_counts, held_out_dataset):
    """Held-out cross-entropy (nats/token) of the add-one-smoothed unigram model of the training
    split, over exactly the targets and weights the model's held-out loss uses."""
    log_probability = np.log((train_counts + 1.0) / (train_counts.sum() + len(train_counts)))
    total, weight = 0.0, 0.0
    for _, labels, sample_weight in held_out_dataset.as_numpy_iterator():
        total -= float(np.sum(log_probability[labels] * sample_weight))
        weight += float(np.sum(sample_weight))
    return total / weight


def _write_json_atomically(path, values):
    temporary = f"{path}.tmp-{uuid.uuid4().hex}"
    with open(temporary, "w", encoding="utf-8") as file:
        json.dump(values, file, indent=2, sort_keys=True)
        file.write("\n")
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)


def _save_preset_atomically(lm, directory):
    """`save_to_preset` into a temporary directory, then swap it in place of `directory`."""
    parent = os.path.dirname(os.path.abspath(directory))
    temporary = os.path.join(parent, f".tmp-preset-{uuid.uuid4().hex}")
    lm.save_to_preset(temporary)
    if os.path.exists(directory):
        previous = os.path.join(parent, f".tmp-old-preset-{uuid.uuid4().hex}")
        os.replace(directory, previous)
        os.replace(temporary, directory)
        shutil.rmtree(previous, ignore_errors=True)
    else:
        os.replace(temporary, directory)


@dataclasses.dataclass
class PreparedData:
    """The checked inputs of a run: the corpus split, the tokenizer and the datasets."""

    train_documents: list
    held_out_documents: list
    tokenizer: object
    train_tokens: int
    make_dataset: object
    held_out: object
    unigram_entropy: float
    distribution: object = None


def prepare(job):
    """Check the settings and the data and build the input pipelines; touches no output.

    Every problem with the input (see the module docstring) is raised here, as a `ValueError`,
    `FileNotFoundError` or `FileExistsError` whose message says what to fix.
    """
    check_job(job)
    distribution = mesh_distribution(job)
    # Before any tokenizer exists: TensorFlow's seeding drops the tokenizer's kernel resources.
    keras.utils.set_random_seed(job.seed)
    documents = load_documents(job)
    tokenizer = load_tokenizer(job)
    vocabulary_size = preset_config(job.preset)["vocabulary_size"]
    if tokenizer.vocabulary_size() != vocabulary_size:
        raise ValueError(
            f"The tokenizer has {tokenizer.vocabulary_size()} tokens but preset {job.preset!r} "
            f"has vocabulary_size={vocabulary_size}. Use the preset's own tokenizer (leave out "
            "--vocabulary) or a vocabulary of the same size."
        )
    if len(documents) < 2:
        raise ValueError(
            f"The corpus has {len(documents)} document; the held-out split needs at least 2 "
            "whole documents. Add text, or split the files into more documents with "
            "--document-boundary blank_line or line."
        )
    train_documents, held_out_documents = split_documents(documents, job.held_out_fraction)
    if not held_out_documents:
        raise ValueError(
            f"--held-out-fraction {job.held_out_fraction} of {len(documents)} documents leaves "
            "no whole document to hold out. Add documents or raise --held-out-fraction."
        )
    train_counts = token_counts(train_documents, tokenizer, vocabulary_size)
    tokens_per_batch = job.batch_size * job.sequence_length
    if train_counts.sum() < tokens_per_batch:
        raise ValueError(
            f"The training split has {int(train_counts.sum())} tokens, fewer than one batch of "
            f"--batch-size {job.batch_size} x --sequence-length {job.sequence_length} = "
            f"{tokens_per_batch}. Add text, or choose a smaller batch or sequence length."
        )
    make_dataset = functools.partial(
        packed_lm_dataset,
        train_documents,
        tokenizer,
        sequence_length=job.sequence_length,
        batch_size=job.batch_size,
        shuffle_buffer=len(train_documents),
        repeat=True,
    )
    held_out = packed_lm_dataset(
        held_out_documents,
        tokenizer,
        sequence_length=job.sequence_length,
        batch_size=job.batch_size,
        shuffle_buffer=0,
        drop_remainder=False,
    )
    held_out = held_out.map(functools.partial(_pad_rows, batch_size=job.batch_size)).cache()
    # A known length lets Keras end each evaluation without an "ran out of data" warning.
    held_out_batches = sum(1 for _ in held_out)
    held_out = held_out.apply(tf.data.experimental.assert_cardinality(held_out_batches))
    return PreparedData(
        train_documents=train_documents,
        held_out_documents=held_out_documents,
        tokenizer=tokenizer,
        train_tokens=int(train_counts.sum()),
        make_dataset=make_dataset,
        held_out=held_out,
        unigram_entropy=unigram_cross_entropy(train_counts, held_out),
        distribution=distribution,
    )


def _pad_rows(x, y, sample_weight, batch_size):
    """Pad a short last batch with empty rows (padding mask and weight 0), so that every held-out
    batch has the same shape (one compiled evaluation; shardable over a mesh)."""
    paddings = [[0, batch_size - tf.shape(y)[0]], [0, 0]]

    def pad(tensor):
        return tf.ensure_shape(tf.pad(tensor, paddings), [batch_size, tensor.shape[1]])

    return {name: pad(value) for name, value in x.items()}, pad(y), pad(sample_weight)


def train(job, data):
    """Build, train and evaluate the model on prepared data; write every output.

    Returns:
        The metrics dict also written to `metrics.json`.
    """
    os.makedirs(job.output, exist_ok=True)
    if data.distribution is not None:
        # Before the model is built; its MoE layers then dispatch with GShard's einsums.
        keras.distribution.set_distribution(data.distribution)
    lm = GLaMCausalLM.from_preset(
        job.preset,
        dtype=MIXED_PRECISION_POLICY if job.mixed_precision else None,
        preprocessor=GLaMCausalLMPreprocessor(
            tokenizer=data.tokenizer, sequence_length=job.sequence_length
        ),
    )
    lm.compile(optimizer=glam_optimizer(job.warmup_steps, job.learning_rate))
    total_params, activated_params = count_params(lm.backbone.get_config())
    print(
        f"GLaM {job.preset}: {total_params:,} parameters ({activated_params:,} activated per "
        f"token); {len(data.train_documents)} training and {len(data.held_out_documents)} "
        f"held-out documents ({data.train_tokens:,} training tokens); {job.steps} steps of "
        f"{job.batch_size} x {job.sequence_length} tokens."
    )
    trainer = Trainer(
        lm,
        data.make_dataset,
        total_steps=job.steps,
        checkpoint_dir=os.path.join(job.output, "checkpoints"),
        checkpoint_interval=job.checkpoint_interval,
        max_checkpoints=job.keep_checkpoints,
        seed=job.seed,
        validation_data=data.held_out,
        resume=job.resume,
        callbacks=_tensorboard_callbacks(job.output),
        verbose=job.verbose,
    )
    start = time.perf_counter()
    state = trainer.fit()
    training_seconds = time.perf_counter() - start

    evaluation = trainer.evaluate(data.held_out)
    samples = generate_samples(lm, job)
    _save_preset_atomically(lm, os.path.join(job.output, "preset"))
    plot_training(
        state,
        os.path.join(job.output, "training.png"),
        unigram_entropy=data.unigram_entropy,
        title=f"GLaM {job.preset} on {'your data' if job.data else 'Python documentation'}",
    )
    speeds = [chunk["tokens_per_second"] for chunk in state.chunk_logs]
    metrics = {
        "preset": job.preset,
        "parameters": total_params,
        "activated_parameters": activated_params,
        "held_out_cross_entropy": evaluation["cross_entropy"],
        # The three token-weighted terms (Keras' own `loss` weighs batches by their rows).
        "held_out_loss": sum(evaluation[k] for k in ("cross_entropy", "z_loss", "aux_loss")),
        "unigram_entropy": data.unigram_entropy,
        "steps": state.step,
        "tokens_seen": state.step * trainer.tokens_per_step,
        "tokens_per_second": float(sum(speeds) / len(speeds)) if speeds else math.nan,
        "training_seconds": training_seconds,
        "skipped_steps": skipped_steps(lm) or 0,
        "rollbacks": state.rollbacks,
        "sequence_length": job.sequence_length,
        "batch_size": job.batch_size,
        "samples": samples,
    }
    _write_json_atomically(os.path.join(job.output, "metrics.json"), metrics)
    print_report(metrics, job)
    return metrics


def _tensorboard_callbacks(output):
    """`[keras.callbacks.TensorBoard]` writing to `output/tensorboard`, if TensorBoard is
    installed (Keras needs the `tensorboard` package to write summaries)."""
    if importlib.util.find_spec("tensorboard") is None:
        print("TensorBoard logs are off: `pip install tensorboard` to get them.")
        return []
    return [keras.callbacks.TensorBoard(os.path.join(output, "tensorboard"))]


def run(job):
    """`prepare` then `train`: the whole main job. Returns the metrics."""
    return train(job, prepare(job))


def generate_samples(lm, job):
    """A few continuations of fixed prompts, sampled with top-k (k=40, temperature 0.8)."""
    prompts = list(SAMPLE_PROMPTS[: job.samples])
    if not prompts:
        return []
    # A mesh splits the batch of prompts over its batch shards: fill it to a multiple.
    axes = _parse_mesh(job.mesh) if job.mesh else {}
    shards = axes.get("data", 1) * axes.get("expert", 1)
    batch = [prompts[i % len(prompts)] for i in range(-(-len(prompts) // shards) * shards)]
    lm.compile(
        optimizer=lm.optimizer,
        sampler=keras_hub.samplers.TopKSampler(k=40, temperature=0.8, seed=job.seed),
    )
    prompt_tokens = max(len(lm.preprocessor.tokenizer(prompt)) for prompt in prompts)
    outputs = lm.generate(batch, max_length=prompt_tokens + job.sample_length)
    return [str(output) for output in outputs[: len(prompts)]]


def print_report(metrics, job):
    print()
    print(f"Held-out cross-entropy:  {metrics['held_out_cross_entropy']:.4f} nats/token")
    print(
        f"Unigram entropy:         {metrics['unigram_entropy']:.4f} nats/token (train-split token "
        "frequencies on the held-out tokens)"
    )
    print(
        f"Tokens seen: {metrics['tokens_seen']:,} in {metrics['steps']} steps, "
        f"{metrics['tokens_per_second']:,.0f} tokens/s, {metrics['skipped_steps']} skipped steps, "
        f"{metrics['rollbacks']} rollbacks."
    )
    for sample in metrics["samples"]:
        print("-" * 72)
        print(sample)
    print("-" * 72)
    print(f"Wrote {job.output}/: preset/, checkpoints/, training.png, metrics.json, tensorboard/")


def main(argv=None):
    """Console entry point (`glam-train`, `python -m keras_glam.train`)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    job = parse_args(argv)
    try:
        data = prepare(job)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        print(f"glam-train: error: {error}", file=sys.stderr)
        return 2
    train(job, data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
