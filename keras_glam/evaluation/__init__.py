"""Evaluating GLaM models as the paper did, through lm-evaluation-harness (`lm_eval`).

Available with the core package: `perplexity` (nats per token and bits per byte of texts),
`TokenScorer` and `BatchedGenerator` (the batched, compiled scoring and decoding underneath),
and GLaM's suite (`GLAM_TASKS`: the paper's 29 tasks by category, mapped to lm-eval's tasks).
Needing lm-eval (`pip install "keras-glam[eval]"`): `GLaMLM`, a `GLaMCausalLM` as an lm-eval
model (registered with lm-eval as `keras_glam` when imported), `select_tasks`, and the
`glam-eval` command (`python -m keras_glam.evaluate`). See `docs/evaluation.md`.
"""

import importlib

from keras_glam.evaluation.batched_generator import BatchedGenerator
from keras_glam.evaluation.glam_suite import GLAM_TASKS
from keras_glam.evaluation.glam_suite import GLaMTask
from keras_glam.evaluation.model_loading import INSTALL_HINT
from keras_glam.evaluation.model_loading import load_causal_lm
from keras_glam.evaluation.perplexity import Perplexity
from keras_glam.evaluation.perplexity import perplexity
from keras_glam.evaluation.perplexity import text_perplexities
from keras_glam.evaluation.token_scorer import TokenScorer
from keras_glam.evaluation.token_scorer import rolling_windows

# Names that import lm-eval, and the module of each: loaded on first use.
_NEEDS_LM_EVAL = {
    "GLaMLM": "keras_glam.evaluation.glam_lm",
    "TaskSelection": "keras_glam.evaluation.task_loading",
    "TaskSelectionError": "keras_glam.evaluation.task_loading",
    "select_tasks": "keras_glam.evaluation.task_loading",
}

__all__ = [
    "GLAM_TASKS",
    "BatchedGenerator",
    "GLaMTask",
    "Perplexity",
    "TokenScorer",
    "load_causal_lm",
    "perplexity",
    "rolling_windows",
    "text_perplexities",
    *_NEEDS_LM_EVAL,
]


def require_lm_eval():
    """Import lm-eval, or raise `ImportError` saying how to install it."""
    try:
        return importlib.import_module("lm_eval")
    except ModuleNotFoundError as error:
        if error.name != "lm_eval":
            raise
        raise ImportError(
            f"keras_glam.evaluation needs lm-evaluation-harness (lm-eval) for this: "
            f"{INSTALL_HINT}"
        ) from None


def __getattr__(name):
    if name not in _NEEDS_LM_EVAL:
        raise AttributeError(f"module 'keras_glam.evaluation' has no attribute '{name}'")
    require_lm_eval()
    return getattr(importlib.import_module(_NEEDS_LM_EVAL[name]), name)
