"""GLaM's learning-rate schedule: constant during warm-up, then inverse square root."""

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="keras_glam")
class GLaMLearningRateSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """`multiplier * rsqrt(max(step - offset, warmup_steps))`, Lingvo's `SqrtDecay`.

    GLaM trained with `SqrtDecay(warmup_steps=10000, multiplier=1.0)` and a base learning rate
    of 1.0 (Lingvo `lingvo/core/schedule.py` `SqrtDecay`, used by
    `lingvo/tasks/lm/params/synthetic_packed_input.py`): the rate is 0.01 until step 10000 and
    `1 / sqrt(step)` afterwards. There is no ramp: "warm-up" here means "held constant".

    Steps count from 0, as in Lingvo (its global step is 0 during the first update) and in
    Keras (an optimizer evaluates its schedule at `optimizer.iterations`, 0 for the first
    update). So the first `warmup_steps + 1` updates (steps 0 to `warmup_steps`) all use
    `multiplier / sqrt(warmup_steps)`.

    Args:
        warmup_steps: int > 0. The rate stays at `multiplier / sqrt(warmup_steps)` until this
            step. Defaults to 10000.
        multiplier: float. Scales the whole schedule. Defaults to 1.0.
        offset: int. Subtracted from the step before the schedule is evaluated (Lingvo's
            `offset`), for example to restart the decay from a later step. Defaults to 0.

    Example:

    >>> schedule = GLaMLearningRateSchedule()
    >>> [round(float(schedule(step)), 6) for step in (0, 10000, 40000)]
    [0.01, 0.01, 0.005]
    """

    def __init__(self, warmup_steps=10000, multiplier=1.0, offset=0):
        if not warmup_steps > 0:
            raise ValueError(
                "`warmup_steps` must be > 0, otherwise the rate at step 0 is "
                f"1/sqrt(0) = inf. Received: warmup_steps={warmup_steps}"
            )
        self.warmup_steps = warmup_steps
        self.multiplier = multiplier
        self.offset = offset

    def __call__(self, step):
        step = ops.cast(step, "float32") - float(self.offset)
        return float(self.multiplier) * ops.rsqrt(ops.maximum(step, float(self.warmup_steps)))

    def get_config(self):
        return {
            "warmup_steps": self.warmup_steps,
            "multiplier": self.multiplier,
            "offset": self.offset,
        }
