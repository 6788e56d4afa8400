"""A user's whole path: glam-train, glam-eval on its preset, publish with the scores, load back."""

import json
import subprocess
import sys

import huggingface_hub
import numpy as np
import pytest
import yaml
from hub_server import WRITABLE_ORG

pytest.importorskip("lm_eval")

import keras_glam  # noqa: E402
from keras_glam.hub import publish_model  # noqa: E402
from test_evaluation_lm_eval import ANSWER_TASK  # noqa: E402
from test_evaluation_lm_eval import CHOICE_TASK  # noqa: E402
from test_evaluation_lm_eval import DATA_DIR  # noqa: E402


def run_module(module, *arguments):
    """`python -m module arguments...` in a fresh process, as a user runs the command."""
    command = [sys.executable, "-m", module, *map(str, arguments)]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, f"{' '.join(command)} failed:\n{finished.stderr[-3000:]}"


def expected_model_index(results):
    """`{(task, metric name): value}` of every score in glam-eval's results.json, named as the
    card names them (`acc, 0-shot`; a filter other than lm-eval's `none` in parentheses)."""
    expected = {}
    for run in results["runs"]:
        for task, values in run["results"].items():
            for key, value in values.items():
                metric, _, filter_name = key.partition(",")
                if filter_name and not metric.endswith("_stderr"):
                    label = metric if filter_name == "none" else f"{metric} ({filter_name})"
                    expected[task, f"{label}, {run['num_fewshot']}-shot"] = value
    return expected


@pytest.mark.slow
def test_trained_model_is_evaluated_published_with_its_scores_and_loads(hub_server, tmp_path):
    run, evaluation = tmp_path / "run", tmp_path / "eval"
    run_module(
        "keras_glam.train",
        *("--preset", "glam_tiny_8e", "--steps", 2, "--sequence-length", 32),
        *("--batch-size", 2, "--seed", 0, "--samples", 0, "--baseline-tokens", 4096),
        *("--output", run),
    )
    run_module(
        "keras_glam.evaluate",
        *("--model", run / "preset", "--tasks", CHOICE_TASK, ANSWER_TASK),
        *("--data-dir", DATA_DIR, "--batch-size", 4, "--output", evaluation),
    )
    trained = keras_glam.GLaMCausalLM.from_preset(str(run / "preset"))
    handle = f"hf://{WRITABLE_ORG}/glam-trained"
    publish_model(trained, handle, eval_results=str(evaluation / "results.json"))

    readme = huggingface_hub.hf_hub_download(f"{WRITABLE_ORG}/glam-trained", "README.md")
    with open(readme, encoding="utf-8") as file:
        front_matter = yaml.safe_load(file.read().split("---")[1])
    published = {
        (result["dataset"]["name"], metric["name"]): metric["value"]
        for result in front_matter["model-index"][0]["results"]
        for metric in result["metrics"]
    }
    results = json.loads((evaluation / "results.json").read_text())
    assert published == expected_model_index(results)
    assert {task for task, _ in published} == {"glam_tiny_choice", "glam_tiny_answer"}

    loaded = keras_glam.GLaMCausalLM.from_preset(handle)
    token_ids = np.array([[1, 40, 41, 42, 43, 0]], "int32")
    inputs = {"token_ids": token_ids, "padding_mask": token_ids != 0}
    np.testing.assert_array_equal(np.asarray(loaded(inputs)), np.asarray(trained(inputs)))
