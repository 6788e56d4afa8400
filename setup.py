"""keras-glam: GLaM mixture-of-experts language models for Keras 3 and KerasHub."""

import pathlib

from setuptools import find_packages, setup

HERE = pathlib.Path(__file__).parent
version = {}
exec((HERE / "keras_glam" / "version.py").read_text(), version)

setup(
    name="keras-glam",
    version=version["__version__"],
    description="GLaM (Du et al. 2021) sparse mixture-of-experts language models for Keras 3",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    # The builtin presets live in the top-level presets/ and install as keras_glam/presets/.
    packages=find_packages(include=["keras_glam", "keras_glam.*"]) + ["keras_glam.presets"],
    package_dir={"keras_glam.presets": "presets"},
    package_data={"keras_glam.presets": ["*/*.json", "*/README.md", "*/assets/tokenizer/*"]},
    include_package_data=True,
    # Versions tested together: keras 3.15.1, keras-hub 0.32.0, jax 0.10.2, tensorflow-text
    # 2.21.1, sentencepiece 0.2.3, huggingface_hub 2.4.0 (Python 3.11, CPU).
    install_requires=[
        "keras>=3.15.1,<4",
        "keras-hub>=0.32.0,<0.33",
        # The package asked for by name; 0.32 re-exports keras-hub (tests load GLaM through it).
        "keras-nlp>=0.32.0,<0.33",
        "jax>=0.10.2,<0.11",
        "tensorflow-text>=2.21.1,<2.22",
        "sentencepiece>=0.2.3,<0.3",
        "huggingface-hub>=2.4.0,<3",
        # hub/retry.py names its transport errors; the range huggingface_hub 2.4 itself requires.
        "httpx2>=2.0,<3",
        "numpy>=1.26",
        "matplotlib>=3.8",
        "tensorboard>=2.21,<2.22",
    ],
    extras_require={
        # Evaluation through lm-evaluation-harness (pure Python, no torch).
        "eval": ["lm-eval>=0.4.13,<0.5"],
        # Parquet and Hugging Face `datasets` sources for the data pipeline.
        "data": ["pyarrow>=15", "datasets>=3"],
        "tests": ["pytest>=8", "grain>=0.2.18", "lm-eval>=0.4.13,<0.5", "pyarrow>=15",
                  "datasets>=3"],
    },
    entry_points={
        "console_scripts": [
            "glam-train=keras_glam.train:main",
            "glam-eval=keras_glam.evaluate:main",
            "glam-data=keras_glam.prepare_data:main",
            "glam-plan=keras_glam.plan:main",
        ]
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
