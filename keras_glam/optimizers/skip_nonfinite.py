"""Skip every update whose gradients are not finite, whatever the optimizer."""

import keras
from keras import ops


def global_gradient_norm(gradients):
    """`sqrt(sum of all squared gradient entries)`, in float32; NaN or Inf if any entry is.

    Args:
        gradients: list of gradient tensors (None entries are ignored).

    Returns:
        float32 scalar.
    """
    squares = [ops.sum(ops.square(ops.cast(g, "float32"))) for g in gradients if g is not None]
    if not squares:
        return ops.zeros((), "float32")
    return ops.sqrt(ops.sum(ops.stack(squares)))


@keras.saving.register_keras_serializable(package="keras_glam")
class SkipNonFiniteSteps(keras.optimizers.Optimizer):
    """Wraps an optimizer so that a step with NaN/Inf gradients changes nothing but a counter.

    GLaM skipped every update whose gradients held a NaN or an Inf and kept the optimizer state
    (praxis `Learner` with `check_valid_step` and `enable_skip_step_on_gradient_anomalies`: the
    step is valid when the global gradient norm is finite, and below
    `skip_step_gradient_norm_value` if that is set; an invalid step keeps the old optimizer
    state). Here the check is one reduction, the global norm in float32 (a NaN or Inf anywhere
    makes it non-finite, and so does an overflow of the sum of squares), and the choice between
    the updated and the old state is an `ops.cond`, as `keras.optimizers.LossScaleOptimizer`
    does: a skipped step leaves every weight and every optimizer variable bit-identical,
    including the wrapped optimizer's `iterations`, so learning-rate schedules do not advance
    either. Skipped steps are counted in the `skipped_steps` variable.

    The wrapper composes with any Keras optimizer, also a `LossScaleOptimizer` (its loss
    scaling is forwarded through `scale_loss`).

    Args:
        inner_optimizer: the `keras.optimizers.Optimizer` that makes the updates.
        max_gradient_norm: float or None. Also skip steps whose global gradient norm exceeds
            this (praxis `skip_step_gradient_norm_value`). None (GLaM): only non-finite steps.
        name: string. Defaults to `"skip_non_finite_steps"`.

    Example:

    >>> import numpy as np
    >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    >>> model.compile(optimizer=SkipNonFiniteSteps(keras.optimizers.SGD(0.1)), loss="mse")
    >>> x = np.array([[1.0, np.nan]], "float32")
    >>> before = [w.copy() for w in model.get_weights()]
    >>> _ = model.fit(x, np.zeros((1, 1)), verbose=0)
    >>> int(model.optimizer.skipped_steps.numpy()), all(
    ...     np.array_equal(a, b) for a, b in zip(before, model.get_weights()))
    (1, True)
    """

    def __init__(self, inner_optimizer, max_gradient_norm=None, name=None, **kwargs):
        if kwargs:
            raise ValueError(
                f"SkipNonFiniteSteps takes no optimizer arguments ({', '.join(kwargs)}): set "
                "them on the wrapped optimizer."
            )
        if not isinstance(inner_optimizer, keras.optimizers.Optimizer):
            raise TypeError(
                "`inner_optimizer` must be a keras.optimizers.Optimizer instance. Received: "
                f"{type(inner_optimizer).__name__}"
            )
        if isinstance(inner_optimizer, SkipNonFiniteSteps):
            raise ValueError("The optimizer already skips non-finite steps: do not wrap it twice.")
        if max_gradient_norm is not None and not max_gradient_norm > 0:
            raise ValueError(
                f"`max_gradient_norm` must be > 0 or None. Received: {max_gradient_norm}"
            )
        super().__init__(learning_rate=0.0, name=name or "skip_non_finite_steps")
        self.inner_optimizer = inner_optimizer
        self.max_gradient_norm = max_gradient_norm

    def build(self, var_list):
        self.skipped_steps = self.add_variable(
            shape=(),
            dtype="int",
            initializer="zeros",
            aggregation="only_first_replica",
            name="skipped_steps",
        )
        self.inner_optimizer.build(var_list)
        super().build(var_list)

    @property
    def variables(self):
        return self._variables + self.inner_optimizer.variables

    def is_valid_step(self, gradients):
        """Boolean scalar: the global gradient norm is finite (and within `max_gradient_norm`)."""
        norm = global_gradient_norm(gradients)
        valid = ops.isfinite(norm)
        if self.max_gradient_norm is not None:
            valid = ops.logical_and(valid, norm <= self.max_gradient_norm)
        return valid

    def stateless_apply(self, optimizer_variables, grads, trainable_variables):
        if not self.built:
            raise ValueError(
                "SkipNonFiniteSteps must be built before `stateless_apply`: call "
                "`optimizer.build(trainable_variables)`."
            )
        own_count = len(self._variables)
        own_variables = list(optimizer_variables[:own_count])
        inner_variables = list(optimizer_variables[own_count:])
        skipped_index = next(
            i for i, variable in enumerate(self._variables) if variable is self.skipped_steps
        )

        def apply_update():
            new_trainable, new_inner = self.inner_optimizer.stateless_apply(
                inner_variables, grads, trainable_variables
            )
            return list(new_trainable), own_variables + list(new_inner)

        def skip_update():
            counted = list(own_variables)
            counted[skipped_index] = own_variables[skipped_index] + 1
            return list(trainable_variables), counted + inner_variables

        return ops.cond(self.is_valid_step(grads), apply_update, skip_update)

    def apply(self, grads, trainable_variables=None):
        if not self.built:
            if trainable_variables is None:
                raise ValueError(
                    "SkipNonFiniteSteps is not built: pass `trainable_variables` to `apply`."
                )
            with keras.name_scope(self.name, caller=self):
                self.build(list(trainable_variables))
            self.built = True
        grads = list(grads)
        if keras.backend.backend() == "jax":
            # JAX branches must be pure: run the stateless update and assign its results.
            variables = list(trainable_variables or self._trainable_variables)
            new_values, new_optimizer_values = self.stateless_apply(
                [v.value for v in self.variables], grads, [v.value for v in variables]
            )
            for variable, value in zip(variables, new_values):
                variable.assign(value)
            for variable, value in zip(self.variables, new_optimizer_values):
                variable.assign(value)
            return

        def apply_update():
            self.inner_optimizer.apply(grads, trainable_variables)

        def skip_update():
            self.skipped_steps.assign_add(1)

        ops.cond(self.is_valid_step(grads), apply_update, skip_update)

    @property
    def iterations(self):
        return self.inner_optimizer.iterations

    @property
    def learning_rate(self):
        return self.inner_optimizer.learning_rate

    @learning_rate.setter
    def learning_rate(self, learning_rate):
        self.inner_optimizer.learning_rate = learning_rate

    def scale_loss(self, loss):
        return self.inner_optimizer.scale_loss(loss)

    def finalize_variable_values(self, var_list):
        self.inner_optimizer.finalize_variable_values(var_list)

    def get_config(self):
        return {
            "name": self.name,
            "inner_optimizer": keras.saving.serialize_keras_object(self.inner_optimizer),
            "max_gradient_norm": self.max_gradient_norm,
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        inner_optimizer = keras.saving.deserialize_keras_object(
            config.pop("inner_optimizer"), custom_objects=custom_objects
        )
        return cls(inner_optimizer, **config)
