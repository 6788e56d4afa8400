"""Run a check script of this directory in a fresh interpreter and read its `RESULT` line."""

import json
import os
import pathlib
import subprocess
import sys

CHECKS = pathlib.Path(__file__).resolve().parent
REPOSITORY = CHECKS.parents[1]


def check_environment():
    """The test environment for a check: the repository importable, no inherited XLA flags."""
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    env["PYTHONPATH"] = os.pathsep.join(
        path for path in (str(REPOSITORY), env.get("PYTHONPATH")) if path
    )
    return env


def run_check(script, *args, timeout=420):
    """Run `script` with `args`, return its `RESULT` JSON; raise with its output on failure."""
    completed = subprocess.run(
        [sys.executable, str(CHECKS / script), *map(str, args)],
        cwd=CHECKS,
        env=check_environment(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    results = [line for line in completed.stdout.splitlines() if line.startswith("RESULT ")]
    if completed.returncode != 0 or not results:
        raise RuntimeError(
            f"{script} {' '.join(map(str, args))} exited with {completed.returncode}:\n"
            f"{completed.stdout[-2000:]}\n{completed.stderr[-6000:]}"
        )
    return json.loads(results[-1][len("RESULT ") :])
