"""The model card (README.md) keras_glam publishes with a GLaM preset on the Hugging Face Hub."""

import json
import os
import pathlib

from huggingface_hub import EvalResult
from huggingface_hub import ModelCardData

from keras_glam.hub.auth import parse_hf_handle
from keras_glam.models.architecture import is_moe_layer
from keras_glam.utils.checks import check_positive_integers

CARD_TAGS = ("keras", "glam", "mixture-of-experts")
# `datasets` builders of local task data: no Hub dataset to link to.
_LOCAL_DATA_BUILDERS = ("json", "parquet", "arrow", "csv", "text")


def _human_count(count):
    for scale, suffix in ((10**12, "T"), (10**9, "B"), (10**6, "M"), (10**3, "K")):
        if count >= scale:
            return f"{count / scale:.3g}{suffix}"
    return str(count)


def _format_metric(value):
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise TypeError(f"Metric values must be numbers or strings, got {value!r}.")
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4g}"
    return value


def _cell(text):
    return str(text).replace("|", "\\|").replace("\n", " ")


def _check_loss_plot(loss_plot):
    path = pathlib.PurePosixPath(loss_plot)
    if path.is_absolute() or ".." in path.parts or path.suffix.lower() != ".png":
        raise ValueError(
            f"loss_plot must be a relative path to a .png inside the repository, got "
            f"{loss_plot!r}. Pass the file's path relative to the preset directory."
        )


def _architecture_rows(config):
    try:
        num_layers = config["num_layers"]
        rows = [
            ("Decoder layers", num_layers),
            ("Hidden size", config["hidden_dim"]),
            ("Feed-forward size", config["intermediate_dim"]),
            ("Attention heads", f"{config['num_heads']} x {config['head_dim']}"),
            ("Vocabulary", f"{config['vocabulary_size']:,}"),
        ]
    except KeyError as error:
        raise ValueError(
            f"backbone_config lacks {error}: pass the GLaMBackbone config "
            "(`backbone.get_config()`, or config.json's 'config')."
        ) from None
    num_experts = config.get("num_experts")
    if not num_experts:
        return rows + [("Experts", "none (dense model)")]
    interval = config.get("moe_layer_interval", 2)
    moe_layers = [i for i in range(num_layers) if is_moe_layer(i, num_experts, interval)]
    return rows + [
        ("Experts per MoE layer", num_experts),
        ("MoE layers", ", ".join(map(str, moe_layers)) + " (the others are dense GEGLU)"),
        ("Routing", f"top-{config.get('top_k', 2)} gating (GShard)"),
        ("Capacity factor", config.get("capacity_factor", 2.0)),
    ]


def render_model_card(
    handle,
    *,
    backbone_config,
    total_params,
    activated_params,
    license="apache-2.0",  # noqa: A002 - the model-card field's name
    description=None,
    training_data=None,
    training_steps=None,
    metrics=None,
    loss_plot=None,
    eval_results=None,
):
    """Render a GLaM preset's model card (README.md): YAML front matter and Markdown.

    A pure function of its arguments. The front matter declares `library_name: keras-hub`,
    `pipeline_tag: text-generation`, the tags "keras", "glam", "mixture-of-experts" and the
    licence; the body summarises the architecture, the parameter counts, training, metrics,
    the loss plot and shows how to load the model with `from_preset`.

    Args:
        handle: the repository, "hf://namespace/name" (the namespace is required: the card
            shows the handle others load the model with).
        backbone_config: the `GLaMBackbone` config dict (`num_layers`, `hidden_dim`,
            `intermediate_dim`, `num_heads`, `head_dim`, `vocabulary_size`, and for MoE models
            `num_experts`, `moe_layer_interval`, `top_k`, `capacity_factor`).
        total_params: all parameters (`keras_glam.count_params(config)[0]`).
        activated_params: parameters used per token (`keras_glam.count_params(config)[1]`).
        license: the licence identifier for the front matter.
        description: a paragraph introducing the model; a generic one when None.
        training_data: what the model was trained on, or None (the card says "not recorded").
        training_steps: number of training steps, or None.
        metrics: `{name: value}` (numbers or strings), shown in the given order; None or {}
            omits the section.
        loss_plot: path of a PNG inside the repository (relative to the preset directory, see
            `find_loss_plot`), embedded as an image; None omits it.
        eval_results: evaluation results: the path of a `results.json` written by `glam-eval`
            (or by lm-eval), or its parsed dict. Every score goes into the front matter's
            `model-index` (one entry per task and few-shot setting) and an "Evaluation" table;
            tasks `glam-eval` could not run are listed. None omits both.

    Returns:
        The card as a string.

    Example:
    ```python
    from keras_glam.models.presets import local_backbone_config

    config = local_backbone_config("glam_tiny_8e")
    total, activated = keras_glam.count_params(config)
    card = render_model_card(
        "hf://glam-org/glam-tiny",
        backbone_config=config,
        total_params=total,
        activated_params=activated,
        metrics={"validation loss": 3.21},
    )
    ```
    """
    namespace, name = parse_hf_handle(handle)
    if namespace is None:
        raise ValueError(
            f"The model card needs the full handle 'hf://namespace/{name}', got {handle!r}."
        )
    check_positive_integers(total_params=total_params, activated_params=activated_params)
    if activated_params > total_params:
        raise ValueError(
            f"activated_params ({activated_params:,}) cannot exceed total_params "
            f"({total_params:,})."
        )
    if not isinstance(license, str) or not license.strip():
        raise ValueError(f"license must be a non-empty licence identifier, got {license!r}.")
    if training_steps is not None and (
        isinstance(training_steps, bool)
        or not isinstance(training_steps, int)
        or training_steps < 0
    ):
        raise ValueError(
            f"training_steps must be a non-negative integer or None, got {training_steps!r}."
        )
    if loss_plot is not None:
        _check_loss_plot(loss_plot)

    evaluation = read_eval_results(eval_results) if eval_results is not None else None

    repo_id = f"{namespace}/{name}"
    card_data = {}
    if evaluation is not None and evaluation.scores:
        card_data = {"model_name": repo_id, "eval_results": eval_results_for_card(evaluation)}
    front_matter = ModelCardData(
        library_name="keras-hub",
        pipeline_tag="text-generation",
        license=license,
        tags=list(CARD_TAGS),
        **card_data,
    ).to_yaml()
    description = description or (
        "A GLaM (Du et al., 2021) decoder-only language model: a Transformer in which every other "
        "feed-forward layer is a top-2 mixture of experts. Built with keras_glam for Keras 3 "
        "and KerasHub."
    )
    lines = ["---", front_matter, "---", "", f"# {repo_id}", "", description, ""]
    lines += ["## Architecture", "", "| | |", "|---|---|"]
    lines += [
        f"| {label} | {_cell(value)} |" for label, value in _architecture_rows(backbone_config)
    ]
    lines += [
        "",
        "## Parameters",
        "",
        "| | |",
        "|---|---|",
        f"| Total | {total_params:,} ({_human_count(total_params)}) |",
        f"| Activated per token | {activated_params:,} ({_human_count(activated_params)}) |",
        "",
        "## Training",
        "",
        f"- Data: {training_data if training_data else 'not recorded'}",
        f"- Steps: {f'{training_steps:,}' if training_steps is not None else 'not recorded'}",
        "",
    ]
    if metrics:
        lines += ["## Metrics", "", "| Metric | Value |", "|---|---|"]
        lines += [
            f"| {_cell(key)} | {_cell(_format_metric(value))} |" for key, value in metrics.items()
        ]
        lines.append("")
    if evaluation is not None:
        lines += _evaluation_section(evaluation)
    if loss_plot is not None:
        lines += ["## Training loss", "", f"![Training loss]({loss_plot})", ""]
    lines += [
        "## Usage",
        "",
        "```python",
        "import keras_glam",
        "",
        f'causal_lm = keras_glam.GLaMCausalLM.from_preset("hf://{repo_id}")',
        'print(causal_lm.generate("The Python language", max_length=32))',
        "```",
        "",
        "`import keras_glam` registers the GLaM classes, so "
        f'`keras_hub.models.CausalLM.from_preset("hf://{repo_id}")` works as well.',
        "",
    ]
    return "\n".join(lines)


def find_loss_plot(preset_dir):
    """The PNG to embed as the loss plot: its path relative to `preset_dir`, or None.

    Prefers a PNG whose name contains "loss" (the first in sorted order); otherwise the only PNG
    of the directory; None when there is no PNG or several without "loss" in their names.

    Args:
        preset_dir: a preset directory.

    Example:
    ```python
    find_loss_plot("glam_tiny_preset")  # "loss.png"
    ```
    """
    root = pathlib.Path(preset_dir)
    pngs = sorted(
        path.relative_to(root).as_posix()
        for path in root.rglob("*")
        if path.suffix.lower() == ".png"
    )
    named_loss = [path for path in pngs if "loss" in pathlib.PurePosixPath(path).name.lower()]
    if named_loss:
        return named_loss[0]
    return pngs[0] if len(pngs) == 1 else None


class EvaluationResults:
    """The scores of a `results.json`, flattened for a model card.

    Attributes:
        scores: `[(task, num_fewshot, metric, filter, value, dataset)]` in file order;
            `dataset` is `(path, config, split)` of the task's Hub dataset or None (local data).
        missing: `[(name, reason)]` of tasks the evaluation could not run.
    """

    def __init__(self, scores, missing):
        self.scores = scores
        self.missing = missing


def read_eval_results(eval_results):
    """Parse evaluation results for a card: a `results.json` path, its dict (or the result).

    Accepts `glam-eval`'s file (`{"runs": [lm-eval results per few-shot setting],
    "missing_tasks": [...]}`) and a plain lm-eval results file (`{"results": ..., "n-shot": ...}`).

    Raises:
        ValueError: the file is missing, is not JSON, or holds no lm-eval results.

    Example:
    ```python
    evaluation = read_eval_results("glam_eval/results.json")
    [(task, shots, metric, value) for task, shots, metric, _, value, _ in evaluation.scores]
    ```
    """
    if isinstance(eval_results, EvaluationResults):
        return eval_results
    document = eval_results
    if isinstance(eval_results, (str, os.PathLike)):
        try:
            with open(eval_results, encoding="utf-8") as file:
                document = json.load(file)
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(
                f"eval_results: cannot read {os.fspath(eval_results)} as JSON ({error}). Pass "
                "the results.json written by glam-eval."
            ) from None
    runs = document.get("runs") if isinstance(document, dict) else None
    if runs is None and isinstance(document, dict) and "results" in document:
        runs = [document]
    if not isinstance(runs, list) or not all(isinstance(run.get("results"), dict) for run in runs):
        raise ValueError(
            "eval_results must be glam-eval's results.json (with 'runs') or lm-eval's results "
            "(with 'results')."
        )
    scores = []
    for run in runs:
        configs = run.get("configs", {})
        for task, values in run["results"].items():
            shots = run.get("num_fewshot", run.get("n-shot", {}).get(task, 0))
            dataset = _hub_dataset(configs.get(task, {}))
            for key, value in values.items():
                metric, _, filter_name = key.partition(",")
                if not filter_name or "_stderr" in metric:
                    continue
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    continue
                scores.append((task, int(shots), metric, filter_name, float(value), dataset))
    missing = [
        (entry.get("name"), entry.get("reason", ""))
        for entry in (document.get("missing_tasks") or [])
    ]
    return EvaluationResults(scores, missing)


def _hub_dataset(config):
    path = config.get("dataset_path")
    if not path or path in _LOCAL_DATA_BUILDERS:
        return None
    split = config.get("test_split") or config.get("validation_split")
    return (path, config.get("dataset_name"), split)


def eval_results_for_card(evaluation):
    """`huggingface_hub.EvalResult`s of an `EvaluationResults`: the card's `model-index`.

    The model-index groups a dataset's metrics into one entry whatever their `num_few_shot`,
    so a task evaluated in several settings carries the setting in each metric's name only.
    """
    settings = {}
    for task, shots, *_ in evaluation.scores:
        settings.setdefault(task, set()).add(shots)
    results = []
    for task, shots, metric, filter_name, value, dataset in evaluation.scores:
        path, config, split = dataset or (task, None, None)
        label = metric if filter_name == "none" else f"{metric} ({filter_name})"
        results.append(
            EvalResult(
                task_type="text-generation",
                task_name="Text Generation",
                dataset_type=path,
                dataset_name=task,
                dataset_config=config,
                dataset_split=split,
                dataset_args={"num_few_shot": shots} if len(settings[task]) == 1 else None,
                metric_type=metric,
                metric_value=value,
                metric_name=f"{label}, {shots}-shot",
            )
        )
    return results


def _evaluation_section(evaluation):
    lines = [
        "## Evaluation",
        "",
        "Scores from `glam-eval` (lm-evaluation-harness; `acc_per_token` is GLaM's "
        "multiple-choice rule: the option with the best log-likelihood per token), on a 0-1 "
        "scale.",
        "",
    ]
    if evaluation.scores:
        lines += ["| Task | Shots | Metric | Value |", "|---|---|---|---|"]
        for task, shots, metric, filter_name, value, _ in evaluation.scores:
            label = metric if filter_name == "none" else f"{metric} ({filter_name})"
            lines.append(f"| {_cell(task)} | {shots} | {_cell(label)} | {value:.4g} |")
        lines.append("")
    if evaluation.missing:
        lines.append(
            "Not evaluated: "
            + "; ".join(f"{_cell(name)} ({_cell(reason)})" for name, reason in evaluation.missing)
            + "."
        )
        lines.append("")
    return lines
