"""Publish a GLaM model to the Hugging Face Hub in one call: preset, our model card, one commit."""

import os
import pathlib
import shutil
import tempfile

from keras_glam.hub.auth import check_write_access
from keras_glam.hub.auth import resolve_token
from keras_glam.hub.model_card import read_eval_results
from keras_glam.hub.model_card import render_model_card
from keras_glam.hub.publish import publish_preset
from keras_glam.models.parameter_count import count_params


def publish_model(
    causal_lm,
    handle,
    *,
    training_data=None,
    training_steps=None,
    metrics=None,
    loss_plot=None,
    eval_results=None,
    description=None,
    license="apache-2.0",  # noqa: A002 - the model-card field's name
    commit_message=None,
    private=False,
    revision=None,
    max_retries=4,
    initial_retry_delay=1.0,
    token=None,
):
    """Save `causal_lm` as a preset, render keras_glam's model card and publish both.

    The preset is written to a temporary directory (removed afterwards), the card counts the
    parameters with `keras_glam.count_params` and shows the training details given here, and
    `publish_preset` sends everything as one commit with retries. The token is checked first,
    before the model is saved.

    Args:
        causal_lm: a `GLaMCausalLM` (any KerasHub task with a GLaM backbone).
        handle: "hf://namespace/name", or "hf://name" for the token's own namespace.
        training_data: what the model was trained on, for the card.
        training_steps: number of training steps, for the card.
        metrics: `{name: number or string}` for the card's metrics table.
        loss_plot: path of a local PNG file; it is uploaded next to the preset and shown in
            the card.
        eval_results: the `results.json` of `glam-eval` (a path, or its parsed dict): its
            scores go into the card's `model-index` and an "Evaluation" table.
        description: the card's introduction; a generic GLaM one when None.
        license: the licence identifier for the card's front matter.
        commit_message: the commit's title; a default names the repository.
        private: visibility if this call creates the repository.
        revision: the branch to commit to (created from `main` if missing); None is `main`.
        max_retries: retries per request on transient failures.
        initial_retry_delay: seconds before the first retry; doubles after each.
        token: the Hub token; None uses `HF_TOKEN` or the stored login (`hf auth login`).

    Returns:
        The `PublishResult` of `publish_preset`.

    Raises:
        HubAuthError: no token, or one without write access (nothing was saved or sent).
        ValueError: `loss_plot` is not an existing PNG file, `eval_results` is unreadable, or a
            card argument is invalid.

    Example:
    ```python
    result = publish_model(
        causal_lm,
        "hf://glam-org/glam-tiny",
        training_data="Python documentation (pydoc_data.topics)",
        training_steps=500,
        metrics={"held-out cross-entropy": 3.21},
        loss_plot="glam_run/training.png",
        eval_results="glam_eval/results.json",
    )
    keras_glam.GLaMCausalLM.from_preset(result.handle)
    ```
    """
    if loss_plot is not None:
        plot = pathlib.Path(loss_plot)
        if plot.suffix.lower() != ".png" or not plot.is_file():
            raise ValueError(
                f"loss_plot must be an existing .png file, got {os.fspath(loss_plot)!r}."
            )
    if eval_results is not None:
        eval_results = read_eval_results(eval_results)  # Unreadable: fail before the Hub.
    token = resolve_token(token)
    access = check_write_access(
        handle, token=token, max_retries=max_retries, initial_retry_delay=initial_retry_delay
    )
    backbone_config = causal_lm.backbone.get_config()
    total, activated = count_params(backbone_config)
    plot_in_repository = pathlib.Path(loss_plot).name if loss_plot is not None else None
    card = render_model_card(
        f"hf://{access.repo_id}",
        backbone_config=backbone_config,
        total_params=total,
        activated_params=activated,
        license=license,
        description=description,
        training_data=training_data,
        training_steps=training_steps,
        metrics=metrics,
        loss_plot=plot_in_repository,
        eval_results=eval_results,
    )
    with tempfile.TemporaryDirectory(prefix="glam-publish-") as preset_dir:
        causal_lm.save_to_preset(preset_dir)
        if loss_plot is not None:
            shutil.copyfile(loss_plot, os.path.join(preset_dir, plot_in_repository))
        return publish_preset(
            preset_dir,
            f"hf://{access.repo_id}",
            model_card=card,
            commit_message=commit_message,
            private=private,
            revision=revision,
            max_retries=max_retries,
            initial_retry_delay=initial_retry_delay,
            token=token,
        )
