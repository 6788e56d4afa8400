"""GLaM's optimizer recipe: the optimizer and learning rate `GLaMCausalLM.compile()` defaults to.

The recipe, from Lingvo's GLaM configs (`lingvo/tasks/lm/params/synthetic_packed_input.py`,
`lingvo/core/optimizer.py`) and praxis (`praxis/layers/glam.py`):

- Adafactor without momentum, update clipping 1.0, parameter-scaled steps (`GLaMAdafactor`);
- learning rate `rsqrt(max(step, 10000))`: 0.01 for 10K steps, then `1 / sqrt(step)`
  (`GLaMLearningRateSchedule`);
- every step with non-finite gradients skipped (`SkipNonFiniteSteps`);
- no weight decay, no gradient clipping.

The rest of GLaM's recipe belongs to the model and lives in `keras_glam.models`: the loss
(token cross-entropy + `1e-4` output z-loss + `0.01` load-balance loss per MoE layer,
`keras_glam.models.losses`), the precision (float32 weights with bfloat16 activations,
`keras_glam.models.architecture.MIXED_PRECISION_POLICY`; attention, routing, logits and losses
stay float32) and no dropout.
"""

import math

from keras_glam.optimizers.adafactor import GLaMAdafactor
from keras_glam.optimizers.schedules import GLaMLearningRateSchedule

PAPER_WARMUP_STEPS = 10_000

__all__ = [
    "PAPER_WARMUP_STEPS",
    "glam_learning_rate",
    "glam_optimizer",
]


def glam_learning_rate(warmup_steps=PAPER_WARMUP_STEPS, peak_learning_rate=None):
    """GLaM's schedule: `peak` for `warmup_steps` steps, then `peak * sqrt(warmup_steps / step)`.

    Args:
        warmup_steps: int > 0. Steps at the constant peak rate (GLaM: 10000).
        peak_learning_rate: float or None. The constant rate; None is GLaM's
            `1 / sqrt(warmup_steps)` (0.01 for 10000 steps).

    Returns:
        A `GLaMLearningRateSchedule`.

    Example:

    >>> schedule = glam_learning_rate(warmup_steps=100, peak_learning_rate=0.05)
    >>> [round(float(schedule(step)), 4) for step in (0, 100, 400)]
    [0.05, 0.05, 0.025]
    """
    if peak_learning_rate is None:
        peak_learning_rate = 1.0 / math.sqrt(warmup_steps)
    if not peak_learning_rate > 0:
        raise ValueError(
            f"`peak_learning_rate` must be > 0. Received: peak_learning_rate={peak_learning_rate}"
        )
    return GLaMLearningRateSchedule(
        warmup_steps=warmup_steps,
        multiplier=peak_learning_rate * math.sqrt(warmup_steps),
    )


def glam_optimizer(warmup_steps=PAPER_WARMUP_STEPS, peak_learning_rate=None, **adafactor_kwargs):
    """GLaM's optimizer: `GLaMAdafactor` on `glam_learning_rate(warmup_steps, peak)`.

    Args:
        warmup_steps: int. See `glam_learning_rate`.
        peak_learning_rate: float or None. See `glam_learning_rate`.
        **adafactor_kwargs: any other `GLaMAdafactor` argument (`beta_1`, `clip_threshold`, ...).

    Returns:
        A `GLaMAdafactor`.

    Example:

    >>> optimizer = glam_optimizer()  # exactly GLaM's: 0.01 for 10K steps, then rsqrt(step)
    >>> small_run = glam_optimizer(warmup_steps=300)  # ~0.058 for 300 steps, then decays
    """
    return GLaMAdafactor(
        learning_rate=glam_learning_rate(warmup_steps, peak_learning_rate), **adafactor_kwargs
    )
