"""Evaluation results on the model card: `model-index` and an Evaluation table from results.json."""

import json

import pytest
import yaml
from hub_server import WRITABLE_ORG

import keras_glam
from keras_glam.hub import publish_model
from keras_glam.hub import render_model_card
from keras_glam.hub.model_card import read_eval_results
from keras_glam.models.presets import local_backbone_config

CONFIG = local_backbone_config("glam_tiny_8e")


def lm_eval_run(num_fewshot, arc_accuracy):
    """The parts of lm-eval's results dict a card reads, as glam-eval writes them."""
    return {
        "num_fewshot": num_fewshot,
        "results": {
            "arc_easy": {
                "alias": "arc_easy",
                "acc,none": arc_accuracy,
                "acc_stderr,none": 0.01,
                "acc_per_token,none": arc_accuracy + 0.05,
            },
            "triviaqa": {
                "exact_match,remove_whitespace": 0.125,
                "exact_match_stderr,remove_whitespace": 0.0,
            },
        },
        "configs": {
            "arc_easy": {
                "dataset_path": "allenai/ai2_arc",
                "dataset_name": "ARC-Easy",
                "test_split": "test",
            },
            "triviaqa": {"dataset_path": "json", "validation_split": "validation"},
        },
        "n-shot": {"arc_easy": num_fewshot, "triviaqa": num_fewshot},
    }


def results_document(*runs):
    return {
        "model": "glam_run/preset",
        "runs": list(runs),
        "missing_tasks": [{"name": "QuAC", "reason": "lm-eval 0.4.13 has no QuAC task"}],
    }


def card(eval_results):
    total, activated = keras_glam.count_params(CONFIG)
    text = render_model_card(
        "hf://glam-org/glam-tiny",
        backbone_config=CONFIG,
        total_params=total,
        activated_params=activated,
        eval_results=eval_results,
    )
    front_matter = yaml.safe_load(text.split("---")[1])
    return text, front_matter


def metrics_of(front_matter, dataset_name):
    [entry] = [
        result
        for result in front_matter["model-index"][0]["results"]
        if result["dataset"]["name"] == dataset_name
    ]
    return entry, {metric["name"]: metric["value"] for metric in entry["metrics"]}


def test_one_setting_puts_every_score_and_its_shots_in_the_model_index(tmp_path):
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results_document(lm_eval_run(0, 0.5))))
    text, front_matter = card(str(path))
    assert front_matter["model-index"][0]["name"] == "glam-org/glam-tiny"
    entry, metrics = metrics_of(front_matter, "arc_easy")
    assert entry["dataset"] == {
        "name": "arc_easy",
        "type": "allenai/ai2_arc",
        "config": "ARC-Easy",
        "split": "test",
        "args": {"num_few_shot": 0},
    }
    assert metrics == {"acc, 0-shot": 0.5, "acc_per_token, 0-shot": 0.55}
    entry, metrics = metrics_of(front_matter, "triviaqa")
    assert entry["dataset"]["type"] == "triviaqa"  # Local data: no Hub dataset to name.
    assert metrics == {"exact_match (remove_whitespace), 0-shot": 0.125}
    assert "| arc_easy | 0 | acc_per_token | 0.55 |" in text
    assert "Not evaluated: QuAC (lm-eval 0.4.13 has no QuAC task)." in text


def test_several_settings_name_their_shots_in_each_metric():
    _, front_matter = card(results_document(lm_eval_run(0, 0.5), lm_eval_run(1, 0.625)))
    entry, metrics = metrics_of(front_matter, "arc_easy")
    assert "args" not in entry["dataset"]  # The model-index would show one setting for both.
    assert metrics["acc, 0-shot"] == 0.5 and metrics["acc, 1-shot"] == 0.625


def test_plain_lm_eval_results_work_too():
    run = lm_eval_run(5, 0.75)
    del run["num_fewshot"]
    evaluation = read_eval_results(run)
    assert (
        "arc_easy",
        5,
        "acc",
        "none",
        0.75,
        ("allenai/ai2_arc", "ARC-Easy", "test"),
    ) in evaluation.scores


@pytest.mark.parametrize(
    "content, message",
    [("not json", "cannot read"), (json.dumps({"scores": 1}), "glam-eval's results.json")],
)
def test_unreadable_results_are_refused(tmp_path, content, message):
    path = tmp_path / "results.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        card(str(path))


def test_publish_model_puts_the_scores_on_the_card(hub_server, tmp_path):
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results_document(lm_eval_run(0, 0.5))))
    lm = keras_glam.GLaMCausalLM.from_preset("glam_tiny_8e", sequence_length=16)
    with pytest.raises(ValueError, match="cannot read"):
        publish_model(lm, f"hf://{WRITABLE_ORG}/glam-scored", eval_results=tmp_path / "none.json")
    publish_model(lm, f"hf://{WRITABLE_ORG}/glam-scored", eval_results=str(path))
    readme = hub_server.files(f"{WRITABLE_ORG}/glam-scored")["README.md"].decode()
    _, metrics = metrics_of(yaml.safe_load(readme.split("---")[1]), "arc_easy")
    assert metrics == {"acc, 0-shot": 0.5, "acc_per_token, 0-shot": 0.55}
