"""GLaM's optimizer recipe: Adafactor as GLaM trained with it, its schedule, non-finite skipping.

Below `keras_glam.models` (whose `compile()` defaults to `glam_optimizer()`) and
`keras_glam.training`, which both use it; it imports no other room of keras_glam.
"""

from keras_glam.optimizers.adafactor import GLAM_ATTENTION_AXIS_GROUPS
from keras_glam.optimizers.adafactor import GLaMAdafactor
from keras_glam.optimizers.recipe import PAPER_WARMUP_STEPS
from keras_glam.optimizers.recipe import glam_learning_rate
from keras_glam.optimizers.recipe import glam_optimizer
from keras_glam.optimizers.schedules import GLaMLearningRateSchedule
from keras_glam.optimizers.skip_nonfinite import SkipNonFiniteSteps
from keras_glam.optimizers.skip_nonfinite import global_gradient_norm

__all__ = [
    "GLAM_ATTENTION_AXIS_GROUPS",
    "GLaMAdafactor",
    "GLaMLearningRateSchedule",
    "PAPER_WARMUP_STEPS",
    "SkipNonFiniteSteps",
    "glam_learning_rate",
    "glam_optimizer",
    "global_gradient_norm",
]
