"""Train GLaM's text-quality filter and filter corpora with it: the `glam-data` command.

    glam-data train-filter --positive curated=wiki/*.jsonl --negative crawl/*.jsonl \\
        --output filter.keras
    glam-data filter --model filter.keras --data web=crawl/*.jsonl --output filtered/

`train-filter` fits a `keras_glam.data.quality.QualityClassifier` (logistic regression on
hashed word 1- and 2-grams) to tell the `--positive` documents (curated text) from the
`--negative` ones (raw web text), prints its validation accuracy and AUC, and saves it as a
Keras model. `filter` scores every document of each `--data` source, keeps it by the rule GLaM
took from GPT-3 (`pareto(alpha) > 1 - score`, alpha 9) and writes the kept documents as JSON
lines shards (`OUTPUT/NAME/NAME-00000.jsonl`, `{"text": ..., "score": ...}`, itself a `--data`
spec: `NAME=OUTPUT/NAME/*.jsonl`), with `report.json` (per source: documents, kept fraction,
score histograms) and `scores.png` (the histograms and the rule's keep probability).

Sources are `--data` specs (`keras_glam.data.streaming`). Bad input (a missing file, a glob
matching nothing, a JSON line without the text field, bytes that are not UTF-8, a corrupt shard,
an output that already exists, a source left empty by the filter) ends the command with one line
on standard error and exit status 2; shards already written are kept, each written whole (to a
temporary name, then renamed).
"""

import json
import os
import sys
import uuid

import numpy as np

from keras_glam.cli_support import OneLineErrorParser
from keras_glam.cli_support import native_stderr_hidden
from keras_glam.cli_support import quiet_library_logs
from keras_glam.cli_support import report_user_error
from keras_glam.utils.atomic_files import TEMPORARY_PREFIX
from keras_glam.utils.atomic_files import durable_replace
from keras_glam.utils.atomic_files import replacing
from keras_glam.utils.atomic_files import write_json_atomically

HISTOGRAM_BINS = 20


def _parser():
    parser = OneLineErrorParser(
        prog="glam-data", description="GLaM's text-quality filter: train it, filter corpora."
    )
    commands = parser.add_subparsers(
        dest="command", required=True, parser_class=OneLineErrorParser
    )

    train = commands.add_parser(
        "train-filter", help="train the quality classifier (curated vs raw web text)"
    )
    train.add_argument("--positive", nargs="+", required=True, metavar="SPEC",
                       help="--data specs of curated text (label 1)")
    train.add_argument("--negative", nargs="+", required=True, metavar="SPEC",
                       help="--data specs of raw web text (label 0)")
    train.add_argument("--output", required=True, help="where to save the model (*.keras)")
    train.add_argument("--epochs", type=int, default=3, help="passes over the data (default 3)")
    train.add_argument("--batch-size", type=int, default=256, help="documents per step (256)")
    train.add_argument("--learning-rate", type=float, default=0.05, help="Adam's rate (0.05)")
    train.add_argument("--num-bins", type=int, default=2**18, help="hash buckets (2**18)")
    train.add_argument("--max-features", type=int, default=4096,
                       help="distinct n-gram buckets kept per document (4096)")
    train.add_argument("--max-documents", type=int, default=None,
                       help="read at most this many documents of each class")
    train.add_argument("--validation-fraction", type=float, default=0.1,
                       help="share of documents held out (by hash) for the metrics (0.1)")
    train.add_argument("--seed", type=int, default=0, help="shuffle seed (0)")
    train.add_argument("--report", help="also write the metrics to this JSON file")

    apply = commands.add_parser("filter", help="filter corpora, writing shards and a report")
    apply.add_argument("--model", required=True, help="a classifier saved by train-filter")
    apply.add_argument("--data", nargs="+", required=True, metavar="SPEC",
                       help="--data specs of the corpora to filter")
    apply.add_argument("--output", required=True, help="a new (or empty) output directory")
    apply.add_argument("--alpha", type=float, default=9.0, help="the rule's Pareto shape (9)")
    apply.add_argument("--seed", type=int, default=0, help="seeds the per-document draws (0)")
    apply.add_argument("--documents-per-shard", type=int, default=100_000,
                       help="documents per output shard (100000)")
    apply.add_argument("--max-documents", type=int, default=None,
                       help="read at most this many documents of each source")
    return parser


class _ShardWriter:
    """Writes kept documents of one source as JSON lines shards, each renamed into place only
    when complete."""

    def __init__(self, directory, name, documents_per_shard):
        self.directory = directory
        self.name = name
        self.documents_per_shard = documents_per_shard
        self.shards = []
        self._file = None
        self._temporary = None
        self._count = 0

    def write(self, text, score):
        if self._file is None:
            os.makedirs(self.directory, exist_ok=True)
            self._temporary = os.path.join(self.directory, f"{TEMPORARY_PREFIX}{uuid.uuid4().hex}")
            self._file = open(self._temporary, "w", encoding="utf-8")
        json.dump({"text": text, "score": round(score, 6)}, self._file, ensure_ascii=False)
        self._file.write("\n")
        self._count += 1
        if self._count == self.documents_per_shard:
            self.close()

    def close(self):
        if self._file is None:
            return
        self._file.close()
        path = os.path.join(self.directory, f"{self.name}-{len(self.shards):05d}.jsonl")
        durable_replace(self._temporary, path)
        self.shards.append(path)
        self._file, self._temporary, self._count = None, None, 0

    def abandon(self):
        if self._file is not None:
            self._file.close()
            os.remove(self._temporary)
            self._file = None


def _check_new_output(path, is_directory):
    if is_directory:
        if os.path.isdir(path) and os.listdir(path):
            raise ValueError(
                f"--output {path} already holds files (nothing was changed). Choose a new or "
                "empty directory."
            )
        if os.path.exists(path) and not os.path.isdir(path):
            raise ValueError(f"--output {path} is a file; give a directory.")
    elif os.path.exists(path):
        raise ValueError(f"--output {path} already exists (nothing was changed). Choose another.")


def _documents(specs, max_documents):
    """All documents of `specs` (one dataset), at most `max_documents` per source."""
    from keras_glam.data.streaming import sources_from_specs

    sources = sources_from_specs(specs)
    for source in sources:
        source.check()
    datasets = [source.documents() for source in sources]
    if max_documents is not None:
        datasets = [dataset.take(max_documents) for dataset in datasets]
    documents = datasets[0]
    for dataset in datasets[1:]:
        documents = documents.concatenate(dataset)
    return documents, sources


def train_filter(args):
    """`glam-data train-filter`: returns the metrics dict."""
    from keras_glam.data.quality import QualityClassifier
    from keras_glam.data.quality import QualityFeatures
    from keras_glam.data.quality import train_quality_classifier

    if not args.output.endswith(".keras"):
        raise ValueError(f"--output {args.output} must end in .keras (a Keras model file).")
    _check_new_output(args.output, is_directory=False)
    positive, positive_sources = _documents(args.positive, args.max_documents)
    negative, negative_sources = _documents(args.negative, args.max_documents)
    features = QualityFeatures(num_bins=args.num_bins, max_features=args.max_features)
    classifier = QualityClassifier(features)
    classifier, metrics = _reading(
        positive_sources + negative_sources,
        lambda: train_quality_classifier(
            positive,
            negative,
            classifier=classifier,
            epochs=args.epochs,
            batch_size=args.batch_size,
            learning_rate=args.learning_rate,
            validation_fraction=args.validation_fraction,
            seed=args.seed,
        ),
    )
    with replacing(args.output) as temporary:
        classifier.save(temporary)
    if args.report:
        write_json_atomically(args.report, metrics)
    counts, scores = metrics["documents"], metrics["mean_validation_score"]
    print(
        f"Trained on {counts['positive']['train']} curated and {counts['negative']['train']} "
        f"web documents; validation ({counts['positive']['validation']} + "
        f"{counts['negative']['validation']}): accuracy {metrics['accuracy']:.3f}, AUC "
        f"{metrics['auc']:.3f}, mean score curated {scores['positive']:.3f} / web "
        f"{scores['negative']:.3f}. Saved {args.output}."
    )
    return metrics


def _reading(sources, read):
    """`read()`, with `tf.data` errors of `sources` turned into one-line `DataError`s."""
    import tensorflow as tf

    from keras_glam.data.sources import DataError
    from keras_glam.data.sources import describe_data_error

    try:
        return read()
    except tf.errors.OpError as error:
        message = describe_data_error(error, sources)
        if message is None:
            raise
        raise DataError(message) from None


def filter_corpora(args):
    """`glam-data filter`: writes shards, `report.json` and `scores.png`; returns the report."""
    from keras_glam.data.quality import load_quality_classifier
    from keras_glam.data.quality import score_documents
    from keras_glam.data.sources import DataError
    from keras_glam.data.streaming import sources_from_specs

    _check_new_output(args.output, is_directory=True)
    if args.documents_per_shard < 1:
        raise ValueError("--documents-per-shard must be at least 1.")
    classifier = load_quality_classifier(args.model)
    sources = sources_from_specs(args.data)
    for source in sources:
        source.check()
    report = {"model": args.model, "alpha": args.alpha, "seed": args.seed, "sources": {}}
    edges = np.linspace(0.0, 1.0, HISTOGRAM_BINS + 1)
    empty = []
    for source in sources:
        writer = _ShardWriter(os.path.join(args.output, source.name), source.name,
                              args.documents_per_shard)
        documents = source.documents()
        if args.max_documents is not None:
            documents = documents.take(args.max_documents)
        decisions = score_documents(documents, classifier, args.alpha, args.seed).batch(1024)
        scores, kept_scores = [], []

        def stream():
            for batch in decisions.as_numpy_iterator():
                for text, score, keep in zip(batch["text"], batch["score"], batch["keep"]):
                    scores.append(float(score))
                    if keep:
                        kept_scores.append(float(score))
                        writer.write(text.decode("utf-8"), float(score))

        try:
            _reading([source], stream)
        except BaseException:
            writer.abandon()
            raise
        writer.close()
        report["sources"][source.name] = {
            "documents": len(scores),
            "kept": len(kept_scores),
            "kept_fraction": len(kept_scores) / max(len(scores), 1),
            "mean_score": float(np.mean(scores)) if scores else None,
            "mean_kept_score": float(np.mean(kept_scores)) if kept_scores else None,
            "histogram": {
                "edges": edges.round(4).tolist(),
                "all": np.histogram(scores, edges)[0].tolist(),
                "kept": np.histogram(kept_scores, edges)[0].tolist(),
            },
            "shards": writer.shards,
        }
        if not kept_scores:
            empty.append(f"{source.name} ({len(scores)} documents)")
    os.makedirs(args.output, exist_ok=True)
    write_json_atomically(os.path.join(args.output, "report.json"), report)
    with replacing(os.path.join(args.output, "scores.png")) as temporary:
        plot_score_histograms(report, temporary)
    for name, entry in report["sources"].items():
        print(
            f"{name}: kept {entry['kept']} of {entry['documents']} documents "
            f"({100 * entry['kept_fraction']:.1f}%) in {len(entry['shards'])} shards."
        )
    print(f"Wrote {args.output}/: report.json, scores.png and the shards.")
    if empty:
        raise DataError(
            f"the filter kept no document of {', '.join(empty)} (the report and other shards "
            "are written). Check that the classifier fits this text, or lower --alpha."
        )
    return report


def plot_score_histograms(report, path):
    """One panel per source: score histograms of all and of kept documents, and the rule's
    keep probability `(2 - score) ** -alpha`."""
    # A Figure of its own, not pyplot: the process's backend (a notebook's inline one) is kept.
    from matplotlib.figure import Figure

    from keras_glam.data.quality import keep_probability

    names = list(report["sources"])
    figure = Figure(figsize=(5 * len(names), 3.6))
    axes = figure.subplots(1, len(names), squeeze=False)
    for axis, name in zip(axes[0], names):
        entry = report["sources"][name]
        edges = np.array(entry["histogram"]["edges"])
        width = edges[1] - edges[0]
        axis.bar(edges[:-1], entry["histogram"]["all"], width=width, align="edge",
                 color="lightgray", label="all documents")
        axis.bar(edges[:-1], entry["histogram"]["kept"], width=width, align="edge",
                 color="tab:blue", label="kept")
        axis.set_xlabel("quality score")
        axis.set_ylabel("documents")
        axis.set_title(f"{name}: kept {100 * entry['kept_fraction']:.1f}%")
        rule = axis.twinx()
        grid = np.linspace(0, 1, 101)
        rule.plot(grid, keep_probability(grid, report["alpha"]), color="tab:red")
        rule.set_ylim(0, 1.05)
        rule.set_ylabel(f"P(keep), alpha={report['alpha']:g}", color="tab:red")
        axis.legend(loc="upper left", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def main(argv=None):
    """Console entry point (`glam-data`, `python -m keras_glam.prepare_data`).

    Returns:
        The exit code: 0, or 2 for a problem the user can fix (one line on stderr).
    """
    args = _parser().parse_args(argv)
    quiet_library_logs()
    command = train_filter if args.command == "train-filter" else filter_corpora
    try:
        with native_stderr_hidden():
            # Imported here, after the arguments and the log levels: `--help` needs none of it.
            import keras_glam.data  # noqa: F401
        command(args)
    except Exception as error:
        return report_user_error("glam-data", error)
    return 0


if __name__ == "__main__":
    sys.exit(main())
