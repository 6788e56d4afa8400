"""Reports of an evaluation: GLaM's scores, `results.json`, a Markdown table and a bar plot.

Every file is written to a temporary file beside it, flushed, then renamed into place: an
interrupted run leaves the previous complete file or none, never half of one.
"""

import io
import math
import os

import numpy as np

from keras_glam.evaluation import glam_suite
from keras_glam.utils.atomic_files import write_atomically
from keras_glam.utils.atomic_files import write_json_atomically

OTHER_CATEGORY = "Other tasks"
RESULTS_FILE = "results.json"
MARKDOWN_FILE = "results.md"
PLOT_FILE = "results.png"


def add_acc_per_token(results, tasks, lm):
    """Add GLaM's NLU score, `acc_per_token`, to lm-eval's results of multiple-choice tasks.

    GLaM picks the option whose log-likelihood divided by its number of tokens is highest (the
    tokens `lm.loglikelihood` scored); lm-eval's `acc` divides by nothing and `acc_norm` by the
    option's characters. Read from the per-document samples lm-eval returns
    (`log_samples=True`); the gold option is found as lm-eval finds it.

    Args:
        results: the dict `lm_eval.simple_evaluate` returned, with "samples".
        tasks: `{task name: lm-eval Task}` of that run.
        lm: the `GLaMLM` that was evaluated.
    """
    for name, samples in results.get("samples", {}).items():
        task = tasks.get(name)
        if task is None or task.OUTPUT_TYPE != "multiple_choice" or not samples:
            continue
        correct = []
        for sample in samples:
            lengths = [lm.continuation_length(*arguments) for arguments in sample["arguments"]]
            log_likelihoods = [response[0] for response in sample["filtered_resps"]]
            choice = int(np.argmax(np.array(log_likelihoods) / np.maximum(lengths, 1)))
            correct.append(float(choice in _gold_indices(task, sample["doc"])))
        filter_name = samples[0].get("filter", "none")
        entry = results["results"][name]
        entry[f"{glam_suite.ACC_PER_TOKEN},{filter_name}"] = float(np.mean(correct))
        entry[f"{glam_suite.ACC_PER_TOKEN}_stderr,{filter_name}"] = _stderr(correct)
        results.setdefault("higher_is_better", {}).setdefault(name, {})[
            glam_suite.ACC_PER_TOKEN
        ] = True


def _gold_indices(task, doc):
    """The right options' indices, as lm-eval's `process_results` derives them."""
    gold = (
        task.doc_to_text(doc) if getattr(task, "multiple_input", False) else task.doc_to_target(doc)
    )
    choices = task.doc_to_choice(doc)
    golds = gold if isinstance(gold, list) else [gold]
    return {choices.index(g) if isinstance(g, str) and g in choices else g for g in golds}


def _stderr(values):
    if len(values) < 2:
        return "N/A"
    return float(np.std(values, ddof=1) / math.sqrt(len(values)))


def metric_value(task_results, metric):
    """The value of `metric` in one task's lm-eval results (any filter, "none" first), or None."""
    keys = [
        key
        for key in task_results
        if key.split(",")[0] == metric
        and "," in key
        and isinstance(task_results[key], (int, float))
    ]
    keys.sort(key=lambda key: key != f"{metric},none")
    return float(task_results[keys[0]]) if keys else None


def setting_label(num_fewshot):
    return f"{num_fewshot}-shot"


def glam_scores(runs):
    """GLaM's score per task and setting, 0-100: `{(category, task label): {setting: score}}`.

    Tasks of GLaM's suite use the suite's metric; other tasks `acc_per_token` when they have
    it, else their first metric. Runs are lm-eval results dicts, each with `num_fewshot`
    (added by `glam-eval`) or a single value in "n-shot".
    """
    table = {}
    for run in runs:
        setting = setting_label(run_fewshot(run))
        for name, task_results in run["results"].items():
            suite_task = glam_suite.glam_task(name)
            if suite_task is not None:
                key = (suite_task.category, f"{suite_task.name} ({name})")
                value = metric_value(task_results, suite_task.metric)
                metric = suite_task.metric
            else:
                key = (OTHER_CATEGORY, name)
                metric = _first_metric(task_results)
                value = metric_value(task_results, metric) if metric else None
            if value is None:
                continue
            scale = 1.0 if metric in ("exact", "f1") and name == "squadv2" else 100.0
            table.setdefault(key, {"metric": metric})[setting] = value * scale
    return table


def run_fewshot(run):
    if "num_fewshot" in run:
        return run["num_fewshot"]
    shots = set(run.get("n-shot", {}).values())
    return shots.pop() if len(shots) == 1 else 0


def _first_metric(task_results):
    if metric_value(task_results, glam_suite.ACC_PER_TOKEN) is not None:
        return glam_suite.ACC_PER_TOKEN
    for key, value in task_results.items():
        if "," in key and "_stderr" not in key and isinstance(value, (int, float)):
            return key.split(",")[0]
    return None


def _ordered(table):
    order = {category: index for index, category in enumerate(glam_suite.CATEGORIES)}
    return sorted(table.items(), key=lambda item: (order.get(item[0][0], len(order)), item[0][1]))


def markdown_report(runs, missing, model_name):
    """The Markdown report: GLaM's scores by category with averages, lm-eval's NLU metrics."""
    settings = [setting_label(n) for n in sorted({run_fewshot(run) for run in runs})]
    table = glam_scores(runs)
    header = "| Category | Task | Metric | " + " | ".join(settings) + " |"
    rule = "|---|---|---|" + "---|" * len(settings)
    lines = [
        f"# Evaluation of {model_name}",
        "",
        "GLaM's scoring, 0-100: NLU tasks by the option with the highest log-likelihood per token "
        "(`acc_per_token`), NLG tasks by exact match or F1 of the decoded answer. Averages are "
        "plain means over the tasks evaluated here; the paper's averages (29 tasks, "
        "its few-shot column for any setting above one shot) are the paper's, not ours.",
        "",
        header,
        rule,
    ]
    category_rows = {}
    for (category, task), scores in _ordered(table):
        category_rows.setdefault(category, []).append((task, scores))
    for category, rows in category_rows.items():
        for task, scores in rows:
            cells = [_cell(scores.get(setting)) for setting in settings]
            lines.append(
                f"| {category} | {task} | {scores['metric']} | " + " | ".join(cells) + " |"
            )
        averages = [_mean([scores.get(setting) for _, scores in rows]) for setting in settings]
        lines.append(
            f"| **{category}** | **average** | | "
            + " | ".join(_cell(a, bold=True) for a in averages)
            + " |"
        )
    overall = [_mean([scores.get(setting) for scores in table.values()]) for setting in settings]
    lines.append(
        f"| **All** | **average of {len(table)} tasks** | | "
        + " | ".join(_cell(a, bold=True) for a in overall)
        + " |"
    )
    for label, paper in glam_suite.PAPER_AVERAGES.items():
        cells = [_cell(_paper_average(paper, setting)) for setting in settings]
        lines.append(f"| {label} | average of 29 tasks | | " + " | ".join(cells) + " |")
    lines.append("")
    if missing:
        lines.append(
            "Not evaluated (missing): " + "; ".join(f"{m.name} ({m.reason})" for m in missing) + "."
        )
        lines.append("")
    lines += _nlu_metrics_table(runs, settings)
    return "\n".join(lines)


def _nlu_metrics_table(runs, settings):
    names = sorted(
        {
            name
            for run in runs
            for name, values in run["results"].items()
            if metric_value(values, glam_suite.ACC_PER_TOKEN) is not None
        }
    )
    if not names:
        return []
    metrics = (glam_suite.ACC_PER_TOKEN, "acc", "acc_norm")
    lines = [
        "## Multiple-choice tasks: lm-eval's metrics beside GLaM's",
        "",
        "| Task | Setting | " + " | ".join(metrics) + " |",
        "|---|---|" + "---|" * len(metrics),
    ]
    for name in names:
        for run in sorted(runs, key=run_fewshot):
            values = run["results"].get(name)
            if values is None:
                continue
            cells = [_cell(_percent(metric_value(values, metric))) for metric in metrics]
            lines.append(
                f"| {name} | {setting_label(run_fewshot(run))} | " + " | ".join(cells) + " |"
            )
    lines.append("")
    return lines


def _percent(value):
    return None if value is None else 100.0 * value


def _paper_average(paper, setting):
    shots = int(setting.split("-")[0])
    return paper.get(shots if shots in (0, 1) else "few")


def _mean(values):
    values = [value for value in values if value is not None]
    return sum(values) / len(values) if values else None


def _cell(value, bold=False):
    if value is None:
        return "-"
    text = f"{value:.1f}"
    return f"**{text}**" if bold else text


def plot_report(runs, model_name):
    """A horizontal bar plot of GLaM's score per task and setting, as PNG bytes."""
    # A Figure of its own, not pyplot: the process's backend (a notebook's inline one) is kept.
    from matplotlib.figure import Figure

    table = _ordered(glam_scores(runs))
    settings = [setting_label(n) for n in sorted({run_fewshot(run) for run in runs})]
    labels = [task for (_, task), _ in table]
    height = 0.8 / max(len(settings), 1)
    figure = Figure(figsize=(8, 1.5 + 0.35 * len(labels) * max(1, len(settings) / 2)))
    axes = figure.subplots()
    positions = np.arange(len(labels))
    for index, setting in enumerate(settings):
        values = [scores.get(setting, 0.0) for _, scores in table]
        axes.barh(positions + index * height, values, height, label=setting)
    axes.set_yticks(positions + height * (len(settings) - 1) / 2)
    axes.set_yticklabels(labels)
    axes.invert_yaxis()
    axes.set_xlabel("GLaM score (0-100)")
    axes.set_title(f"{model_name}: GLaM's tasks")
    axes.legend()
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def write_reports(output_dir, runs, missing, model_name, extra=None):
    """Write `results.json`, `results.md` and `results.png` into `output_dir`, each atomically.

    `results.json` holds `{"model", "runs": [lm-eval's results dict per few-shot setting],
    "missing_tasks": [{"name", "reason"}], "glam_scores": {task: {setting: score}}}` plus
    `extra`; `keras_glam.hub.publish_model(eval_results=...)` reads it.

    Returns:
        `{kind: path}` of the files written.
    """
    os.makedirs(output_dir, exist_ok=True)
    scores = {
        task: {key: value for key, value in values.items()}
        for (_, task), values in _ordered(glam_scores(runs))
    }
    document = {
        "model": model_name,
        "runs": runs,
        "missing_tasks": [{"name": m.name, "reason": m.reason} for m in missing],
        "glam_scores": scores,
        **(extra or {}),
    }
    paths = {
        "results": os.path.join(output_dir, RESULTS_FILE),
        "markdown": os.path.join(output_dir, MARKDOWN_FILE),
        "plot": os.path.join(output_dir, PLOT_FILE),
    }
    write_json_atomically(paths["results"], document, default=_json_default)
    write_atomically(paths["markdown"], markdown_report(runs, missing, model_name))
    write_atomically(paths["plot"], plot_report(runs, model_name))
    return paths


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if callable(value):
        return getattr(value, "__name__", repr(value))
    return str(value)
