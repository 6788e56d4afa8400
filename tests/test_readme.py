"""The README's API tour runs as written, in a fresh process and an empty directory."""

import pathlib
import re
import subprocess
import sys

import pytest

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def api_tour():
    text = README.read_text(encoding="utf-8")
    section = text.split("## API tour", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.slow
def test_the_api_tour_runs_as_written(tmp_path):
    script = tmp_path / "tour.py"
    script.write_text(api_tour())
    completed = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                               timeout=900, cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert (tmp_path / "my_glam" / "config.json").is_file()


def test_the_readme_starts_with_the_two_commands():
    commands = re.findall(r"```bash\n(.*?)\n```", README.read_text(encoding="utf-8"), re.S)[:2]
    assert "keras_glam.train" in commands[0] and "pip install ." in commands[0]
    assert "pytest tests" in commands[1] and '".[tests]"' in commands[1]
    ci = (README.parent / ".ci" / "run").read_text(encoding="utf-8")
    assert commands[1] in ci  # CI runs exactly the README's test command
