"""keras_glam: GLaM, Google's mixture-of-experts language model, for Keras 3 and KerasHub."""

import os
import sys

# GLaM's sparse dispatch and expert sharding are written for JAX (keras.distribution is JAX-only
# in Keras 3.15). Choose it when the user has not chosen a backend and keras is not yet loaded.
if "keras" not in sys.modules:
    os.environ.setdefault("KERAS_BACKEND", "jax")

from keras_glam import layers  # noqa: E402
from keras_glam.models import GLaMBackbone  # noqa: E402
from keras_glam.models import GLaMCausalLM  # noqa: E402
from keras_glam.models import GLaMCausalLMPreprocessor  # noqa: E402
from keras_glam.models import GLaMTokenizer  # noqa: E402
from keras_glam.models import count_params  # noqa: E402
from keras_glam.version import __version__  # noqa: E402

__all__ = [
    "GLaMBackbone",
    "GLaMCausalLM",
    "GLaMCausalLMPreprocessor",
    "GLaMTokenizer",
    "count_params",
    "layers",
    "__version__",
]
