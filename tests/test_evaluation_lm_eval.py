"""GLaMLM inside lm-evaluation-harness, GLaM's suite, task selection and the glam-eval command."""

import json
import os
import pathlib
import time

import numpy as np
import pytest

pytest.importorskip("lm_eval")

import datasets  # noqa: E402
import huggingface_hub  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402

import keras_glam  # noqa: E402
from keras_glam import evaluate  # noqa: E402
from keras_glam.evaluation import GLAM_TASKS  # noqa: E402
from keras_glam.evaluation import GLaMLM  # noqa: E402
from keras_glam.evaluation import glam_suite  # noqa: E402
from keras_glam.evaluation import select_tasks  # noqa: E402
from keras_glam.evaluation import task_loading  # noqa: E402
from keras_glam.evaluation.reports import add_acc_per_token  # noqa: E402
from test_evaluation_scoring import MAX_LENGTH  # noqa: E402
from test_evaluation_scoring import causal_lm  # noqa: E402, F401 - the fixture
from test_evaluation_scoring import direct_log_probs  # noqa: E402
from test_evaluation_scoring import greedy_references  # noqa: E402

TASKS_DIR = pathlib.Path(__file__).parent / "eval_tasks"
DATA_DIR = TASKS_DIR / "data"
CHOICE_TASK = str(TASKS_DIR / "glam_tiny_choice.yaml")
ANSWER_TASK = str(TASKS_DIR / "glam_tiny_answer.yaml")


@pytest.fixture(scope="module")
def glam_lm(causal_lm):
    return GLaMLM(causal_lm, batch_size=4)


@pytest.fixture
def offline(monkeypatch):
    """`go_offline` for this test only: the flags it sets are restored afterwards."""
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(name, os.environ.get(name, ""))
    monkeypatch.setattr(
        huggingface_hub.constants, "HF_HUB_OFFLINE", huggingface_hub.constants.HF_HUB_OFFLINE
    )
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", datasets.config.HF_HUB_OFFLINE)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", datasets.config.HF_DATASETS_OFFLINE)
    monkeypatch.setattr(task_loading, "hub_reachable", lambda timeout=None: False)
    task_loading.go_offline()


def requests(kind, *arguments):
    return [Instance(kind, {}, args, index) for index, args in enumerate(arguments)]


def direct_continuation_log_prob(glam_lm, context, continuation):
    """Tokens `<s> + context + continuation` (lm-eval's split), scored from plain logits."""
    tokenizer = glam_lm.glam_tokenizer
    start = tokenizer.start_token_id
    context_length = 1 + (len(tokenizer.tokenize(context)) if context else 0)
    whole = [start, *tokenizer.tokenize(context + continuation).tolist()]
    log_probs, _ = direct_log_probs(glam_lm.causal_lm, whole)
    return log_probs[context_length - 1 :].sum(), len(whole) - context_length


def test_loglikelihood_conditions_on_the_start_token_and_the_context(glam_lm):
    pairs = [
        ("Question: which keyword defines a function?\nAnswer:", " def"),
        ("The quick brown fox", " jumps over the lazy dog"),
        ("", "An empty context is the start token alone."),
        ("x = ", "1"),
        ("Trailing space moves to the continuation ", "here"),
        ("So does a newline:\n", "Answer: 4"),
    ]
    results = glam_lm.loglikelihood(requests("loglikelihood", *pairs), disable_tqdm=True)
    for (context, continuation), (log_prob, _) in zip(pairs, results):
        expected, length = direct_continuation_log_prob(
            glam_lm, context.rstrip(), context[len(context.rstrip()) :] + continuation
        )
        np.testing.assert_allclose(log_prob, expected, rtol=1e-5, atol=1e-4)
        assert glam_lm.continuation_length(context, continuation) == length


def test_empty_context_is_scored_after_start_token_only(glam_lm):
    tokenizer = glam_lm.glam_tokenizer
    text = "print('hello')"
    [(log_prob, _)] = glam_lm.loglikelihood(
        requests("loglikelihood", ("", text)), disable_tqdm=True
    )
    (expected,) = glam_lm.scorer.score(
        [([tokenizer.start_token_id], tokenizer.tokenize(text).tolist())]
    )
    assert log_prob == pytest.approx(expected[0], rel=1e-6)


def test_rolling_matches_the_scorer_and_perplexity(glam_lm):
    text = "def f(x):\n    return x * 2\n" * 6
    [total] = glam_lm.loglikelihood_rolling(
        requests("loglikelihood_rolling", (text,)), disable_tqdm=True
    )
    result = keras_glam.evaluation.perplexity(glam_lm.causal_lm, [text], max_length=MAX_LENGTH)
    assert total == pytest.approx(-result.nats_per_token * result.tokens, rel=1e-6)


@pytest.mark.slow
def test_generate_until_is_greedy_generate_cut_at_the_stop_string(glam_lm):
    contexts = ["def main():", "The quick brown fox", "x"]
    references, _ = greedy_references(glam_lm.causal_lm, contexts, 10)
    stop = references[0][2:4]
    settings = {"until": [stop], "max_gen_toks": 10, "do_sample": False}
    texts = glam_lm.generate_until(
        requests("generate_until", *[(c, dict(settings)) for c in contexts]), disable_tqdm=True
    )
    assert texts == [reference.split(stop)[0] for reference in references]


def test_generation_settings_that_cannot_apply_are_refused(glam_lm):
    with pytest.raises(ValueError, match="do_sample=True"):
        glam_lm.generate_until(
            requests(
                "generate_until", ("x", {"until": ["\n"], "do_sample": True, "temperature": 1.0})
            ),
            disable_tqdm=True,
        )


def test_registered_with_lm_eval():
    from lm_eval.api.registry import get_model

    assert get_model("keras_glam") is GLaMLM


def test_the_suite_is_the_papers_29_tasks_and_names_real_lm_eval_tasks():
    assert len(GLAM_TASKS) == 29
    assert sum(task.kind == glam_suite.NLG for task in GLAM_TASKS) == 8
    assert {task.category for task in GLAM_TASKS} == set(glam_suite.CATEGORIES)
    for task in GLAM_TASKS:
        if task.lm_eval_task is None:
            assert task.note, task.name
            continue
        config = task_loading.load_yaml(
            task_loading.LM_EVAL_TASKS_DIR / task.yaml, resolve_func=False
        )
        assert config["task"] == task.lm_eval_task


def test_glam_all_lists_what_it_cannot_run():
    # CoQA's and ReCoRD's task code import `transformers`; without it they are listed too.
    import importlib.util

    has_transformers = importlib.util.find_spec("transformers") is not None
    selection = select_tasks(["glam_all"])
    reasons = {m.name: m.reason for m in selection.missing}
    expected = {"QuAC", "RACE-m", "StoryCloze"} | (
        set() if has_transformers else {"CoQA", "ReCoRD"}
    )
    assert set(reasons) == expected
    assert "manual download" in reasons["StoryCloze"] and "QuAC" in reasons["QuAC"]
    assert len(selection.specs) == 29 - len(expected)
    selection = select_tasks(["glam_nlu", "arc_easy"])  # Named twice: evaluated once.
    assert [spec["task"] for spec in selection.specs].count("arc_easy") == 1


def test_unknown_task_names_list_the_closest(tmp_path):
    with pytest.raises(task_loading.TaskSelectionError, match="'arc_easyy' \\(closest: arc_easy"):
        select_tasks(["arc_easyy"])
    with pytest.raises(task_loading.TaskSelectionError, match="No tasks given"):
        select_tasks([" "])


def test_local_data_replaces_the_hub_dataset_and_drops_absent_splits(tmp_path):
    folder = tmp_path / "arc_easy"
    folder.mkdir()
    (folder / "validation.jsonl").write_text("{}\n")
    (folder / "train.jsonl").write_text("{}\n")
    [spec] = select_tasks(["arc_easy"], data_dir=str(tmp_path)).specs
    assert spec["dataset_path"] == "json" and spec["dataset_name"] is None
    assert spec["dataset_kwargs"]["data_files"] == {
        "train": str(folder / "train.jsonl"),
        "validation": str(folder / "validation.jsonl"),
    }
    assert spec["test_split"] is None  # lm-eval evaluates arc_easy on test; only validation here.
    (folder / "validation.jsonl").unlink()
    (folder / "train.jsonl").unlink()
    (folder / "train.parquet").write_bytes(b"")
    with pytest.raises(task_loading.TaskSelectionError, match="no evaluation split"):
        select_tasks(["arc_easy"], data_dir=str(tmp_path))


@pytest.mark.slow
def test_zero_and_one_shot_prompts_are_built_as_lm_eval_builds_them(glam_lm):
    import lm_eval

    selection = select_tasks([CHOICE_TASK], data_dir=str(DATA_DIR))
    contexts = {}
    for shots in (0, 1):
        tasks = selection.load()
        results = lm_eval.simple_evaluate(
            model=glam_lm,
            tasks=list(tasks.values()),
            num_fewshot=shots,
            log_samples=True,
            bootstrap_iters=0,
        )
        contexts[shots] = [
            sample["arguments"][0][0] for sample in results["samples"]["glam_tiny_choice"]
        ]
        add_acc_per_token(results, tasks, glam_lm)
        expected = np.mean(
            [_per_token_choice_is_right(glam_lm, s) for s in results["samples"]["glam_tiny_choice"]]
        )
        assert results["results"]["glam_tiny_choice"]["acc_per_token,none"] == pytest.approx(
            expected
        )
    train = [json.loads(line) for line in (DATA_DIR / "glam_tiny_choice" / "train.jsonl").open()]
    shots = {f"Question: {d['question']}\nAnswer: {d['choices'][d['label']]}\n\n" for d in train}
    for zero, one in zip(contexts[0], contexts[1]):
        assert zero.startswith("Question: ") and zero.endswith("\nAnswer:")
        assert one.endswith(zero) and one[: -len(zero)] in shots


def _per_token_choice_is_right(glam_lm, sample):
    scores = [
        response[0] / glam_lm.continuation_length(*arguments)
        for response, arguments in zip(sample["filtered_resps"], sample["arguments"])
    ]
    return float(np.argmax(scores) == sample["target"])


def run_command(argv, capsys):
    code = evaluate.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "glam_tiny_8e", "--tasks"], "--tasks is empty"),
        (["--model", "glam_tiny_8e"], "Nothing to evaluate"),
        (["--model", "glam_tiny_8e", "--tasks", "arc_easyy"], "closest: arc_easy"),
        (["--model", "glam_tiny_8e", "--text", "/nonexistent.txt"], "does not exist"),
        (
            ["--model", "glam_0.1b", "--tasks", CHOICE_TASK, "--data-dir", str(DATA_DIR)],
            "has no tokenizer",
        ),
        (
            ["--model", "glam_tiny_8e", "--tasks", CHOICE_TASK, "--num-fewshot", "-1"],
            "non-negative",
        ),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(argv, message, capsys, offline, tmp_path):
    code, out, err = run_command([*argv, "--output", str(tmp_path / "out")], capsys)
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_continuations_longer_than_max_length_are_one_line_and_exit_code_2(
    capsys, offline, tmp_path
):
    # Choices of up to 3 tokens, a model reading 2 at once: scored in part, they would mislead.
    argv = ["--model", "glam_tiny_8e", "--tasks", CHOICE_TASK, "--data-dir", str(DATA_DIR),
            "--max-length", "2", "--limit", "3", "--output", str(tmp_path / "out")]
    code, _, err = run_command(argv, capsys)
    assert code == 2 and "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("glam-eval: error:")]
    assert len(errors) == 1 and "raise max_length (glam-eval --max-length) to at least" in errors[0]
    assert not (tmp_path / "out").exists()


def test_unreachable_task_data_fails_fast_naming_the_task_and_files(capsys, offline, tmp_path):
    started = time.monotonic()
    code, _, err = run_command(["--model", "glam_tiny_8e", "--tasks", CHOICE_TASK], capsys)
    assert code == 2
    assert "Task 'glam_tiny_choice'" in err and "keras-glam-tests/tiny_choice" in err
    code, _, err = run_command(
        ["--model", "glam_tiny_8e", "--tasks", CHOICE_TASK, "--data-dir", str(tmp_path)], capsys
    )
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert os.path.join(str(tmp_path), "glam_tiny_choice", "validation{") in err
    assert time.monotonic() - started < 30


@pytest.mark.slow
def test_command_end_to_end_on_tiny_tasks(capsys, offline, tmp_path):
    output = tmp_path / "eval"
    text = tmp_path / "held_out.txt"
    text.write_text("def f(x):\n    return x\n" * 5)
    code, out, err = run_command(
        [
            "--model",
            "glam_tiny_8e",
            "--tasks",
            CHOICE_TASK,
            ANSWER_TASK,
            "--data-dir",
            str(DATA_DIR),
            "--num-fewshot",
            "0",
            "1",
            "--max-length",
            "64",
            "--batch-size",
            "4",
            "--text",
            str(text),
            "--output",
            str(output),
        ],
        capsys,
    )
    assert code == 0, err
    results = json.loads((output / "results.json").read_text())
    assert [run["num_fewshot"] for run in results["runs"]] == [0, 1]
    for run in results["runs"]:
        assert set(run["results"]) == {"glam_tiny_choice", "glam_tiny_answer"}
        assert "acc_per_token,none" in run["results"]["glam_tiny_choice"]
        assert run["results"]["glam_tiny_choice"]["sample_len"] == 5
    markdown = (output / "results.md").read_text()
    assert "| Other tasks | glam_tiny_choice | acc_per_token |" in markdown
    assert "GLaM 64B/64E (paper)" in markdown
    assert (output / "results.png").read_bytes().startswith(b"\x89PNG")
    assert not [p for p in os.listdir(output) if p.startswith(".tmp")]
    perplexity = json.loads((output / "perplexity.json").read_text())["texts"][str(text)]
    tokenizer = keras_glam.GLaMTokenizer.from_preset("glam_tiny_8e")
    assert perplexity["tokens"] == len(tokenizer.tokenize(text.read_text()))
    assert perplexity["bytes"] == len(text.read_bytes())
    nats = perplexity["nats_per_token"] * perplexity["tokens"]
    bits = perplexity["bits_per_byte"] * perplexity["bytes"]
    assert nats > 0 and bits * np.log(2) == pytest.approx(nats)
    assert "nats/token" in out and "bits/byte" in out


def test_the_docs_show_the_suite_table_of_the_code():
    docs = (pathlib.Path(__file__).parents[1] / "docs" / "evaluation.md").read_text()
    for task in GLAM_TASKS:
        lm_eval_task = f"`{task.lm_eval_task}`" if task.lm_eval_task else "missing"
        cells = (task.category, task.name, task.kind, lm_eval_task, f"`{task.metric}`", task.note)
        row = "| " + " | ".join(cells) + " |"
        assert row in docs, row
