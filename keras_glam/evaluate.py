"""`glam-eval` (also `python -m keras_glam.evaluate`): evaluate a GLaM model as the paper did.

    glam-eval --model glam_run/preset --tasks glam_nlu --num-fewshot 0 1 --output glam_eval
    glam-eval --model glam_run/preset --tasks arc_easy my_task.yaml --data-dir task_data
    glam-eval --model glam_run/preset --text held_out.txt

Tasks run through lm-evaluation-harness with `keras_glam.evaluation.GLaMLM`, once per
`--num-fewshot` setting; the output folder receives `results.json` (lm-eval's results of every
setting, GLaM's scores, the tasks that could not run), `results.md` (GLaM's scores by the
paper's categories, with averages) and `results.png`, each written atomically after every
setting. `--text` reports nats per token and bits per byte of whole files (`perplexity.json`).
Bad input (no or unknown tasks, a model without tokenizer, task data neither local nor
reachable, unreadable text files) stops the command within seconds, before the model runs,
with one line and exit code 2.
"""

import logging
import os
import sys

from keras_glam.cli_support import USER_ERROR_EXIT_CODE
from keras_glam.cli_support import OneLineErrorParser
from keras_glam.cli_support import native_stderr_hidden
from keras_glam.cli_support import quiet_library_logs

DEFAULT_OUTPUT = "glam_eval"
PERPLEXITY_FILE = "perplexity.json"


class BadInput(Exception):
    """Input the command cannot use; its message is the one line printed."""


def parse_args(argv=None):
    parser = OneLineErrorParser(
        prog="glam-eval",
        description="Evaluate a GLaM model on GLaM's tasks (lm-evaluation-harness) or on texts.",
    )
    parser.add_argument(
        "--model",
        required=True,
        help="a preset directory (e.g. glam_run/preset), hf://org/name or a builtin preset name",
    )
    parser.add_argument(
        "--tasks",
        nargs="*",
        help="glam_all, glam_nlg, glam_nlu, lm-eval task/group names or task YAML files",
    )
    parser.add_argument(
        "--text",
        nargs="+",
        metavar="FILE",
        help="UTF-8 text files, one document each: report nats/token and bits/byte",
    )
    parser.add_argument(
        "--num-fewshot",
        nargs="+",
        type=int,
        default=[0],
        metavar="N",
        help="few-shot settings, several in one run (default: 0)",
    )
    parser.add_argument(
        "--limit", type=float, help="documents per task (a fraction if below 1), for quick runs"
    )
    parser.add_argument("--batch-size", type=int, help="requests per forward pass (default: auto)")
    parser.add_argument(
        "--max-length",
        type=int,
        help="most tokens the model reads at once (default: the preset's sequence_length)",
    )
    parser.add_argument(
        "--num-beams",
        type=int,
        default=1,
        help="beam width of generative tasks (default 1: greedy, lm-eval's default; GLaM: 4)",
    )
    parser.add_argument(
        "--data-dir",
        help="local task data, one folder per task with a file per split; nothing is fetched",
    )
    parser.add_argument(
        "--output", default=DEFAULT_OUTPUT, help="output folder (default: %(default)s)"
    )
    parser.add_argument("--seed", type=int, default=1234, help="seed of the few-shot examples")
    parser.add_argument(
        "--bootstrap-iters",
        type=int,
        default=1000,
        help="bootstrap resamples for the standard errors of non-mean metrics (0: none)",
    )
    return parser.parse_args(argv)


def check_args(args):
    """Raise `BadInput` for settings no run can use."""
    if args.tasks is None and not args.text:
        raise BadInput("Nothing to evaluate: pass --tasks (e.g. glam_nlu) and/or --text FILE.")
    if args.tasks is not None and not [name for name in args.tasks if name.strip()]:
        raise BadInput(
            "--tasks is empty: name GLaM groups (glam_all, glam_nlg, glam_nlu), lm-eval tasks "
            "or task YAML files."
        )
    if any(n < 0 for n in args.num_fewshot):
        raise BadInput(f"--num-fewshot takes non-negative integers, got {args.num_fewshot}.")
    if args.limit is not None and args.limit <= 0:
        raise BadInput(f"--limit must be positive, got {args.limit}.")
    for flag, value in (("--batch-size", args.batch_size), ("--num-beams", args.num_beams)):
        if value is not None and value < 1:
            raise BadInput(f"{flag} must be at least 1, got {value}.")
    if args.max_length is not None and args.max_length < 2:
        raise BadInput(f"--max-length must be at least 2, got {args.max_length}.")
    if os.path.exists(args.output) and not os.path.isdir(args.output):
        raise BadInput(f"--output {args.output} is a file; name a folder.")


def read_texts(paths):
    texts = []
    for path in paths:
        try:
            with open(path, encoding="utf-8") as file:
                texts.append(file.read())
        except FileNotFoundError:
            raise BadInput(f"--text: {path} does not exist.") from None
        except UnicodeDecodeError as error:
            raise BadInput(
                f"--text: {path} is not UTF-8 text ({error.reason} at byte {error.start})."
            ) from None
        except OSError as error:
            raise BadInput(f"--text: cannot read {path} ({error.strerror}).") from None
        if not texts[-1].strip():
            raise BadInput(f"--text: {path} is empty.")
    return texts


def _prepare_tasks(args):
    """Resolve the tasks and load their data (offline when local or unreachable), fast."""
    from keras_glam.evaluation import require_lm_eval

    try:
        with native_stderr_hidden():
            require_lm_eval()
    except ImportError as error:
        raise BadInput(f"--tasks: {error}") from None
    from keras_glam.evaluation import task_loading

    if args.data_dir is not None:
        task_loading.go_offline()
    elif not task_loading.hub_reachable():
        print("glam-eval: the Hugging Face Hub is not reachable; using cached data only.")
        task_loading.go_offline()
    try:
        selection = task_loading.select_tasks(args.tasks, data_dir=args.data_dir)
        return selection, selection.load()
    except task_loading.TaskSelectionError as error:
        raise BadInput(str(error)) from None


def _load_model(args):
    from keras_glam.evaluation.model_loading import load_causal_lm

    try:
        return load_causal_lm(args.model)
    except (ValueError, TypeError, OSError) as error:
        raise BadInput(f"--model {args.model}: {str(error).splitlines()[0]}") from None


def run_tasks(args, causal_lm, selection, first_tasks):
    """Evaluate every few-shot setting; write the reports after each. Returns their paths."""
    import lm_eval

    from keras_glam.evaluation.glam_lm import GLaMLM
    from keras_glam.evaluation.reports import add_acc_per_token
    from keras_glam.evaluation.reports import write_reports

    lm = GLaMLM(causal_lm, batch_size=args.batch_size, max_length=args.max_length)
    limit = args.limit if args.limit is None or args.limit < 1 else int(args.limit)
    runs, paths = [], {}
    for position, num_fewshot in enumerate(dict.fromkeys(args.num_fewshot)):
        tasks = first_tasks if position == 0 else selection.load()
        print(f"glam-eval: {len(tasks)} task(s), {num_fewshot}-shot")
        results = lm_eval.simple_evaluate(
            model=lm,
            tasks=list(tasks.values()),
            num_fewshot=num_fewshot,
            limit=limit,
            gen_kwargs={"num_beams": args.num_beams} if args.num_beams > 1 else None,
            bootstrap_iters=args.bootstrap_iters,
            fewshot_random_seed=args.seed,
            log_samples=True,
        )
        add_acc_per_token(results, tasks, lm)
        results.pop("samples", None)
        results["num_fewshot"] = num_fewshot
        runs.append(results)
        paths = write_reports(
            args.output,
            runs,
            selection.missing,
            args.model,
            extra={"max_length": lm.max_length, "num_beams": args.num_beams},
        )
    return paths


def run_text(args, causal_lm, texts):
    from keras_glam.evaluation.perplexity import Perplexity
    from keras_glam.evaluation.perplexity import text_perplexities
    from keras_glam.utils.atomic_files import write_json_atomically

    parts = text_perplexities(
        causal_lm, texts, max_length=args.max_length, batch_size=args.batch_size
    )
    rows = dict(zip(args.text, parts))
    if len(texts) > 1:
        rows["all files"] = Perplexity.total(parts)
    print(f"{'text':<40} {'tokens':>9} {'bytes':>10} {'nats/token':>11} {'bits/byte':>10}")
    for name, result in rows.items():
        print(
            f"{name:<40} {result.tokens:>9,} {result.bytes:>10,} {result.nats_per_token:>11.4f} "
            f"{result.bits_per_byte:>10.4f}"
        )
    os.makedirs(args.output, exist_ok=True)
    path = os.path.join(args.output, PERPLEXITY_FILE)
    document = {
        "model": args.model,
        "texts": {
            name: {
                "nats_per_token": result.nats_per_token,
                "bits_per_byte": result.bits_per_byte,
                "tokens": result.tokens,
                "bytes": result.bytes,
            }
            for name, result in rows.items()
        },
    }
    write_json_atomically(path, document)
    return path


def main(argv=None):
    """Console entry point (`glam-eval`, `python -m keras_glam.evaluate`).

    Returns:
        The exit code: 0, or 2 for input the command cannot use (one line on stderr).
    """
    args = parse_args(argv)
    quiet_library_logs()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        check_args(args)
        texts = read_texts(args.text) if args.text else None
        with native_stderr_hidden():
            # After the arguments: `--help` and bad flags need none of this.
            import keras_glam.evaluation  # noqa: F401
        selection, first_tasks = _prepare_tasks(args) if args.tasks is not None else (None, None)
        causal_lm = _load_model(args)
    except BadInput as error:
        print(f"glam-eval: error: {error}", file=sys.stderr)
        return USER_ERROR_EXIT_CODE
    from keras_glam.evaluation.token_scorer import ContinuationTooLongError

    try:
        if selection is not None:
            paths = run_tasks(args, causal_lm, selection, first_tasks)
    except ContinuationTooLongError as error:
        print(f"glam-eval: error: {error}", file=sys.stderr)
        return USER_ERROR_EXIT_CODE
    if selection is not None:
        for missing in selection.missing:
            print(f"glam-eval: not evaluated: {missing.name} ({missing.reason})")
        with open(paths["markdown"], encoding="utf-8") as file:
            print(file.read())
        print(f"glam-eval: wrote {', '.join(paths.values())}")
    if texts is not None:
        print(f"glam-eval: wrote {run_text(args, causal_lm, texts)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
