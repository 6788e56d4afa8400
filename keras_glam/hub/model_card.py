"""The model card (README.md) keras_glam publishes with a GLaM preset on the Hugging Face Hub."""

import pathlib

from huggingface_hub import ModelCardData

from keras_glam.hub.auth import parse_hf_handle
from keras_glam.models.parameter_count import is_moe_layer

CARD_TAGS = ("keras", "glam", "mixture-of-experts")


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


def _check_count(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")


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

    Returns:
        The card as a string.

    Example:
    ```python
    from keras_glam.models.glam_presets import BACKBONE_PRESETS

    config = BACKBONE_PRESETS["glam_tiny_8e"]["config"]
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
    _check_count("total_params", total_params)
    _check_count("activated_params", activated_params)
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

    repo_id = f"{namespace}/{name}"
    front_matter = ModelCardData(
        library_name="keras-hub",
        pipeline_tag="text-generation",
        license=license,
        tags=list(CARD_TAGS),
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
