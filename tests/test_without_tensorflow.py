"""The model must import and run where only JAX is installed (TF is for data and tokenizing)."""

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import sys

    class NoTensorFlow:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("tensorflow", "tensorflow_text"):
                raise ImportError(f"{name} is blocked in this test")

    sys.meta_path.insert(0, NoTensorFlow())
    import numpy as np
    import keras_glam

    backbone = keras_glam.GLaMBackbone(
        vocabulary_size=50, num_layers=2, hidden_dim=16, intermediate_dim=32,
        num_heads=2, head_dim=8, num_experts=4)
    lm = keras_glam.GLaMCausalLM(backbone)
    lm.compile(sampler="greedy")
    ids = np.array([[3, 4, 0, 0, 0, 0]], "int32")
    out = lm.generate({"token_ids": ids, "padding_mask": ids != 0}, stop_token_ids=None)

    # Without TensorFlow, keras-hub feeds arrays through grain (a test dependency).
    history = lm.fit(
        {"token_ids": ids, "padding_mask": np.ones_like(ids)}, ids, epochs=1, verbose=0
    )
    assert np.isfinite(history.history["loss"][-1])
    assert not any(m.startswith("tensorflow") for m in sys.modules), "tensorflow was imported"
    print("generated", np.asarray(out["token_ids"]).tolist())
    """
)


def test_model_imports_and_runs_without_tensorflow():
    env = {**os.environ, "KERAS_BACKEND": "jax"}
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "generated [[3, 4," in result.stdout
