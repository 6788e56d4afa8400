"""A one-page picture of a training run: loss curves and per-layer expert load."""

import math

import numpy as np


def plot_training(state, path, unigram_entropy=None, title="GLaM training"):
    """Save a PNG with the loss curves and the expert load of a `Trainer` run.

    Left: the per-step training loss (faint) and its moving average, the training cross-entropy
    per chunk and the held-out cross-entropy per chunk, with the unigram-entropy baseline.
    Right (MoE models): each MoE layer's share of routed tokens per expert over the last chunk,
    as a heat map whose colour scale is centred on the uniform share `1 / E`.

    Args:
        state: a `keras_glam.training.trainer.TrainingState` (its `step_losses`, `chunk_logs`
            and `expert_load`), or its dict form.
        path: where to write the PNG.
        unigram_entropy: optional float, nats/token of the unigram baseline on held-out data.
        title: the figure title.
    """
    # A Figure of its own, not pyplot: the process's backend (a notebook's inline one) is kept.
    from matplotlib.figure import Figure

    if not isinstance(state, dict):
        state = state.to_dict()
    expert_load = state["expert_load"]
    columns = 2 if expert_load else 1
    figure = Figure(figsize=(6.5 * columns, 4.5), constrained_layout=True)
    axes = figure.subplots(1, columns, squeeze=False)
    _plot_losses(axes[0][0], state, unigram_entropy)
    if expert_load:
        _plot_expert_load(figure, axes[0][1], expert_load[-1])
    figure.suptitle(title)
    figure.savefig(path, dpi=110)


def _plot_losses(axis, state, unigram_entropy):
    if state["step_losses"]:
        steps, losses = np.array(state["step_losses"], dtype="float64").T
        axis.plot(steps, losses, color="tab:blue", alpha=0.25, linewidth=0.8)
        window = max(1, len(losses) // 25)
        if window > 1:
            smoothed = np.convolve(losses, np.ones(window) / window, mode="valid")
            axis.plot(
                steps[window - 1 :], smoothed, color="tab:blue", label="train loss (moving average)"
            )
    chunks = state["chunk_logs"]
    chunk_steps = [chunk["step"] for chunk in chunks]
    for key, label, style in (
        ("cross_entropy", "train cross-entropy (chunk mean)", dict(color="tab:blue", marker="o")),
        ("val_cross_entropy", "held-out cross-entropy", dict(color="tab:orange", marker="s")),
    ):
        values = [chunk.get(key, math.nan) for chunk in chunks]
        if any(math.isfinite(value) for value in values):
            axis.plot(chunk_steps, values, linestyle="--", label=label, **style)
    if unigram_entropy is not None:
        axis.axhline(unigram_entropy, color="gray", linestyle=":", label="unigram entropy")
    axis.set_xlabel("training step")
    axis.set_ylabel("nats / token")
    axis.set_title("Loss")
    axis.grid(alpha=0.3)
    axis.legend(loc="upper right", fontsize="small")


def _plot_expert_load(figure, axis, last_entry):
    step, fractions = last_entry
    fractions = np.asarray(fractions, dtype="float64")
    num_layers, num_experts = fractions.shape
    uniform = 1.0 / num_experts
    from matplotlib import colors

    norm = colors.TwoSlopeNorm(vcenter=uniform, vmin=0.0, vmax=max(2 * uniform, fractions.max()))
    image = axis.imshow(fractions, cmap="RdBu_r", norm=norm, aspect="auto")
    axis.set_xlabel("expert")
    axis.set_ylabel("MoE layer")
    axis.set_yticks(range(num_layers))
    axis.set_xticks(range(0, num_experts, max(1, num_experts // 8)))
    cv = fractions.std(axis=1) / fractions.mean(axis=1)
    axis.set_yticklabels([f"{i} (cv {c:.2f})" for i, c in enumerate(cv)])
    axis.set_title(f"Share of routed tokens per expert (chunk ending at step {int(step)})")
    colorbar = figure.colorbar(image, ax=axis)
    colorbar.set_label(f"share of tokens (uniform = 1/{num_experts})")
