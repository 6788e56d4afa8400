"""GLaM's evaluation suite: the paper's 29 tasks, by category, mapped to lm-eval's tasks.

Du et al. (2021), section 5 and appendix: 8 generative (NLG) tasks scored by exact match or F1
of the decoded answer (beam search of width 4 in the paper), and 21 understanding (NLU) tasks
scored by accuracy of the option with the highest log-likelihood divided by its token length
(`acc_per_token`, computed by `keras_glam.evaluation.reports`, beside lm-eval's `acc` and
`acc_norm`). Zero-shot runs on the dev sets; one- and few-shot prompts prepend examples drawn
from the training split. Scores are plain averages on a 0-100 scale.

The lm-eval names are those of lm-eval 0.4.13's `lm_eval/tasks` folder; `yaml` is the task's
file in it. Tasks lm-eval lacks have `lm_eval_task=None`, and every report lists them as
missing.
"""

import dataclasses

NLG = "NLG"
NLU = "NLU"

# The paper's categories, in its order.
CATEGORIES = (
    "Open-domain QA",
    "Cloze and completion",
    "Winograd-style",
    "Common sense",
    "In-context reading comprehension",
    "SuperGLUE",
    "NLI",
)

# GLaM's primary score of an NLU task: the option with the best log-likelihood per token.
ACC_PER_TOKEN = "acc_per_token"


@dataclasses.dataclass(frozen=True)
class GLaMTask:
    """One task of GLaM's suite.

    Attributes:
        name: the paper's name.
        category: one of `CATEGORIES`.
        kind: `NLG` or `NLU`.
        lm_eval_task: lm-eval's task name, or None when lm-eval lacks it.
        yaml: the task's YAML file relative to `lm_eval/tasks`, or None.
        metric: the lm-eval metric (or `ACC_PER_TOKEN`) that gives GLaM's score.
        note: how our scoring or data differs from the paper's, or why the task is missing.
        manual_download: lm-eval cannot fetch the data; it must come from `--data-dir`.
    """

    name: str
    category: str
    kind: str
    lm_eval_task: str
    yaml: str
    metric: str
    note: str = ""
    manual_download: bool = False


def _nlu(name, category, task, yaml, note="", manual_download=False):
    return GLaMTask(name, category, NLU, task, yaml, ACC_PER_TOKEN, note, manual_download)


GLAM_TASKS = (
    GLaMTask("TriviaQA", CATEGORIES[0], NLG, "triviaqa", "triviaqa/default.yaml", "exact_match"),
    GLaMTask(
        "Natural Questions", CATEGORIES[0], NLG, "nq_open", "nq_open/nq_open.yaml", "exact_match"
    ),
    GLaMTask(
        "WebQuestions",
        CATEGORIES[0],
        NLG,
        "webqs",
        "webqs/webqs.yaml",
        "exact_match",
        note="lm-eval scores whether greedy decoding yields one of the answers exactly "
        "(is_greedy), not a free decode's exact match",
    ),
    GLaMTask(
        "LAMBADA",
        CATEGORIES[1],
        NLG,
        "lambada_openai",
        "lambada/lambada_openai.yaml",
        "acc",
        note="OpenAI's LAMBADA test set; acc is whether greedy decoding yields the last word",
    ),
    _nlu("HellaSwag", CATEGORIES[1], "hellaswag", "hellaswag/hellaswag.yaml"),
    _nlu(
        "StoryCloze",
        CATEGORIES[1],
        "storycloze_2016",
        "storycloze/storycloze_2016.yaml",
        note="the data needs a manual download (storycloze_2016 folder under --data-dir)",
        manual_download=True,
    ),
    _nlu("Winograd", CATEGORIES[2], "wsc273", "wsc273/default.yaml"),
    _nlu("WinoGrande", CATEGORIES[2], "winogrande", "winogrande/default.yaml"),
    _nlu("PIQA", CATEGORIES[3], "piqa", "piqa/piqa.yaml"),
    _nlu("ARC-e", CATEGORIES[3], "arc_easy", "arc/arc_easy.yaml"),
    _nlu("ARC-c", CATEGORIES[3], "arc_challenge", "arc/arc_challenge.yaml"),
    _nlu("OpenBookQA", CATEGORIES[3], "openbookqa", "openbookqa/openbookqa.yaml"),
    GLaMTask("DROP", CATEGORIES[4], NLG, "drop", "drop/default.yaml", "f1"),
    GLaMTask("CoQA", CATEGORIES[4], NLG, "coqa", "coqa/default.yaml", "f1"),
    GLaMTask("QuAC", CATEGORIES[4], NLG, None, None, "f1", note="lm-eval 0.4.13 has no QuAC task"),
    GLaMTask(
        "SQuADv2",
        CATEGORIES[4],
        NLG,
        "squadv2",
        "squadv2/squadv2.yaml",
        "f1",
        note="lm-eval computes its metric with `evaluate.load('squad_v2')`, fetched from the Hub",
    ),
    GLaMTask(
        "RACE-m",
        CATEGORIES[4],
        NLU,
        None,
        None,
        ACC_PER_TOKEN,
        note="lm-eval 0.4.13 has RACE-high only (task `race`)",
    ),
    _nlu("RACE-h", CATEGORIES[4], "race", "race/race.yaml"),
    _nlu("BoolQ", CATEGORIES[5], "boolq", "super_glue/boolq/default.yaml"),
    _nlu("CB", CATEGORIES[5], "cb", "super_glue/cb/default.yaml"),
    _nlu("COPA", CATEGORIES[5], "copa", "super_glue/copa/default.yaml"),
    _nlu("RTE", CATEGORIES[5], "sglue_rte", "super_glue/rte/default.yaml"),
    _nlu("WiC", CATEGORIES[5], "wic", "super_glue/wic/default.yaml"),
    _nlu("WSC", CATEGORIES[5], "wsc", "super_glue/wsc/default.yaml"),
    _nlu(
        "MultiRC",
        CATEGORIES[5],
        "multirc",
        "super_glue/multirc/default.yaml",
        note="scored by accuracy per answer option (the paper: F1 over answer options)",
    ),
    _nlu(
        "ReCoRD",
        CATEGORIES[5],
        "record",
        "super_glue/record/default.yaml",
        note="acc_per_token counts the first gold entity; lm-eval's em/f1 accept any",
    ),
    _nlu("ANLI R1", CATEGORIES[6], "anli_r1", "anli/anli_r1.yaml"),
    _nlu("ANLI R2", CATEGORIES[6], "anli_r2", "anli/anli_r2.yaml"),
    _nlu("ANLI R3", CATEGORIES[6], "anli_r3", "anli/anli_r3.yaml"),
)

GROUPS = {
    "glam_nlg": tuple(task for task in GLAM_TASKS if task.kind == NLG),
    "glam_nlu": tuple(task for task in GLAM_TASKS if task.kind == NLU),
    "glam_all": GLAM_TASKS,
}

# Zero/one/few-shot averages over the 29 tasks, from the paper (not measured here).
PAPER_AVERAGES = {
    "GLaM 64B/64E (paper)": {0: 62.7, 1: 65.5, "few": 68.1},
    "GPT-3 175B (paper)": {0: 56.9, 1: 61.6, "few": 65.2},
}


def glam_task(lm_eval_task):
    """The `GLaMTask` of an lm-eval task name, or None if the name is not in GLaM's suite."""
    for task in GLAM_TASKS:
        if task.lm_eval_task == lm_eval_task:
            return task
    return None
