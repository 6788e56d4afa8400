"""Every layer on symbolic inputs: `layer(KerasTensor)` and `compute_output_spec` (also before
`build`) give the shapes and dtypes of the eager call, with unknown sizes where they are allowed
and under `mixed_bfloat16`."""

import keras
import numpy as np
import pytest

from keras_glam.layers import (
    GatedGeluFeedForward,
    GLaMAttention,
    GLaMDecoderBlock,
    MoEFeedForward,
    RelativeBias,
    RMSNorm,
)
from keras_glam.layers.expert_einsum_dense import ExpertEinsumDense
from keras_glam.layers.routing import TopKRouter

# Batch, length and cache length may be unknown; their sizes differ from every other size.
BATCH, LENGTH, CACHE_LENGTH, MODEL_DIM, HEADS, HEAD_DIM = 3, 5, 7, 16, 2, 8


class TensorSpec:
    """A call argument: a shape and dtype, made concrete (eager) or symbolic."""

    def __init__(self, shape, dtype="float32", unknown=()):
        self.shape, self.dtype, self.unknown = shape, dtype, unknown

    def concrete(self):
        if self.dtype == "bool":
            return np.ones(self.shape, bool)
        if self.dtype == "int32":
            return np.full(self.shape, 2, "int32")
        return np.random.default_rng(0).normal(size=self.shape).astype(self.dtype)

    def symbolic(self, with_unknown_sizes, float_dtype="float32"):
        shape = tuple(
            None if with_unknown_sizes and axis in self.unknown else size
            for axis, size in enumerate(self.shape)
        )
        return keras.KerasTensor(shape, float_dtype if self.dtype == "float32" else self.dtype)


def _hidden():
    return TensorSpec((BATCH, LENGTH, MODEL_DIM), unknown=(0, 1))


def _mask():
    return TensorSpec((BATCH, LENGTH, LENGTH), "bool", unknown=(0, 1, 2))


def _cache():
    return (TensorSpec((BATCH, HEADS, CACHE_LENGTH, HEAD_DIM), unknown=(0,)),) * 2


def _decoding_mask():
    return TensorSpec((BATCH, LENGTH, CACHE_LENGTH), "bool", unknown=(0,))


# (id, layer factory, positional arguments, keyword arguments); `TensorSpec`s become inputs.
CASES = [
    ("rms_norm", lambda: RMSNorm(), (_hidden(),), {}),
    ("gated_gelu", lambda: GatedGeluFeedForward(32), (_hidden(),), {}),
    ("attention", lambda: GLaMAttention(HEADS, HEAD_DIM), (_hidden(),), {}),
    (
        "attention_masked",
        lambda: GLaMAttention(HEADS, HEAD_DIM),
        (_hidden(),),
        {"attention_mask": _mask()},
    ),
    (
        "attention_cached",
        lambda: GLaMAttention(HEADS, HEAD_DIM),
        (TensorSpec((BATCH, LENGTH, MODEL_DIM), unknown=(0,)),),
        {"attention_mask": _decoding_mask(), "cache": _cache(), "cache_update_index": 2},
    ),
    ("relative_bias", lambda: RelativeBias(HEADS), (LENGTH, CACHE_LENGTH), {}),
    (
        "relative_bias_offset",
        lambda: RelativeBias(HEADS),
        (1, CACHE_LENGTH),
        {"query_offset": TensorSpec((), "int32")},
    ),
    ("router", lambda: TopKRouter(4), (_hidden(),), {}),
    (
        "router_capacity",
        lambda: TopKRouter(4),
        (_hidden(),),
        {"capacity": 4, "padding_mask": TensorSpec((BATCH, LENGTH), unknown=(0, 1))},
    ),
    ("moe", lambda: MoEFeedForward(4, 32), (_hidden(),), {}),
    (
        "moe_training",
        lambda: MoEFeedForward(4, 32),
        (_hidden(),),
        {"training": True, "padding_mask": TensorSpec((BATCH, LENGTH), unknown=(0, 1))},
    ),
    (
        "expert_einsum_dense",
        lambda: ExpertEinsumDense("egck,ekf->egcf", output_shape=(None, None, 32)),
        (TensorSpec((4, 1, BATCH, MODEL_DIM), unknown=(1, 2)),),
        {},
    ),
    (
        "dense_block",
        lambda: GLaMDecoderBlock(HEADS, HEAD_DIM, 32),
        (_hidden(),),
        {"attention_mask": _mask()},
    ),
    (
        "moe_block",
        lambda: GLaMDecoderBlock(HEADS, HEAD_DIM, 32, num_experts=4),
        (_hidden(),),
        {"attention_mask": _mask(), "padding_mask": TensorSpec((BATCH, LENGTH), unknown=(0, 1))},
    ),
    (
        "moe_block_cached",
        lambda: GLaMDecoderBlock(HEADS, HEAD_DIM, 32, num_experts=4),
        (TensorSpec((BATCH, LENGTH, MODEL_DIM), unknown=(0,)),),
        {"attention_mask": _decoding_mask(), "cache": _cache(), "cache_update_index": 2},
    ),
]


def _arguments(args, kwargs, make):
    return keras.tree.map_structure(
        lambda value: make(value) if isinstance(value, TensorSpec) else value, (args, kwargs)
    )


def _specs(outputs, unknown_sizes=()):
    """`"shape dtype"` of every output tensor, with the sizes in `unknown_sizes` as None."""

    def spec(tensor):
        shape = tuple(None if size in unknown_sizes else size for size in tensor.shape)
        return f"{shape} {keras.backend.standardize_dtype(tensor.dtype)}"

    return keras.tree.map_structure(spec, outputs)


def _unknown_sizes(args, kwargs):
    """The sizes the symbolic inputs leave unknown (3, 5 and 7: no other size equals them)."""
    tensors = [value for value in keras.tree.flatten((args, kwargs)) if isinstance(value, TensorSpec)]
    return {tensor.shape[axis] for tensor in tensors for axis in tensor.unknown}


@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16"])
@pytest.mark.parametrize("case", CASES, ids=[case[0] for case in CASES])
def test_symbolic_call_and_output_spec_match_the_eager_call(case, policy):
    _, make_layer, args, kwargs = case
    keras.config.set_dtype_policy(policy)
    eager_args, eager_kwargs = _arguments(args, kwargs, TensorSpec.concrete)
    eager_outputs = make_layer()(*eager_args, **eager_kwargs)
    for with_unknown_sizes in (False, True):
        unknown = _unknown_sizes(args, kwargs) if with_unknown_sizes else ()
        expected = _specs(eager_outputs, unknown)
        symbolic_args, symbolic_kwargs = _arguments(
            args, kwargs, lambda tensor: tensor.symbolic(with_unknown_sizes)
        )
        called = _specs(make_layer()(*symbolic_args, **symbolic_kwargs))
        assert called == expected, ("layer(KerasTensor)", with_unknown_sizes)
        # `compute_output_spec` describes `call`, whose float inputs `__call__` has cast to
        # the layer's compute dtype.
        layer = make_layer()
        spec_args, spec_kwargs = _arguments(
            args, kwargs, lambda tensor: tensor.symbolic(with_unknown_sizes, layer.compute_dtype)
        )
        unbuilt = layer.compute_output_spec(*spec_args, **spec_kwargs)
        assert _specs(unbuilt) == expected, ("compute_output_spec", with_unknown_sizes)
