"""The streaming input pipeline: its speed against the training step, its memory, the filter.

    KERAS_BACKEND=jax python benchmarks/input_pipeline.py                    # 50 MB and 2 GB
    KERAS_BACKEND=jax python benchmarks/input_pipeline.py --sizes-mb 50 400  # smaller
    KERAS_BACKEND=jax python benchmarks/input_pipeline.py --quick            # 20 MB, seconds

What one run measures, with the main job's settings (`glam_small_16e`'s tokenizer and model,
rows of 128 tokens, batches of 8, `keras_glam.data.streaming.StreamingData` over JSON lines
shards of a generated corpus):

- **Headroom**: training tokens per second the input pipeline delivers (reading, JSON parsing,
  held-out split, tokenising, packing, shuffling, batching), against the tokens per second
  `glam_small_16e`'s training step consumes (a compiled step on one fixed batch). Medians of
  timed chunks, alternated so that both see the same machine load. Target: >= 5x.
- **Memory**: for each corpus size, a fresh process builds the pipeline, streams every
  document of the corpus through the source and the held-out split, then draws training
  batches; its peak resident memory
  is reported (sampled every 20 ms, above its size before the pipeline is built). Target: the
  2 GB corpus adds less than 100 MB over the 50 MB one.
- **Filter**: documents per second of the quality filter step (`score_documents`: hashed
  n-gram features, the logistic regression, the Pareto rule) against reading the same
  documents without it.

The corpus: paragraphs of Python's documentation and of the standard library's docstrings,
each tagged with its index (so no two documents are equal), written as JSON lines shards of at
most 64 MB until the size is reached (`--workdir`, default a temporary directory).
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time

SHARD_BYTES = 64 << 20


def parse_arguments(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes-mb", type=int, nargs="+", default=[50, 2048])
    parser.add_argument("--workdir", help="where corpora are written (default: a temp dir)")
    parser.add_argument("--preset", default="glam_small_16e")
    parser.add_argument("--sequence-length", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5, help="timed chunks of each")
    parser.add_argument("--pipeline-batches", type=int, default=100, help="batches per chunk")
    parser.add_argument("--train-steps", type=int, default=5, help="training steps per chunk")
    parser.add_argument("--filter-documents", type=int, default=20000)
    parser.add_argument("--memory-batches", type=int, default=500,
                        help="training batches drawn after the full pass (memory runs)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--memory-run", nargs=2, metavar=("CORPUS", "JSON_OUT"),
                        help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def base_paragraphs():
    """Paragraphs of Python's documentation and of the standard library's docstrings."""
    import ast
    import sysconfig

    from keras_glam.data.embedded_corpus import pydoc_documents

    paragraphs = [p for page in pydoc_documents() for p in page.split("\n\n") if p.strip()]
    library = sysconfig.get_paths()["stdlib"]
    for name in sorted(os.listdir(library)):
        if name.endswith(".py"):
            with open(os.path.join(library, name), encoding="utf-8") as file:
                tree = ast.parse(file.read())
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)):
                    docstring = ast.get_docstring(node)
                    if docstring:
                        paragraphs.extend(p for p in docstring.split("\n\n") if p.strip())
    return paragraphs


def write_corpus(directory, size_mb):
    """JSON lines shards totalling `size_mb` MB (reused when already there)."""
    done = os.path.join(directory, "DONE")
    if os.path.exists(done):
        return
    os.makedirs(directory, exist_ok=True)
    paragraphs = base_paragraphs()
    target, written, shard, index = size_mb << 20, 0, 0, 0
    while written < target:
        with open(os.path.join(directory, f"corpus-{shard:05d}.jsonl"), "w") as file:
            shard_bytes = 0
            while shard_bytes < SHARD_BYTES and written + shard_bytes < target:
                line = json.dumps({"text": f"{paragraphs[index % len(paragraphs)]} [{index}]"})
                file.write(line + "\n")
                shard_bytes += len(line) + 1
                index += 1
        written += shard_bytes
        shard += 1
    open(done, "w").close()


def streaming_data(corpus, args, tokenizer):
    from keras_glam.data.streaming import StreamingData

    return StreamingData.from_specs(
        [f"data={corpus}/*.jsonl"], tokenizer, sequence_length=args.sequence_length,
        batch_size=args.batch_size,
    )


def resident_mb():
    """Resident memory of this process now, in MB (Linux: /proc/self/status)."""
    with open("/proc/self/status") as file:
        for line in file:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


class PeakMemory:
    """Samples `resident_mb()` every 20 ms on a thread; `.peak` is the largest seen."""

    def __init__(self):
        self.peak = resident_mb()
        self._running = True
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self):
        while self._running:
            self.peak = max(self.peak, resident_mb())
            time.sleep(0.02)

    def stop(self):
        self._running = False
        self._thread.join()
        return self.peak


def memory_run(corpus, out, args):
    """In a fresh process: stream the whole corpus, then draw batches; write the figures."""
    import keras_glam  # noqa: F401

    from keras_glam.models.glam_tokenizer import GLaMTokenizer

    tokenizer = GLaMTokenizer.from_preset(args.preset)
    before = resident_mb()
    sampler = PeakMemory()
    data = streaming_data(corpus, args, tokenizer)
    data.check()
    start = time.perf_counter()
    documents = 0
    for source in data.sources:
        for batch in data.split_documents(source, held_out=False).batch(1024).as_numpy_iterator():
            documents += len(batch)
    documents_seconds = time.perf_counter() - start
    iterator = data.training_iterator(seed=0)
    for _ in range(args.memory_batches):
        next(iterator)
    peak = sampler.stop()
    with open(out, "w") as file:
        json.dump({"before_mb": before, "peak_mb": peak,
                   "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                   "documents": documents, "documents_seconds": documents_seconds,
                   "corpus_mb": sum(os.path.getsize(os.path.join(corpus, f))
                                    for f in os.listdir(corpus)) / 2**20}, file)


def time_chunks(functions, rounds):
    """Alternates the `functions` `rounds` times; returns each one's list of seconds."""
    times = {name: [] for name in functions}
    for _ in range(rounds):
        for name, function in functions.items():
            start = time.perf_counter()
            function()
            times[name].append(time.perf_counter() - start)
    return times


def headroom(corpus, args):
    """Pipeline tokens/s and training-step tokens/s, alternated; returns both medians."""
    import keras

    from keras_glam.models.glam_causal_lm import GLaMCausalLM
    from keras_glam.models.glam_tokenizer import GLaMTokenizer

    keras.utils.set_random_seed(0)
    lm = GLaMCausalLM.from_preset(args.preset, preprocessor=None)
    lm.compile()
    tokenizer = GLaMTokenizer.from_preset(args.preset)
    iterator = streaming_data(corpus, args, tokenizer).training_iterator(seed=0)
    x, y, sample_weight = next(iterator)
    batch = (x, y, sample_weight)
    lm.train_on_batch(*batch)  # Compile.
    tokens = args.batch_size * args.sequence_length

    def pipeline():
        for _ in range(args.pipeline_batches):
            next(iterator)

    def training():
        for _ in range(args.train_steps):
            lm.train_on_batch(*batch)

    for _ in range(20):  # Warm up the pipeline's buffers and autotuning.
        next(iterator)
    times = time_chunks({"pipeline": pipeline, "training": training}, args.rounds)
    pipeline_seconds = statistics.median(times["pipeline"])
    training_seconds = statistics.median(times["training"])
    return {
        "pipeline_tokens_per_second": args.pipeline_batches * tokens / pipeline_seconds,
        "training_tokens_per_second": args.train_steps * tokens / training_seconds,
        "times": times,
    }


def filter_speed(corpus, args):
    """Documents/s of reading alone and of reading + the quality filter step."""
    import numpy as np

    from keras_glam.data.quality import QualityClassifier
    from keras_glam.data.quality import score_documents
    from keras_glam.data.sources import JsonLines

    classifier = QualityClassifier()
    kernel = np.random.default_rng(0).normal(0, 0.1, (classifier.features.num_bins, 1))
    classifier.logistic_regression.kernel.assign(kernel.astype("float32"))
    source = JsonLines(f"{corpus}/*.jsonl")
    count = args.filter_documents

    def read():
        for _ in source.documents().take(count).batch(1024).as_numpy_iterator():
            pass

    def read_and_filter():
        decisions = score_documents(source.documents().take(count), classifier)
        for _ in decisions.batch(1024).as_numpy_iterator():
            pass

    read_and_filter()  # Trace and warm up.
    times = time_chunks({"read": read, "filter": read_and_filter}, max(3, args.rounds // 2))
    return {name: count / statistics.median(seconds) for name, seconds in times.items()}


def main(argv=None):
    args = parse_arguments(argv)
    if args.quick:
        args.sizes_mb, args.rounds, args.pipeline_batches = [20], 3, 50
        args.filter_documents, args.memory_batches = 5000, 100
    if args.memory_run:
        memory_run(*args.memory_run, args)
        return None
    import keras_glam  # noqa: F401  (JAX unless a backend is chosen)

    workdir = args.workdir or tempfile.mkdtemp(prefix="glam-input-")
    corpora = {}
    for size in args.sizes_mb:
        corpora[size] = os.path.join(workdir, f"corpus-{size}mb")
        start = time.perf_counter()
        write_corpus(corpora[size], size)
        print(f"corpus {size} MB: {corpora[size]} ({time.perf_counter() - start:.0f} s)",
              flush=True)
    smallest = corpora[min(corpora)]

    speed = headroom(smallest, args)
    ratio = speed["pipeline_tokens_per_second"] / speed["training_tokens_per_second"]
    print(f"\ninput pipeline: {speed['pipeline_tokens_per_second']:,.0f} tokens/s; training "
          f"step ({args.preset}, {args.batch_size} x {args.sequence_length}): "
          f"{speed['training_tokens_per_second']:,.0f} tokens/s; headroom {ratio:.1f}x "
          "(target >= 5x)", flush=True)

    memory = {}
    for size, corpus in corpora.items():
        out = os.path.join(workdir, f"memory-{size}.json")
        command = [sys.executable, __file__, "--memory-run", corpus, out, "--preset", args.preset,
                   "--sequence-length", str(args.sequence_length),
                   "--batch-size", str(args.batch_size),
                   "--memory-batches", str(args.memory_batches)]
        subprocess.run(command, check=True)
        with open(out) as file:
            memory[size] = json.load(file)
        entry = memory[size]
        print(f"memory, {entry['corpus_mb']:.0f} MB corpus: peak {entry['peak_mb']:.0f} MB, "
              f"{entry['peak_mb'] - entry['before_mb']:.0f} MB above the process before the "
              "pipeline; "
              f"{entry['documents']:,} documents streamed at "
              f"{entry['corpus_mb'] / entry['documents_seconds']:.1f} MB/s", flush=True)
    if len(memory) > 1:
        small, large = memory[min(memory)], memory[max(memory)]
        added = (large["peak_mb"] - large["before_mb"]) - (small["peak_mb"] - small["before_mb"])
        print(f"memory added by the larger corpus: {added:.0f} MB (target < 100 MB)")

    filtering = filter_speed(smallest, args)
    print(f"quality filter: {filtering['filter']:,.0f} documents/s; reading alone "
          f"{filtering['read']:,.0f} documents/s ({filtering['filter'] / filtering['read']:.2f}x)")
    return {"speed": speed, "memory": memory, "filter": filtering}


if __name__ == "__main__":
    main()
