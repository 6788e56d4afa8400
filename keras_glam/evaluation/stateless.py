"""A model's variables as values, for calling its methods inside `jax.jit` without side effects."""

import itertools

import keras


def model_state(model):
    """`(trainable, non_trainable)` lists of the current values of `model`'s variables."""
    return (
        [variable.value for variable in model.trainable_variables],
        [variable.value for variable in model.non_trainable_variables],
    )


def stateless_scope(model, state):
    """A `keras.StatelessScope` in which `model`'s variables read the values in `state`.

    Inside a jitted function taking `state` as an argument, the model's methods
    (`call_with_cache`, `output_logits`) then trace against the arguments rather than
    capturing the weights as constants.
    """
    mapping = itertools.chain(
        zip(model.trainable_variables, state[0]),
        zip(model.non_trainable_variables, state[1]),
    )
    return keras.StatelessScope(state_mapping=mapping)
