"""Adafactor exactly as GLaM was trained with it (Lingvo's `XLAShardingAdafactor`)."""

import math
import re

import keras
from keras import ops

from keras_glam.optimizers.schedules import GLaMLearningRateSchedule


# The 2-D matrices GLaM stores for its attention projections, in KerasHub's 3-D kernels (see
# "GLaM's view of a variable" in `GLaMAdafactor`).
GLAM_ATTENTION_AXIS_GROUPS = {
    r"(.*/)?(query|key|value)/kernel": ((0,), (1, 2)),
    r"(.*/)?attention_output/kernel": ((0, 1), (2,)),
}


def _rms(x):
    return ops.sqrt(ops.mean(ops.square(x)))


def _slot_layout(variable, removed_axes=()):
    """The sharding layout of a slot that averages `variable` over `removed_axes`.

    No removed axes is a full-size slot, laid out like the variable. A factored slot keeps
    the variable's sharding on every other axis (praxis drops the reduced dimension from the
    variable's sharding spec the same way). Without an explicit layout a `ModelParallel`
    distribution would look the slot's path up in its layout map, where a key meant for the
    variable (`.*expert_wi.*`) can match a slot of a different rank.
    """
    layout = getattr(variable, "_layout", None)
    if not removed_axes and layout is not None:
        return layout
    if isinstance(layout, keras.distribution.TensorLayout):
        axes = [name for axis, name in enumerate(layout.axes) if axis not in removed_axes]
        return keras.distribution.TensorLayout(axes, layout.device_mesh)
    distribution = keras.distribution.distribution()
    if distribution is None:
        return None
    rank = len(variable.shape) - len(removed_axes)
    return keras.distribution.TensorLayout([None] * rank, distribution.device_mesh)


def _checked_axis_groups(axis_groups):
    """`axis_groups` with tuple values, or a ValueError naming the first bad entry."""
    if not isinstance(axis_groups, dict):
        raise ValueError(
            "`axis_groups` must be a dict from a variable-path regex to a tuple of axis "
            f"groups, e.g. {{r'.*/query/kernel': ((0,), (1, 2))}}. Received: {axis_groups!r}"
        )
    checked = {}
    for pattern, groups in axis_groups.items():
        try:
            re.compile(pattern)
            groups = tuple(tuple(int(axis) for axis in group) for group in groups)
        except (re.error, TypeError, ValueError) as error:
            raise ValueError(
                f"`axis_groups[{pattern!r}]`: {error}. Keys are regular expressions over "
                "variable paths, values tuples of tuples of axes."
            ) from None
        flat = [axis for group in groups for axis in group]
        if not groups or not all(groups) or flat != list(range(len(flat))):
            raise ValueError(
                f"`axis_groups[{pattern!r}]` is {groups}: the groups must be non-empty and "
                "list every axis once, in order (consecutive axes merge, like a reshape), "
                "e.g. ((0,), (1, 2)) for a [M, N, Dh] kernel seen as [M, N*Dh]."
            )
        checked[pattern] = groups
    return checked


def _axes_name(axes):
    if len(axes) == 1:
        return f"axis_{axes[0]}"
    return "axes_" + "_".join(str(axis) for axis in axes)


def _with_axes_restored(reduced, shape, removed_axes):
    """`reduced`, a mean of a `shape` tensor over `removed_axes`, with those axes back as 1s."""
    return ops.reshape(
        reduced, [1 if axis in removed_axes else size for axis, size in enumerate(shape)]
    )


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

    GLaM's view of a variable: Lingvo and praxis store GLaM's attention projections as
    matrices (`attention_combine_dims=True`): q, k and v `[M, N*Dh]`, the output `[N*Dh, M]`.
    Ours keep KerasHub's layout, `[M, N, Dh]` and `[N, Dh, M]`, so `axis_groups` tells the
    optimizer, by variable path, which consecutive axes act as one axis of the matrix GLaM
    stores (`GLAM_ATTENTION_AXIS_GROUPS`: `((0,), (1, 2))` for the query, key and value
    kernels, `((0, 1), (2,))` for `attention_output`). The statistics below are computed on
    that view by averaging over groups of axes; the weight is never reshaped, so its layout
    and sharding stay KerasHub's. Without it `glam_small_16e`'s `[256, 4, 64]` kernels would
    keep a full second moment (4 and 64 are < 128) where GLaM factors `[256, 256]`, and the
    paper's `[8192, 128, 128]` kernels would be factored over `M` and one head axis, per head.

    Factoring: on that view, the second moment is factored over the two largest axes (ties go
    to the lower axis), and only when both are at least `min_dim_size_to_factor` (Lingvo's
    `_factored_dims`, praxis's `factored_second_moment_dims`). It then keeps `R`, the mean of
    `g2` over the largest axis, and `C`, the mean over the second largest, and estimates
    `v = R * C / mean(R over the second largest axis)`. So a `[M, E]` router with `E < 128`
    and the `[N, 32]` relative-bias tables keep a full second moment; an `[E, M, H]` or
    `[E, H, M]` expert kernel (3-D in Lingvo and praxis too) is factored over `M` and `H`,
    separately for each expert (slots `[E, M]` and `[E, H]`, Lingvo's `vr` and `vc`); 1-D
    and 0-D variables are not factored. The clipping's `RMS(u)` and the parameter scale's
    `RMS(W)` are over the whole variable, which no grouping changes.
    `keras.optimizers.Adafactor` instead always factors the last two axes, caps the learning
    rate at `1 / sqrt(t)`, computes in the variable's dtype, and also keeps a full-size second
    moment for every variable (so it saves no memory).

    Differences from Lingvo, both deliberate:
    - When the factored axes are not the trailing ones (say a `[256, 128, 3]` variable: axes
      0 and 1), Lingvo normalises `R` by its mean over its *last* axis, which is then an axis
      that was not factored. Here `R` is normalised over the second largest axis, so
      `R * C / mean(R)` is the factored estimate of `v` for every shape. The two agree for
      every matrix (the grouped attention kernels included) and whenever the second largest
      axis is the last remaining axis of `R` (all of GLaM's expert and FFN kernels).
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
        axis_groups: dict from a regular expression over variable paths (`re.fullmatch`) to
            the variable's axes split into consecutive groups, each group one axis of the view
            the statistics see: `((0,), (1, 2))` views `[M, N, Dh]` as `[M, N*Dh]`. The first
            pattern that matches a variable's path and covers as many axes as the variable
            has applies; other variables are seen as they are. Defaults to `None`, meaning
            `GLAM_ATTENTION_AXIS_GROUPS`; `{}` sees every variable as it is. A subclass may
            override `variable_axis_groups` instead.
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
    >>> # A [M, N, Dh] query kernel, factored as GLaM's [M, N*Dh] matrix:
    >>> model.optimizer.factored_axes("decoder_block_0/attention/query/kernel", (256, 4, 64))
    ((0,), (1, 2))
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
        axis_groups=None,
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
        if axis_groups is None:
            axis_groups = GLAM_ATTENTION_AXIS_GROUPS
        axis_groups = _checked_axis_groups(axis_groups)
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        self.beta_1 = beta_1
        self.decay_exponent = decay_exponent
        self.clip_threshold = clip_threshold
        self.multiply_by_parameter_scale = multiply_by_parameter_scale
        self.epsilon_1 = epsilon_1
        self.epsilon_2 = epsilon_2
        self.factored = factored
        self.min_dim_size_to_factor = min_dim_size_to_factor
        self.axis_groups = axis_groups

    def factored_dims(self, shape):
        """The axes a tensor of `shape` has its second moment factored over (GLaM's rule).

        Args:
            shape: tuple of ints, the shape of a variable or of its view (`factored_axes`
                applies this rule to the view).

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

    def variable_axis_groups(self, path, shape):
        """How the statistics view a variable: its axes, in consecutive groups.

        Args:
            path: string, the variable's path (`variable.path`).
            shape: tuple of ints, the variable's shape.

        Returns:
            A tuple of tuples of axes, one per axis of the view: the groups of the first
            `axis_groups` pattern that fullmatches `path` and covers `len(shape)` axes, else
            one group per axis.
        """
        for pattern, groups in self.axis_groups.items():
            if sum(map(len, groups)) == len(shape) and re.fullmatch(pattern, path):
                return groups
        return tuple((axis,) for axis in range(len(shape)))

    def factored_axes(self, path, shape):
        """The axes a variable's second moment is factored over, on GLaM's view of it.

        Args:
            path: string, the variable's path (`variable.path`).
            shape: tuple of ints, the variable's shape.

        Returns:
            `(largest, second_largest)`: each the tuple of the variable's axes that form one
            axis of its view (`variable_axis_groups`), the two picked by `factored_dims` on
            the view's shape; or `None` when the second moment is kept whole.
        """
        groups = self.variable_axis_groups(path, shape)
        view_shape = tuple(math.prod(shape[axis] for axis in group) for group in groups)
        view_axes = self.factored_dims(view_shape)
        if view_axes is None:
            return None
        return tuple(groups[axis] for axis in view_axes)

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        self._second_moments = []
        self._factored_second_moments = []
        self._factored_axes = []
        self._momentums = []
        for variable in variables:
            if self._overwrite_variable_with_gradient(variable):
                self._second_moments.append(None)
                self._factored_second_moments.append(None)
                self._factored_axes.append(None)
                self._momentums.append(None)
                continue
            axes = self.factored_axes(variable.path, tuple(variable.shape))
            self._factored_axes.append(axes)
            if axes is None:
                self._second_moments.append(self._add_slot(variable, "second_moment"))
                self._factored_second_moments.append(None)
            else:
                self._second_moments.append(None)
                self._factored_second_moments.append(
                    tuple(
                        self._add_slot(
                            variable, f"second_moment_mean_over_{_axes_name(group)}", group
                        )
                        for group in axes
                    )
                )
            self._momentums.append(
                self._add_slot(variable, "momentum") if self.beta_1 else None
            )

    def _add_slot(self, variable, suffix, removed_axes=()):
        shape = [size for axis, size in enumerate(variable.shape) if axis not in removed_axes]
        return self.add_variable(
            shape=tuple(shape),
            initializer="zeros",
            dtype="float32",
            layout=_slot_layout(variable, removed_axes),
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
            largest_axes, second_axes = self._factored_axes[index]
            mean_over_largest, mean_over_second = factored_moments
            new_mean_over_largest = decay * mean_over_largest + (1.0 - decay) * ops.mean(
                squared_gradient, axis=largest_axes
            )
            new_mean_over_second = decay * mean_over_second + (1.0 - decay) * ops.mean(
                squared_gradient, axis=second_axes
            )
            self.assign(mean_over_largest, new_mean_over_largest)
            self.assign(mean_over_second, new_mean_over_second)
            # The largest axes are gone from `new_mean_over_largest`; later axes shift left.
            second_axes_in_mean = tuple(
                axis - sum(removed < axis for removed in largest_axes) for axis in second_axes
            )
            normaliser = ops.mean(new_mean_over_largest, axis=second_axes_in_mean, keepdims=True)
            shape = tuple(variable.shape)
            update = (
                gradient
                * _with_axes_restored(
                    ops.rsqrt(new_mean_over_largest / normaliser), shape, largest_axes
                )
                * _with_axes_restored(ops.rsqrt(new_mean_over_second), shape, second_axes)
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
                "axis_groups": dict(self.axis_groups),
            }
        )
        return config
