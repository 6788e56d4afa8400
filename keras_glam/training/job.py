"""The main job behind `glam-train` (`keras_glam.train`): check, prepare, train, report.

`prepare(job)` checks the settings, the preset, `--output` and the data and builds the input
pipelines without touching any output; `train(job, data)` builds the model, trains it with
`keras_glam.training.Trainer` and writes every output; `run(job)` does both. `job` is a
`keras_glam.train.TrainingJob`. Every problem a user can fix is raised as a `ValueError`,
`OSError`, `MemoryError` or `TrainingDivergedError` whose message names it and the fix;
`keras_glam.train.main` shows it as one line (`keras_glam.cli_support.user_error_message`).
"""

import codecs
import dataclasses
import functools
import glob
import importlib.util
import math
import os
import tempfile
import time

import keras
import keras_hub
import numpy as np
import tensorflow as tf

from keras_glam.data.embedded_corpus import pydoc_documents
from keras_glam.data.embedded_corpus import split_documents
from keras_glam.data.packing import packed_lm_dataset
from keras_glam.data.streaming import pad_batches
from keras_glam.data.streaming import unigram_cross_entropy
from keras_glam.data.text_sources import text_files
from keras_glam.models import presets
from keras_glam.models.architecture import MIXED_PRECISION_POLICY
from keras_glam.models.glam_causal_lm import GLaMCausalLM
from keras_glam.models.glam_causal_lm_preprocessor import GLaMCausalLMPreprocessor
from keras_glam.models.glam_tokenizer import GLaMTokenizer
from keras_glam.models.parameter_count import count_params
from keras_glam.optimizers.recipe import glam_optimizer
from keras_glam.training.callbacks import skipped_steps
from keras_glam.training.compute_meter import ComputeMeter
from keras_glam.training.plots import plot_training
from keras_glam.training.trainer import Trainer
from keras_glam.utils.atomic_files import replacing
from keras_glam.utils.atomic_files import write_json_atomically

SAMPLE_PROMPTS = ("The ", "If the ", "Note that ", "For example, ")


def check_job(job):
    """Validate the settings and `--output` (no data is read, nothing is built, nothing is left
    in `--output`).

    Raises:
        ValueError: naming the setting and the fix.
    """
    check_output(job.output)
    for name in (
        "sequence_length",
        "batch_size",
        "steps",
        "warmup_steps",
        "checkpoint_interval",
        "sample_length",
    ):
        value = getattr(job, name)
        if not (isinstance(value, int) and value >= 1):
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {value}.")
    for name in ("seed", "samples"):
        value = getattr(job, name)
        if value is not None and not (isinstance(value, int) and value >= 0):
            raise ValueError(f"--{name} must be an integer >= 0, got {value}.")
    if job.sequence_length < 2:
        raise ValueError("--sequence-length must be at least 2 (a token and its successor).")
    if job.learning_rate is not None and not job.learning_rate > 0:
        raise ValueError(f"--learning-rate must be positive, got {job.learning_rate}.")
    if not 0 < job.held_out_fraction < 1:
        raise ValueError(f"--held-out-fraction must be in (0, 1), got {job.held_out_fraction}.")
    if job.peak_tflops is not None and not job.peak_tflops > 0:
        raise ValueError(f"--peak-tflops must be positive, got {job.peak_tflops}.")
    if job.keep_checkpoints < 1:
        raise ValueError(f"--keep-checkpoints must be at least 1, got {job.keep_checkpoints}.")
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


def check_output(output):
    """`--output` must be a directory, or a path where one can be created by this user.

    Nothing is left behind: writability is tried with an empty directory that is removed again.
    """
    path = os.path.abspath(output)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(
            f"--output {output} is a file, not a directory. Choose a directory (it is created "
            "if missing)."
        )
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError(
            f"--output {output} lies under {existing}, which is a file. Choose another --output."
        )
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".glam-train-write-check-", dir=existing))
    except OSError as error:
        raise ValueError(
            f"--output {output}: cannot write in {existing} ({error.strerror}). Choose a "
            "directory you can write to."
        ) from None


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
    """`--vocabulary` as a `GLaMTokenizer`, or the preset's tokenizer (the preset is valid)."""
    fix = "Pass --vocabulary with a SentencePiece model of the preset's vocabulary_size"
    if job.vocabulary is not None:
        if not os.path.isfile(job.vocabulary):
            raise FileNotFoundError(f"--vocabulary: {job.vocabulary} does not exist.")
        try:
            return GLaMTokenizer(proto=job.vocabulary)
        except tf.errors.OpError:
            raise ValueError(
                f"--vocabulary: {job.vocabulary} is not a SentencePiece model. Pass an .spm "
                "file (`python -m keras_glam.data.vocabulary` shows how to train one)."
            ) from None
    if presets.builtin_preset_directory(job.preset) is not None:
        if not presets.builtin_preset_has_tokenizer(job.preset):
            with_vocabulary = [
                name for name in presets.builtin_preset_names()
                if presets.builtin_preset_has_tokenizer(name)
            ]
            raise ValueError(
                f"--preset {job.preset} is an architecture without a vocabulary (GLaM's was "
                f"never published). {fix}, or choose a preset that has one: "
                f"{', '.join(with_vocabulary)}."
            )
    elif not os.path.isfile(os.path.join(job.preset, "tokenizer.json")):
        raise ValueError(
            f"--preset {job.preset} holds no tokenizer (tokenizer.json). {fix}, or save the "
            "preset from a GLaMCausalLM that has a preprocessor."
        )
    return GLaMTokenizer.from_preset(job.preset)


def token_counts(documents, tokenizer, vocabulary_size):
    """Token frequencies of `documents` as the packer sees them (each ends with `</s>`)."""
    counts = np.zeros(vocabulary_size, dtype="float64")
    for document in documents:
        ids = np.asarray(tokenizer(document))
        np.add.at(counts, ids, 1.0)
        counts[tokenizer.end_token_id] += 1.0
    return counts


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


def prepare(job, distribution=None):
    """Check the settings, the preset, `--output` and the data, and build the input pipelines;
    touches no output. `distribution`: the `keras.distribution` to train under (the command
    builds it from `--mesh` with `keras_glam.distribution.mesh_distribution`), or None.

    Every problem with the input (listed in `keras_glam.train`) is raised here, as a
    `ValueError` or `OSError` whose message says what to fix.
    """
    check_job(job)
    config = presets.local_backbone_config(job.preset)
    # Before any tokenizer exists: TensorFlow's seeding drops the tokenizer's kernel resources.
    keras.utils.set_random_seed(job.seed)
    documents = load_documents(job)
    tokenizer = load_tokenizer(job)
    vocabulary_size = config["vocabulary_size"]
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
    held_out = pad_batches(held_out, job.batch_size).cache()
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


def train(job, data):
    """Build, train and evaluate the model on prepared data; write every output.

    Returns:
        The metrics dict also written to `metrics.json`.
    """
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
    os.makedirs(job.output, exist_ok=True)
    total_params, activated_params = count_params(lm.backbone.get_config())
    print(
        f"GLaM {job.preset}: {total_params:,} parameters ({activated_params:,} activated per "
        f"token); {len(data.train_documents)} training and {len(data.held_out_documents)} "
        f"held-out documents ({data.train_tokens:,} training tokens); {job.steps} steps of "
        f"{job.batch_size} x {job.sequence_length} tokens."
    )
    meter = ComputeMeter.for_glam(
        lm, job.batch_size, job.sequence_length,
        peak_flops_per_device=job.peak_tflops and job.peak_tflops * 1e12,
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
        callbacks=[meter, *_tensorboard_callbacks(job.output)],
        verbose=job.verbose if job.verbose == "auto" else min(job.verbose, 2),
    )
    start = time.perf_counter()
    state = trainer.fit()
    training_seconds = time.perf_counter() - start

    evaluation = trainer.evaluate(data.held_out)
    samples = generate_samples(lm, job)
    with replacing(os.path.join(job.output, "preset")) as preset_dir:
        lm.save_to_preset(preset_dir)
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
        **meter.summary(),
    }
    write_json_atomically(os.path.join(job.output, "metrics.json"), metrics, sort_keys=True)
    print_report(metrics, job)
    return metrics


def _tensorboard_callbacks(output):
    """`[keras.callbacks.TensorBoard]` writing to `output/tensorboard`, if TensorBoard is
    installed (Keras needs the `tensorboard` package to write summaries)."""
    if importlib.util.find_spec("tensorboard") is None:
        print("TensorBoard logs are off: `pip install tensorboard` to get them.")
        return []
    return [keras.callbacks.TensorBoard(os.path.join(output, "tensorboard"))]


def run(job, distribution=None):
    """`prepare` then `train`: the whole main job. Returns the metrics."""
    return train(job, prepare(job, distribution))


def generate_samples(lm, job):
    """A few continuations of fixed prompts, sampled with top-k (k=40, temperature 0.8)."""
    prompts = list(SAMPLE_PROMPTS[: job.samples])
    if not prompts:
        return []
    # A mesh splits the batch of prompts over its batch shards: fill it to a multiple.
    distribution = keras.distribution.distribution()
    shards = getattr(distribution, "num_model_replicas", 1)
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
    mfu_key = "mfu" if "mfu" in metrics else "mfu_vs_measured_peak"
    print(
        f"Model FLOPs: {metrics['tflops_per_device'] * 1e3:,.1f} GFLOP/s per device, MFU "
        f"{metrics[mfu_key]:.1%} of {metrics['peak_tflops_per_device'] * 1e3:,.1f} GFLOP/s "
        f"({metrics['peak_source']})."
    )
    for sample in metrics["samples"]:
        print("-" * 72)
        print(sample)
    print("-" * 72)
    print(f"Wrote {job.output}/: preset/, checkpoints/, training.png, metrics.json, tensorboard/")
