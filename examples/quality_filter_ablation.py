"""GLaM's data ablation at small scale: the same model on noisy web text, filtered or not.

GLaM's paper trains the same model with its filtered web pages (143B tokens) and with the
unfiltered ones (7T tokens), the rest of the mixture unchanged, and finds the filtered data
better on both generation and understanding tasks (the filtered set, 50 times smaller, is
repeated more for the same number of tokens). This script repeats the experiment offline in a
few minutes on two CPU cores, with text every Python installation has:

1. **Curated text**: the paragraphs of Python's documentation topics (`pydoc_data.topics`),
   the language model's curated source. Whole paragraphs are held out by hash
   (`held_out_fraction`) as the *clean* evaluation set. The docstring paragraphs of the
   standard library's modules (read from its sources with `ast`, tests and tool trees left
   out; the modules, sorted by path, dealt into three groups) give the rest: the first group
   is the filter's other curated collection ("reference": like GLaM's and GPT-3's, the
   filter's positives are several curated collections).
2. **Raw "web" text**, generated deterministically (`--seed`), in two samples of the same
   make-up: one the language model trains on, one (as large) the filter learns from, so
   that the filter scores documents it has not seen (at this scale a classifier trained on
   the very documents it then scores memorises them as negatives). Each is, in every 20
   documents:
   - 7 *good*: docstring paragraphs of the second (language-model sample) or third (filter
     sample) group of modules: real prose that no curated collection contains;
   - 6 *degraded*: copies of curated *training* paragraphs (never held-out ones) with typos
     (characters replaced, dropped or doubled), shuffled words, lower-casing and web
     boilerplate lines (menus, cookie notices, share buttons);
   - 7 *junk*: word salad drawn uniformly from the corpus's vocabulary, keyword spam,
     random-character strings and URLs, and one phrase repeated many times.
3. The quality filter (`glam-data train-filter`'s library call) learns the curated training
   paragraphs and the reference docstrings (label 1) against the filter's web sample
   (label 0); `glam-data filter` writes the report and the score histogram of the web text.
4. `glam_tiny_8e` is trained from the same initial weights, for the same number of
   tokens, on the mixture `curated=0.3, web=0.7`: once with the raw web text, once with the
   web source filtered in the input pipeline (`web=jsonl,quality=filter.keras:...`). Held-out
   cross-entropy on the clean curated paragraphs is measured as training goes. A third run,
   the control, trains on web documents drawn at random until they hold as many tokens as the
   filter kept: it repeats its web text as often as the filtered run does, so the two differ
   only in which documents were chosen.

    python examples/quality_filter_ablation.py --output ablation
    python examples/quality_filter_ablation.py --steps 60 --web-documents 600   # a smoke run

Writes `OUTPUT/corpus/` (the JSON lines files), `OUTPUT/filter.keras`, `OUTPUT/filtered/`
(report.json, scores.png), `OUTPUT/results.json` and `OUTPUT/ablation.png`.
"""

import argparse
import ast
import json
import os
import random
import re
import string
import sysconfig

SKIPPED_DIRECTORIES = {
    "__pycache__", "distutils", "ensurepip", "idlelib", "lib2to3", "site-packages", "tkinter",
    "turtledemo",
}
BOILERPLATE = (
    "Home | Products | Blog | About us | Contact | Login",
    "We use cookies to improve your experience. Accept all cookies?",
    "Share on Facebook | Tweet | Pin it | Email a friend",
    "Copyright 2024 All rights reserved. Privacy policy | Terms of use",
    "Click here to subscribe to our newsletter and get 10% off!",
)
SPAM_WORDS = (
    "best", "cheap", "free", "download", "online", "python", "tutorial", "course", "2024",
    "top", "review", "discount", "crack", "casino", "bonus", "win", "deal", "click", "now",
)
CURATED_WEIGHT, WEB_WEIGHT = 0.3, 0.7
RUNS = ("unfiltered", "filtered", "random")
RUN_LABELS = {
    "unfiltered": "web text unfiltered",
    "filtered": "web text filtered",
    "random": "random web sample of the filtered's size",
}


def parse_arguments(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", default="quality_filter_ablation")
    parser.add_argument("--web-documents", type=int, default=6000,
                        help="documents in each web sample")
    parser.add_argument("--steps", type=int, default=300, help="training steps of each run")
    parser.add_argument("--eval-interval", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--sequence-length", type=int, default=64)
    parser.add_argument("--held-out-fraction", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", help="also save the figure here (e.g. docs/...png)")
    return parser.parse_args(argv)


def curated_paragraphs():
    from keras_glam.data.embedded_corpus import pydoc_documents

    return [
        paragraph.strip()
        for page in pydoc_documents()
        for paragraph in page.split("\n\n")
        if len(paragraph.split()) >= 8
    ]


def standard_library_modules():
    """The standard library's Python files, sorted, without its tests and a few tool trees."""
    library = sysconfig.get_paths()["stdlib"]
    files = []
    for root, directories, names in os.walk(library):
        directories[:] = sorted(
            d for d in directories if d not in SKIPPED_DIRECTORIES and not d.startswith("test")
        )
        files.extend(os.path.join(root, name) for name in sorted(names) if name.endswith(".py"))
    return files


def docstring_groups(groups=3):
    """Docstring paragraphs of `standard_library_modules()`, the modules dealt into `groups`
    groups; read with `ast`, not imported."""
    modules = standard_library_modules()
    return [docstring_paragraphs(modules[g::groups]) for g in range(groups)]


def docstring_paragraphs(paths):
    """Paragraphs (of 8 words or more) of every docstring in the Python files `paths`."""
    paragraphs = []
    for path in paths:
        with open(path, encoding="utf-8") as file:
            tree = ast.parse(file.read())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                docstring = ast.get_docstring(node) or ""
                paragraphs.extend(
                    " ".join(p.split()) for p in docstring.split("\n\n") if len(p.split()) >= 8
                )
    return sorted(set(paragraphs))


def degrade(paragraph, rng):
    """A typo-ridden, shuffled or boilerplate-wrapped copy of a paragraph."""
    words = paragraph.split()
    if rng.random() < 0.5:
        rng.shuffle(words)
    characters = []
    for character in " ".join(words):
        roll = rng.random()
        if roll < 0.06:
            characters.append(rng.choice(string.ascii_lowercase + string.digits + "#@$%&*"))
        elif roll < 0.09:
            continue
        elif roll < 0.12:
            characters.append(character * 2)
        else:
            characters.append(character)
    text = "".join(characters)
    if rng.random() < 0.5:
        text = text.lower()
    lines = [rng.choice(BOILERPLATE), text, rng.choice(BOILERPLATE)]
    return "\n".join(lines[rng.randrange(2) :])


def junk(vocabulary, rng):
    """Word salad, keyword spam, random strings or a repeated phrase."""
    kind = rng.randrange(4)
    length = rng.randint(20, 120)
    if kind == 0:
        return " ".join(rng.choice(vocabulary) for _ in range(length))
    if kind == 1:
        return " ".join(rng.choice(SPAM_WORDS) for _ in range(length))
    if kind == 2:
        alphabet = string.ascii_letters + string.digits
        pieces = [
            "".join(rng.choice(alphabet) for _ in range(rng.randint(3, 12)))
            for _ in range(length // 2)
        ]
        words = []
        for piece in pieces:
            if rng.random() < 0.2:
                piece = f"http://{piece.lower()}.example/{rng.randrange(10**6)}"
            words.append(piece)
        return " ".join(words)
    return " ".join([" ".join(rng.choice(vocabulary) for _ in range(4))] * (length // 4))


def web_sample(count, good, curated_train, vocabulary, rng, tag):
    """`count` raw web documents: in every 20, 7 good, 6 degraded and 7 junk; returns
    `{text: kind}` (texts made distinct with `[tag index]`)."""
    good = rng.sample(good, min(len(good), count))
    kinds = {}
    for index in range(count):
        roll = index % 20
        if roll < 7:
            text, kind = good[index % len(good)], "good"
        elif roll < 13:
            text, kind = degrade(rng.choice(curated_train), rng), "degraded"
        else:
            text, kind = junk(vocabulary, rng), "junk"
        kinds[f"{text} [{tag}{index}]"] = kind
    return kinds


def _write_jsonl(path, texts):
    with open(path, "w", encoding="utf-8") as file:
        file.writelines(json.dumps({"text": text}) + "\n" for text in texts)


def build_corpus(directory, web_documents, held_out_fraction, seed):
    """Writes `curated.jsonl`, `reference.jsonl`, `filter_web.jsonl` (the filter's training
    text) and `web-0000{0,1,2,3}.jsonl` (the language model's web text); returns the kinds
    of the language model's web documents and the corpus sizes."""
    import tensorflow as tf

    from keras_glam.data.sources import held_out_mask

    rng = random.Random(seed)
    curated = curated_paragraphs()
    held_out = held_out_mask(tf.constant(curated), held_out_fraction).numpy()
    curated_train = [p for p, out in zip(curated, held_out) if not out]
    reference, good, filter_good = docstring_groups()
    vocabulary = sorted({w for p in curated for w in re.findall(r"[A-Za-z]+", p)})
    kinds = web_sample(web_documents, good, curated_train, vocabulary, rng, "web ")
    filter_web = web_sample(web_documents, filter_good, curated_train, vocabulary, rng, "sample ")
    web = list(kinds)
    rng.shuffle(web)
    os.makedirs(directory, exist_ok=True)
    _write_jsonl(os.path.join(directory, "curated.jsonl"), curated)
    _write_jsonl(os.path.join(directory, "reference.jsonl"), reference)
    _write_jsonl(os.path.join(directory, "filter_web.jsonl"), filter_web)
    for shard in range(4):
        _write_jsonl(os.path.join(directory, f"web-{shard:05d}.jsonl"), web[shard::4])
    sizes = {"curated": len(curated), "curated_train": len(curated_train),
             "reference": len(reference), "good": len(good)}
    return kinds, sizes


def train_filter(corpus, output, held_out_fraction, seed):
    """The quality classifier: curated training paragraphs and reference docstrings against
    the filter's own web sample."""
    from keras_glam.data.quality import train_quality_classifier
    from keras_glam.data.sources import JsonLines
    from keras_glam.data.sources import held_out_mask

    curated = JsonLines(os.path.join(corpus, "curated.jsonl")).documents()
    # Held-out curated paragraphs stay unseen by the filter too.
    curated = curated.filter(lambda text: ~held_out_mask(text, held_out_fraction))
    positives = curated.concatenate(JsonLines(os.path.join(corpus, "reference.jsonl")).documents())
    web = JsonLines(os.path.join(corpus, "filter_web.jsonl")).documents()
    classifier, metrics = train_quality_classifier(
        positives, web, epochs=5, batch_size=128, learning_rate=0.05, seed=seed
    )
    path = os.path.join(output, "filter.keras")
    classifier.save(path)
    return path, metrics


def train_run(lm, data, held_out, args):
    """Trains `lm` for `args.steps` steps; returns `[(tokens, held-out cross-entropy)]`."""
    tokens_per_step = args.batch_size * args.sequence_length
    curve = [(0, lm.evaluate(held_out, verbose=0, return_dict=True)["cross_entropy"])]
    iterator = data.training_iterator(seed=args.seed)
    for step in range(args.eval_interval, args.steps + 1, args.eval_interval):
        # Resume at the batch after the last one trained on (Keras peeks ahead).
        lm.fit(iterator.dataset(position=step - args.eval_interval),
               steps_per_epoch=args.eval_interval, epochs=1, verbose=0)
        cross_entropy = lm.evaluate(held_out, verbose=0, return_dict=True)["cross_entropy"]
        curve.append((step * tokens_per_step, cross_entropy))
        print(f"  step {step}: held-out cross-entropy {cross_entropy:.3f}", flush=True)
    return curve


def plot(results, report, kinds_scores, alpha, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from keras_glam.data.quality import keep_probability

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for name, color in zip(RUNS, ("tab:red", "tab:blue", "tab:gray")):
        tokens, losses = zip(*results[name]["curve"][1:])  # The untrained loss is off the scale.
        left.plot(np.array(tokens) / 1e3, losses, marker="o", color=color, label=RUN_LABELS[name])
    left.set_xlabel("training tokens (thousands)")
    left.set_ylabel("held-out cross-entropy on clean text (nats/token)")
    left.set_title("Same model, same tokens: raw vs filtered web text")
    left.legend()
    edges = np.linspace(0, 1, 21)
    bottom = np.zeros(20)
    for kind, color in (("good", "tab:green"), ("degraded", "tab:orange"), ("junk", "tab:gray")):
        counts = np.histogram(kinds_scores[kind], edges)[0]
        right.bar(edges[:-1], counts, width=0.05, align="edge", bottom=bottom, color=color,
                  label=f"{kind}: kept {100 * report[kind]:.0f}%")
        bottom += counts
    right.set_xlabel("quality score")
    right.set_ylabel("web documents")
    right.set_title("Scores of the web text, and the keep rule")
    right.legend(loc="upper center")
    rule = right.twinx()
    grid = np.linspace(0, 1, 101)
    rule.plot(grid, keep_probability(grid, alpha), color="tab:red")
    rule.set_ylabel(f"P(keep) = (2 - score)^-{alpha:g}", color="tab:red")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main(argv=None):
    args = parse_arguments(argv)
    import keras_glam  # noqa: F401  (first: it makes JAX the Keras backend unless one is chosen)

    import keras
    import numpy as np

    from keras_glam import prepare_data
    from keras_glam.data.quality import DEFAULT_ALPHA
    from keras_glam.data.quality import load_quality_classifier
    from keras_glam.data.quality import score_documents
    from keras_glam.data.sources import JsonLines
    from keras_glam.data.streaming import StreamingData
    from keras_glam.models.glam_causal_lm import GLaMCausalLM
    from keras_glam.models.glam_tokenizer import GLaMTokenizer
    from keras_glam.optimizers import glam_optimizer

    # Both models start from the same weights. Seeding TensorFlow would drop the tokenizer's
    # resources, so the models are built first.
    keras.utils.set_random_seed(args.seed)
    models = {}
    for name in RUNS:
        models[name] = GLaMCausalLM.from_preset("glam_tiny_8e", preprocessor=None)
        models[name].compile(optimizer=glam_optimizer(warmup_steps=max(args.steps // 3, 1),
                                                      peak_learning_rate=0.05))
        models[name].set_weights(models[RUNS[0]].get_weights())
    tokenizer = GLaMTokenizer.from_preset("glam_tiny_8e")

    corpus = os.path.join(args.output, "corpus")
    kinds, sizes = build_corpus(corpus, args.web_documents, args.held_out_fraction, args.seed)
    print(f"Corpus: {sizes['curated']} curated paragraphs ({sizes['curated_train']} for "
          f"training), {sizes['reference']} reference docstring paragraphs, {len(kinds)} web "
          f"documents (good ones drawn from {sizes['good']} other docstring paragraphs).")
    filter_path, filter_metrics = train_filter(corpus, args.output, args.held_out_fraction,
                                               args.seed)
    print(f"Quality filter: validation accuracy {filter_metrics['accuracy']:.3f}, AUC "
          f"{filter_metrics['auc']:.3f}.")
    web_spec = os.path.join(corpus, "web-*.jsonl")
    prepare_data.main(["filter", "--model", filter_path, "--data", f"web={web_spec}",
                       "--output", os.path.join(args.output, "filtered"), "--seed", str(args.seed)])

    classifier = load_quality_classifier(filter_path)
    by_kind = {"good": [], "degraded": [], "junk": []}
    kept_by_kind = {"good": [], "degraded": [], "junk": []}
    kept_texts = []
    for decision in score_documents(JsonLines(web_spec).documents(), classifier,
                                    seed=args.seed).as_numpy_iterator():
        text = decision["text"].decode()
        by_kind[kinds[text]].append(float(decision["score"]))
        kept_by_kind[kinds[text]].append(bool(decision["keep"]))
        if decision["keep"]:
            kept_texts.append(text)
    # Tokens as the packer frames them (`<s> text </s>`).
    token_counts = {text: len(tokenizer(text)) + 2 for text in kinds}
    kept_fraction = {kind: float(np.mean(kept)) for kind, kept in kept_by_kind.items()}
    # The control: web documents drawn at random until they hold as many tokens as the
    # filter kept, so that it repeats its web text as often as the filtered run.
    kept_tokens = sum(token_counts[text] for text in kept_texts)
    random_sample, sampled_tokens = [], 0
    for text in random.Random(args.seed).sample(sorted(kinds), len(kinds)):
        if sampled_tokens >= kept_tokens:
            break
        random_sample.append(text)
        sampled_tokens += token_counts[text]
    _write_jsonl(os.path.join(corpus, "web_random.jsonl"), random_sample)
    web_tokens = {"unfiltered": sum(token_counts.values()), "filtered": kept_tokens,
                  "random": sampled_tokens}

    settings = dict(sequence_length=args.sequence_length, batch_size=args.batch_size,
                    held_out_fraction=args.held_out_fraction, held_out_documents=200,
                    shuffle_buffer=1000)
    curated_spec = f"curated={os.path.join(corpus, 'curated.jsonl')}"
    clean = StreamingData.from_specs([curated_spec], tokenizer, **settings)
    held_out = clean.held_out_dataset()
    specs = {
        "unfiltered": [curated_spec, f"web={web_spec}"],
        "filtered": [curated_spec, f"web=jsonl,quality={filter_path}:{web_spec}"],
        "random": [curated_spec, f"web={os.path.join(corpus, 'web_random.jsonl')}"],
    }
    results = {}
    for name, lm in models.items():
        print(f"Training on curated + {name} web text:", flush=True)
        data = StreamingData.from_specs(
            specs[name], tokenizer, mixture={"curated": CURATED_WEIGHT, "web": WEB_WEIGHT},
            seed=args.seed, **settings,
        )
        data.check()
        results[name] = {"curve": train_run(lm, data, held_out, args)}
        results[name]["held_out_cross_entropy"] = results[name]["curve"][-1][1]
    results["unigram_entropy"] = clean.unigram_entropy(held_out, seed=args.seed)
    results["filter"] = {"metrics": filter_metrics, "kept_fraction": kept_fraction,
                         "mean_score": {k: float(np.mean(v)) for k, v in by_kind.items()}}
    results["settings"] = vars(args)
    results["corpus"] = {**sizes, "web_tokens": web_tokens}
    with open(os.path.join(args.output, "results.json"), "w", encoding="utf-8") as file:
        json.dump(results, file, indent=2)
    figure = os.path.join(args.output, "ablation.png")
    plot(results, kept_fraction, by_kind, DEFAULT_ALPHA, figure)
    if args.plot:
        plot(results, kept_fraction, by_kind, DEFAULT_ALPHA, args.plot)

    tokens = args.steps * args.batch_size * args.sequence_length
    print(f"\n| web text | held-out cross-entropy on clean text after {tokens:,} tokens |")
    print("|---|---|")
    for name in RUNS:
        print(f"| {RUN_LABELS[name]} | {results[name]['held_out_cross_entropy']:.3f} |")
    print(f"Unigram baseline: {results['unigram_entropy']:.3f}. Kept by the filter: "
          + ", ".join(f"{kind} {100 * value:.0f}%" for kind, value in kept_fraction.items())
          + ". Web tokens: " + ", ".join(f"{k} {v:,}" for k, v in web_tokens.items()) + ".")
    return results


if __name__ == "__main__":
    main()
