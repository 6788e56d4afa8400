"""ExpertEinsumDense: the stacked expert kernels of a mixture-of-experts layer, any quantization."""

import keras
from keras import ops

_FLOAT8_DTYPE = "float8_e4m3fn"  # Keras' float8 forward format for inputs and kernels


class ExpertEinsumDense(keras.layers.EinsumDense):
    """An `EinsumDense` whose kernel `[E, K, F]` stacks one `[K, F]` matrix per expert.

    Capacity-based dispatch calls it like any `EinsumDense` on per-expert buffers (equation
    `"egck,ekf->egcf"`). Routing without capacity multiplies blocks of rows by single experts'
    matrices instead, through `expert_matmul`, which reproduces the layer's own computation for
    one expert: float (with LoRA merged), and the quantization modes `quantization_modes` (int8
    and int4 with their activation quantizer and LoRA, per-channel or grouped int4, float8).
    `quantize` refuses the calibrated modes (`"gptq"`, `"awq"`): they fit one 2-D matrix to the
    inputs it sees, while these kernels hold `E` matrices that each see only their own tokens
    (and Keras would fold the expert axis into the rows of that one matrix).

    `MoEFeedForward` builds two of these (`expert_wi`, `expert_wo`); it is not meant to be
    created elsewhere, and its config is that of `EinsumDense`.

    Example:

    >>> import numpy as np
    >>> layer = ExpertEinsumDense("egck,ekf->egcf", output_shape=(None, None, 6))
    >>> layer.build((3, None, None, 4))
    >>> rows = np.ones((5, 4), "float32")
    >>> layer.expert_matmul()(rows, 2).shape
    (5, 6)
    """

    quantization_modes = ("int8", "int4", "float8")

    def quantize(self, mode=None, type_check=True, config=None):
        """`EinsumDense.quantize` for the modes in `quantization_modes`; others raise."""
        if mode not in self.quantization_modes:
            raise ValueError(
                f"Expert layer '{self.path}' cannot be quantized with mode={mode!r}: expert "
                f"kernels support the modes {self.quantization_modes}. GPTQ and AWQ calibrate "
                "one matrix on all tokens, while each expert sees only its own: quantize with "
                "one of those modes."
            )
        # `type_check` guards EinsumDense subclasses that change the computation; this one does
        # not, and `expert_matmul` follows every mode listed.
        super().quantize(mode, type_check=False, config=config)

    def compute_output_shape(self, input_shape):
        # `EinsumDense` reports the `None` sizes of `output_shape` even where the input's sizes
        # are known; every output axis but the last is an input axis.
        input_axes, output_axes = self.equation.split(",")[0], self.equation.split("->")[1]
        size_of_axis = dict(zip(input_axes, input_shape))
        return tuple(
            size_of_axis.get(axis) if size is None else size
            for axis, size in zip(output_axes, super().compute_output_shape(input_shape))
        )

    def expert_matmul(self):
        """A function `(rows [b, K], expert) -> [b, F]`: `rows` times the matrix of `expert`.

        `expert` is an int32 scalar (it may be traced). The result equals the layer's own call
        on those rows in that expert's buffer. The work that does not depend on the expert
        (dequantizing an int4 kernel, rounding a float8 one) is done here, once, so that a scan
        over experts calling the function only slices.
        """
        mode = self.quantization_mode
        if mode is None:
            kernel = ops.cast(self.kernel, self.compute_dtype)
            return lambda rows, expert: ops.matmul(rows, ops.take(kernel, expert, axis=0))
        if mode == "int8":
            return self._int8_expert_matmul()
        if mode == "int4":
            return self._int4_expert_matmul()
        if mode == "float8":
            return self._float8_expert_matmul()
        raise ValueError(f"Expert layer '{self.path}' has unsupported quantization mode {mode!r}.")

    def _add_lora(self, outputs, rows, expert):
        """Adds the LoRA term to a quantized product (a float kernel has LoRA merged already).

        Keras' float8 call refuses LoRA; here float8 gets the same term as int8 and int4.
        """
        if not self.lora_enabled:
            return outputs
        low_rank = ops.matmul(
            ops.matmul(rows, ops.take(self.lora_kernel_a, expert, axis=0)), self.lora_kernel_b
        )
        return ops.cast(outputs + (self.lora_alpha / self.lora_rank) * low_rank, self.compute_dtype)

    def _int8_expert_matmul(self):
        # int8 kernel `[E, K, F]` and a scale per expert and output channel; rows are quantized
        # one by one (the layer's activation quantizer reduces over K), so only the chosen
        # expert's int8 matrix is read.
        kernel = ops.convert_to_tensor(self._kernel)
        num_experts, _, out_dim = kernel.shape
        kernel_scale = ops.reshape(self.kernel_scale, (num_experts, out_dim))

        def matmul(rows, expert):
            expert_kernel = ops.take(kernel, expert, axis=0)
            scale = ops.take(kernel_scale, expert, axis=0)
            quantized_rows = rows
            if self.inputs_quantizer:
                quantized_rows, rows_scale = self.inputs_quantizer(rows, axis=-1)
                scale = rows_scale * scale
            outputs = ops.einsum("bk,kf->bf", quantized_rows, expert_kernel)
            return self._add_lora(ops.cast(outputs, self.compute_dtype) / scale, rows, expert)

        return matmul

    def _int4_expert_matmul(self):
        # Keras stores int4 kernels flattened to `[K, E * F]` (the reduced axis first) and packed
        # two per byte; the dequantized kernel is rebuilt once.
        unpacked = keras.quantizers.unpack_int4(
            self._kernel, self._int4_unpacked_column_size, axis=-1, dtype="int8"
        )
        grouped = self._int4_block_size is not None
        if grouped:
            group = ops.cast(self.g_idx, "int32")
            scale = ops.take(self.kernel_scale, group, axis=0)
            zero = ops.cast(ops.take(self.kernel_zero, group, axis=0), scale.dtype)
            kernel = ops.cast((ops.cast(unpacked, scale.dtype) - zero) * scale, self.compute_dtype)
        else:
            kernel = ops.cast(unpacked, self.compute_dtype) / self.kernel_scale
        kernel = ops.reshape(kernel, self.original_kernel_shape)
        # Grouped int4 is weight-only in Keras: it ignores an activation quantizer.
        inputs_quantizer = None if grouped else self.inputs_quantizer

        def matmul(rows, expert):
            expert_kernel = ops.take(kernel, expert, axis=0)
            if inputs_quantizer:
                quantized_rows, rows_scale = inputs_quantizer(rows, axis=-1)
                outputs = ops.matmul(ops.cast(quantized_rows, self.compute_dtype), expert_kernel)
                outputs = outputs / rows_scale
            else:
                outputs = ops.matmul(rows, expert_kernel)
            return self._add_lora(outputs, rows, expert)

        return matmul

    def _float8_expert_matmul(self):
        # Inputs and kernel are rounded to float8 with their per-tensor scales, then multiplied
        # in the compute dtype.
        kernel = ops.convert_to_tensor(self._kernel)
        kernel = keras.quantizers.quantize_and_dequantize(
            kernel, self.kernel_scale, _FLOAT8_DTYPE, self.compute_dtype
        )
        inputs_scale = ops.convert_to_tensor(self.inputs_scale)

        def matmul(rows, expert):
            rounded_rows = keras.quantizers.quantize_and_dequantize(
                rows, inputs_scale, _FLOAT8_DTYPE, self.compute_dtype
            )
            outputs = ops.matmul(rounded_rows, ops.take(kernel, expert, axis=0))
            return self._add_lora(outputs, rows, expert)

        return matmul
