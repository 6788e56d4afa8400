"""The main job behind `glam-train` (`keras_glam.train`): check, prepare, train, report.

`prepare(job)` checks the settings, the preset, `--output` and the data and builds the input
pipelines without touching any output; `train(job, data)` builds the model, trains it with
`keras_glam.training.Trainer` and writes every output; `run(job)` does both. `job` is a
`keras_glam.train.TrainingJob`. Every problem a user can fix is raised as a `ValueError`,
`OSError`, `MemoryError` or `TrainingDivergedError` whose message names it and the fix;
`keras_glam.train.main` shows it as one line (`keras_glam.cli_support.user_error_message`).
"""

import dataclasses
import importlib.util
import math
import os
import tempfile
import time

import jax
import keras
import keras_hub
import tensorflow as tf

from keras_glam.data.embedded_corpus import pydoc_documents
from keras_glam.data.sources import DocumentList
from keras_glam.data.sources import source_summary
from keras_glam.data.streaming import StreamingData
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
# The source name of Python's documentation, the corpus without --data.
DOCUMENTATION_SOURCE = "pydoc"


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
        "held_out_documents",
        "baseline_tokens",
    ):
        value = getattr(job, name)
        if not (isinstance(value, int) and value >= 1):
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {value}.")
    for name in ("seed", "samples", "shuffle_buffer"):
        value = getattr(job, name)
        if value is not None and not (isinstance(value, int) and value >= 0):
            raise ValueError(f"--{name.replace('_', '-')} must be an integer >= 0, got {value}.")
    if job.mixture is not None and not job.data:
        raise ValueError(
            "--mixture weighs the sources of --data, and none is given. Pass --data "
            "NAME=PATH... for every source the mixture names."
        )
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


def streaming_data(job, tokenizer, num_hosts=1, host_index=0):
    """The job's `StreamingData`: the `--data` specs weighed by `--mixture`, or Python's
    documentation (one in-memory source, `DOCUMENTATION_SOURCE`) without `--data`. Each of
    `num_hosts` hosts reads its own share, in batches of `--batch-size / num_hosts` rows."""
    settings = dict(
        sequence_length=job.sequence_length,
        batch_size=job.batch_size // num_hosts,
        held_out_fraction=job.held_out_fraction,
        held_out_documents=job.held_out_documents,
        shuffle_buffer=job.shuffle_buffer,
        num_hosts=num_hosts,
        host_index=host_index,
    )
    if not job.data:
        documentation = DocumentList(pydoc_documents(), name=DOCUMENTATION_SOURCE)
        return StreamingData([documentation], tokenizer, **settings)
    return StreamingData.from_specs(
        job.data,
        tokenizer,
        mixture=job.mixture,
        document_boundary=job.document_boundary,
        seed=job.seed,
        **settings,
    )


@dataclasses.dataclass
class PreparedData:
    """The checked inputs of a run: the training stream, the held-out set and its baseline.

    Attributes:
        data: the `keras_glam.data.StreamingData` training reads (the `Trainer` saves its
            position in every checkpoint).
        tokenizer: the `GLaMTokenizer`.
        held_out: the held-out batches (padded, cached, of known length).
        held_out_tokens: the tokens the held-out loss averages over.
        unigram_entropy: the unigram baseline on the held-out tokens (nats/token).
        distribution: the `keras.distribution` to train under, or None.
    """

    data: object
    tokenizer: object
    held_out: object
    held_out_tokens: int
    unigram_entropy: float
    distribution: object = None


def prepare(job, distribution=None):
    """Check the settings, the preset, `--output` and the data, and build the input pipelines;
    touches no output. `distribution`: the `keras.distribution` to train under (the command
    builds it from `--mesh` with `keras_glam.distribution.mesh_distribution`), or None.

    The data is read in bounded amounts only: the start of every source (`StreamingData.check`),
    one batch worth of training tokens, the held-out set (`--held-out-documents`) and the
    baseline's sample (`--baseline-tokens`), so a corpus of any size starts in seconds.

    Every problem with the input (listed in `keras_glam.train`) is raised here, as a
    `ValueError` or `OSError` whose message says what to fix.
    """
    check_job(job)
    num_hosts, host_index = jax.process_count(), jax.process_index()
    if job.batch_size % num_hosts:
        raise ValueError(
            f"--batch-size {job.batch_size} cannot be shared out over {num_hosts} hosts. "
            "Choose a multiple of the number of hosts."
        )
    config = presets.local_backbone_config(job.preset)
    # Before any tokenizer exists: TensorFlow's seeding drops the tokenizer's kernel resources.
    keras.utils.set_random_seed(job.seed)
    tokenizer = load_tokenizer(job)
    vocabulary_size = config["vocabulary_size"]
    if tokenizer.vocabulary_size() != vocabulary_size:
        raise ValueError(
            f"The tokenizer has {tokenizer.vocabulary_size()} tokens but preset {job.preset!r} "
            f"has vocabulary_size={vocabulary_size}. Use the preset's own tokenizer (leave out "
            "--vocabulary) or a vocabulary of the same size."
        )
    data = streaming_data(job, tokenizer, num_hosts, host_index)
    data.check()
    tokens_per_batch = data.batch_size * data.sequence_length
    train_tokens = data.training_tokens(at_most=tokens_per_batch)
    if train_tokens < tokens_per_batch:
        raise ValueError(
            f"The training split has {train_tokens} tokens, fewer than one batch of "
            f"--batch-size {job.batch_size} x --sequence-length {job.sequence_length} = "
            f"{tokens_per_batch}. Add text, or choose a smaller batch or sequence length."
        )
    held_out = data.held_out_dataset()
    held_out_tokens = int(sum(weight.sum() for _, _, weight in held_out.as_numpy_iterator()))
    unigram_entropy = data.unigram_entropy(
        held_out, seed=job.seed, baseline_tokens=job.baseline_tokens
    )
    if distribution is not None and num_hosts > 1:
        # Each host already reads its own share of the data (`StreamingData`'s hosts), in
        # batches of its own rows: Keras must not shard the batches again.
        distribution.auto_shard_dataset = False
    return PreparedData(
        data=data,
        tokenizer=tokenizer,
        held_out=held_out,
        held_out_tokens=held_out_tokens,
        unigram_entropy=unigram_entropy,
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
        f"token); streaming {describe_sources(data.data)}, {data.held_out_tokens:,} held-out "
        f"tokens; {job.steps} steps of {job.batch_size} x {job.sequence_length} tokens."
    )
    meter = ComputeMeter.for_glam(
        lm, job.batch_size, job.sequence_length,
        peak_flops_per_device=job.peak_tflops and job.peak_tflops * 1e12,
    )
    trainer = Trainer(
        lm,
        data.data,
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


def describe_sources(data):
    """The sources of a `StreamingData` as one phrase, with their shares when mixed."""
    if len(data.sources) == 1:
        return source_summary(data.sources[0])
    return " + ".join(
        f"{weight:.0%} {source_summary(source)}"
        for source, weight in zip(data.sources, data.weights)
    )


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
        f"Unigram entropy:         {metrics['unigram_entropy']:.4f} nats/token (frequencies of "
        f"the first {job.baseline_tokens:,} training tokens, on the held-out tokens)"
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
