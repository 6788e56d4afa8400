"""Adafactor exactly as GLaM was trained with it (Lingvo's `XLAShardingAdafactor`)."""

import keras
from keras import ops

from keras_glam.training.schedules import GLaMLearningRateSchedule


def _rms(x):
    return ops.sqrt(ops.mean(ops.square(x)))


def _layout_without_axis(variable, removed_axis):
    """The sharding layout of a slot that averages `variable` over `removed_axis`.

    `removed_axis=None` is a full-size slot, laid out like the variable. A factored slot keeps
    the variable's sharding on every other axis (praxis drops the reduced dimension from the
    variable's sharding spec the same way). Without an explicit layout a `ModelParallel`
    distribution would look the slot's path up in its layout map, where a key meant for the
    variable (`.*expert_wi.*`) can match a slot of a different rank.
    """
    layout = getattr(variable, "_layout", None)
    if removed_axis is None and layout is not None:
        return layout
    if isinstance(layout, keras.distribution.TensorLayout):
        axes = list(layout.axes)
        del axes[removed_axis]
        return keras.distribution.TensorLayout(axes, layout.device_mesh)
    distribution = keras.distribution.distribution()
    if distribution is None:
        return None
    rank = len(variable.shape) - (removed_axis is not None)
    return keras.distribution.TensorLayout([None] * rank, distribution.device_mesh)


@keras.saving.register_keras_serializable(package="keras_glam")
class GLaMAdafactor(keras.optimizers.Optimizer):
    """Adafactor with GLaM's settings: Lingvo's `XLAShardingAdafactor`, as GLaM trained.

    GLaM's Lingvo configs set `XLAShardingAdafactor(beta1=0, multiply_by_parameter_scale=True,
    clipping_threshold=1.0, factored=True, decay_exponent_pow=0.8)` with the default
    `epsilon1=1e-30`, `epsilon2=1e-3`, `min_dim_size_to_factor=128`
    (`lingvo/core/optimizer.py`, `lingvo/tasks/lm/params/synthetic_packed_input.py`; praxis
    `ShardedAdafactor` with `sort_factored_second_moment_dims=True` is the same update). For a
    variable `W` with gradient `g` at update `t = iterations + 1`:

    ```
    decay   = 1 - t ** -decay_exponent         # 0 at t = 1, no cap
    g2      = g ** 2 + epsilon_1
    v       = decay * v + (1 - decay) * g2     # or its factored form, below
    u       = g / sqrt(v)
    u       = u / max(1, RMS(u) / clip_threshold)
    step    = learning_rate * max(RMS(W), epsilon_2) * u    # RMS over the whole variable
    step    = beta_1 * m + (1 - beta_1) * step; m = step  # only if beta_1
    W       = W - step
    ```

    Factoring: a variable's second moment is factored over its two largest axes (ties go to
    the lower axis), and only when both are at least `min_dim_size_to_factor`. It then keeps
    `R`, the mean of `g2` over the largest axis, and `C`, the mean over the second largest, and
    estimates `v = R * C / mean(R over the second largest axis)`. So a `[M, E]` router with
    `E < 128` and the `[N, 32]` relative-bias tables keep a full second moment, a `[E, M, H]`
    expert kernel is factored over `M` and `H`, and a `[4, 8]` or 1-D or 0-D variable is not
    factored. `keras.optimizers.Adafactor` instead always factors the last two axes, caps the
    learning rate at `1 / sqrt(t)`, computes in the variable's dtype, and also keeps a
    full-size second moment for every variable (so it saves no memory).

    Differences from Lingvo, both deliberate:
    - When the factored axes are not the trailing ones (a `[8192, 128, 128]` attention kernel:
      axes 0 and 1), Lingvo normalises `R` by its mean over its *last* axis, which is then an
      axis that was not factored. Here `R` is normalised over the second largest axis, so
      `R * C / mean(R)` is the factored estimate of `v` for every shape. The two agree for
      every 2-D variable and whenever the second largest axis is the last remaining axis of `R`
      (all of GLaM's expert and FFN kernels). GLaM's own attention weights were 2-D
      (`attention_combine_dims=True`), so Lingvo never hit the difference.
    - Slots and arithmetic are float32 whatever the variable dtype (as praxis does), so
      mixed-precision and bfloat16 variables are updated from float32 statistics.

    Learning rate: with the defaults the effective step size is
    `GLaMLearningRateSchedule()(iterations) * max(RMS(W), 1e-3)`: Lingvo's base rate of 1.0
    times `SqrtDecay(warmup_steps=10000)`.

    Args:
        learning_rate: a float, a `keras.optimizers.schedules.LearningRateSchedule`, or a
            callable. Defaults to `None`, meaning `GLaMLearningRateSchedule()` (0.01 for 10K
            steps, then `1 / sqrt(step)`).
        beta_1: float in [0, 1), or `None`. Momentum on the scaled update (Lingvo `beta1`).
            `None` or 0 keeps no first moment (GLaM). Defaults to `None`.
        decay_exponent: float in (0, 1]. The second-moment decay is `1 - t ** -decay_exponent`
            (Lingvo `decay_exponent_pow`). Defaults to 0.8.
        clip_threshold: float > 0, or `None` to disable. The update is scaled down so that its
            RMS is at most this (Lingvo `clipping_threshold`). Defaults to 1.0.
        multiply_by_parameter_scale: bool. Scale each step by `max(RMS(W), epsilon_2)`, making
            the learning rate relative to the size of the weights. Defaults to `True`.
        epsilon_1: float >= 0. Added to the squared gradient. Defaults to 1e-30.
        epsilon_2: float >= 0. Floor of the parameter scale, so that zero-initialised weights
            can move. Defaults to 1e-3.
        factored: bool. Whether to factor second moments at all. Defaults to `True`.
        min_dim_size_to_factor: int >= 1. Both factored axes must be at least this long.
            Defaults to 128.
        name: string. Defaults to `"glam_adafactor"`.
        **kwargs: the arguments of every `keras.optimizers.Optimizer`: `weight_decay`
            (decoupled; `None`, i.e. none, as in GLaM), `clipnorm`, `clipvalue`,
            `global_clipnorm` (GLaM used none), `use_ema`, `ema_momentum`,
            `ema_overwrite_frequency`, `loss_scale_factor`, `gradient_accumulation_steps`.

    Example:

    >>> import numpy as np
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    >>> model.compile(optimizer=GLaMAdafactor(), loss="mse")
    >>> history = model.fit(np.ones((8, 4)), np.zeros((8, 2)), epochs=1, verbose=0)
    >>> model.optimizer.factored_dims((2048, 64)) is None  # a router: not factored
    True
    >>> model.optimizer.factored_dims((64, 2048, 8192))  # an expert kernel: axes H and M
    (2, 1)
    """

    def __init__(
        self,
        learning_rate=None,
        beta_1=None,
        decay_exponent=0.8,
        clip_threshold=1.0,
        multiply_by_parameter_scale=True,
        epsilon_1=1e-30,
        epsilon_2=1e-3,
        factored=True,
        min_dim_size_to_factor=128,
        name="glam_adafactor",
        **kwargs,
    ):
        if learning_rate is None:
            learning_rate = GLaMLearningRateSchedule()
        elif isinstance(learning_rate, int):
            learning_rate = float(learning_rate)
        if beta_1 is not None and not 0 <= beta_1 < 1:
            raise ValueError(f"`beta_1` must be None or in [0, 1). Received: beta_1={beta_1}")
        if not 0 < decay_exponent <= 1:
            raise ValueError(
                "`decay_exponent` must be in (0, 1]: the second-moment decay is "
                f"1 - t**-decay_exponent. Received: decay_exponent={decay_exponent}"
            )
        if clip_threshold is not None and not clip_threshold > 0:
            raise ValueError(
                "`clip_threshold` must be > 0, or None to disable update clipping. "
                f"Received: clip_threshold={clip_threshold}"
            )
        if epsilon_1 < 0 or epsilon_2 < 0:
            raise ValueError(
                "`epsilon_1` and `epsilon_2` must be >= 0. "
                f"Received: epsilon_1={epsilon_1}, epsilon_2={epsilon_2}"
            )
        if not (isinstance(min_dim_size_to_factor, int) and min_dim_size_to_factor >= 1):
            raise ValueError(
                "`min_dim_size_to_factor` must be an integer >= 1. "
                f"Received: min_dim_size_to_factor={min_dim_size_to_factor}"
            )
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        self.beta_1 = beta_1
        self.decay_exponent = decay_exponent
        self.clip_threshold = clip_threshold
        self.multiply_by_parameter_scale = multiply_by_parameter_scale
        self.epsilon_1 = epsilon_1
        self.epsilon_2 = epsilon_2
        self.factored = factored
        self.min_dim_size_to_factor = min_dim_size_to_factor

    def factored_dims(self, shape):
        """The axes a variable of `shape` has its second moment factored over.

        Args:
            shape: tuple of ints, the variable's shape.

        Returns:
            `(largest_axis, second_largest_axis)`, or `None` when the second moment is kept
            whole (fewer than two axes, `factored=False`, or the second largest axis shorter
            than `min_dim_size_to_factor`). Ties between equal sizes go to the lower axis.
        """
        if not self.factored or len(shape) < 2:
            return None
        largest, second = sorted(range(len(shape)), key=lambda axis: -shape[axis])[:2]
        if shape[second] < self.min_dim_size_to_factor:
            return None
        return largest, second

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        self._second_moments = []
        self._factored_second_moments = []
        self._momentums = []
        for variable in variables:
            if self._overwrite_variable_with_gradient(variable):
                self._second_moments.append(None)
                self._factored_second_moments.append(None)
                self._momentums.append(None)
                continue
            axes = self.factored_dims(variable.shape)
            if axes is None:
                self._second_moments.append(self._add_slot(variable, "second_moment"))
                self._factored_second_moments.append(None)
            else:
                self._second_moments.append(None)
                self._factored_second_moments.append(
                    tuple(
                        self._add_slot(variable, f"second_moment_mean_over_axis_{axis}", axis)
                        for axis in axes
                    )
                )
            self._momentums.append(
                self._add_slot(variable, "momentum") if self.beta_1 else None
            )

    def _add_slot(self, variable, suffix, removed_axis=None):
        shape = list(variable.shape)
        if removed_axis is not None:
            del shape[removed_axis]
        return self.add_variable(
            shape=tuple(shape),
            initializer="zeros",
            dtype="float32",
            layout=_layout_without_axis(variable, removed_axis),
            name=f"{variable.path.replace('/', '_')}_{suffix}",
        )

    def update_step(self, gradient, variable, learning_rate):
        index = self._get_variable_index(variable)
        gradient = ops.cast(gradient, "float32")
        step_number = ops.cast(self.iterations + 1, "float32")
        decay = 1.0 - ops.power(step_number, -float(self.decay_exponent))
        squared_gradient = ops.square(gradient) + self.epsilon_1

        factored_moments = self._factored_second_moments[index]
        if factored_moments is None:
            second_moment = self._second_moments[index]
            new_second_moment = decay * second_moment + (1.0 - decay) * squared_gradient
            self.assign(second_moment, new_second_moment)
            update = gradient * ops.rsqrt(new_second_moment)
        else:
            largest_axis, second_axis = self.factored_dims(variable.shape)
            mean_over_largest, mean_over_second = factored_moments
            new_mean_over_largest = decay * mean_over_largest + (1.0 - decay) * ops.mean(
                squared_gradient, axis=largest_axis
            )
            new_mean_over_second = decay * mean_over_second + (1.0 - decay) * ops.mean(
                squared_gradient, axis=second_axis
            )
            self.assign(mean_over_largest, new_mean_over_largest)
            self.assign(mean_over_second, new_mean_over_second)
            # The largest axis is gone from `new_mean_over_largest`; later axes shift left.
            second_axis_in_mean = second_axis - int(second_axis > largest_axis)
            normaliser = ops.mean(new_mean_over_largest, axis=second_axis_in_mean, keepdims=True)
            update = (
                gradient
                * ops.expand_dims(ops.rsqrt(new_mean_over_largest / normaliser), largest_axis)
                * ops.expand_dims(ops.rsqrt(new_mean_over_second), second_axis)
            )

        if self.clip_threshold is not None:
            update = update / ops.maximum(1.0, _rms(update) / self.clip_threshold)

        step_size = ops.cast(learning_rate, "float32")
        if self.multiply_by_parameter_scale:
            step_size = step_size * ops.maximum(
                _rms(ops.cast(variable, "float32")), self.epsilon_2
            )
        step = step_size * update

        momentum = self._momentums[index]
        if momentum is not None:
            step = self.beta_1 * momentum + (1.0 - self.beta_1) * step
            self.assign(momentum, step)
        self.assign_sub(variable, ops.cast(step, variable.dtype))

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "beta_1": self.beta_1,
                "decay_exponent": self.decay_exponent,
                "clip_threshold": self.clip_threshold,
                "multiply_by_parameter_scale": self.multiply_by_parameter_scale,
                "epsilon_1": self.epsilon_1,
                "epsilon_2": self.epsilon_2,
                "factored": self.factored,
                "min_dim_size_to_factor": self.min_dim_size_to_factor,
            }
        )
        return config
