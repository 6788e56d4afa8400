"""The examples run as a user runs them (a fresh Python process each), on tiny settings."""

import os
import pathlib
import re
import subprocess
import sys

import pytest
from hub_server import USER

ROOT = pathlib.Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def run_example(name, *arguments, timeout=600):
    environment = {**os.environ, "KERAS_BACKEND": "jax", "TF_CPP_MIN_LOG_LEVEL": "3"}
    completed = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *arguments],
        capture_output=True, text=True, timeout=timeout, env=environment, cwd=ROOT,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return completed.stdout


@pytest.mark.slow
def test_generate_from_a_saved_preset(tmp_path):
    """Save a tiny model, then generate from its directory: the prompt starts every text."""
    import keras_glam

    keras_glam.GLaMCausalLM.from_preset("glam_tiny_8e").save_to_preset(tmp_path / "preset")
    output = run_example("generate_from_preset.py", "--preset", str(tmp_path / "preset"),
                         "--prompt", "The ", "def ", "--max-length", "12")
    texts = re.findall(r"--- '(.*?)'\n(.*)", output)
    assert [prompt for prompt, _ in texts] == ["The ", "def "]
    assert all(text.startswith(prompt.strip()) for prompt, text in texts)


@pytest.mark.slow
def test_fit_on_tf_data_lowers_held_out_loss():
    output = run_example("fit_tf_data.py", "--preset", "glam_tiny_8e", "--steps", "40",
                         "--batch-size", "4", "--sequence-length", "32")
    before, after = map(float, re.search(r"([\d.]+) before, ([\d.]+) after", output).groups())
    assert after < before - 0.5, output


@pytest.mark.slow
def test_share_on_the_hub_and_load_back(hub_server):
    """Publishes to the project's local Hub server and loads it back through hf://."""
    output = run_example("share_on_hub.py", "--repo", f"hf://{USER}/shared-tiny",
                         "--preset", "glam_tiny_8e")
    assert "largest logit difference 0" in output
    files = hub_server.files(f"{USER}/shared-tiny")
    assert {"config.json", "model.weights.h5", "README.md"} <= set(files)


@pytest.mark.slow
def test_quickstart_notebook_runs_in_order(tmp_path, hub_server):
    """Every code cell, top to bottom, on tiny settings; the notebook is kept without outputs."""
    import json

    notebook = json.loads((EXAMPLES / "quickstart.ipynb").read_text())
    code = [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]
    assert all(not cell["outputs"] and cell["execution_count"] is None for cell in code)
    sources = ["".join(cell["source"]) for cell in code]
    assert sources[0].startswith("PRESET = ")  # the settings cell, replaced by tiny ones
    sources[0] = 'PRESET = "glam_tiny_8e"\nSTEPS = 5\nSEQUENCE_LENGTH = 32\nBATCH_SIZE = 4'
    script = tmp_path / "quickstart.py"
    script.write_text("\n\n".join(sources))
    environment = {**os.environ, "GLAM_QUICKSTART_REPO": f"hf://{USER}/quickstart"}
    completed = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                               timeout=600, env=environment, cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr[-3000:]
    lines = completed.stdout.splitlines()
    assert "GLaMCausalLM 0.0" in lines
    assert f"hf://{USER}/quickstart 0.0" in lines
    assert "config.json" in hub_server.files(f"{USER}/quickstart")
