"""Two processes on 127.0.0.1 train one GLaM as a single 8-device mesh (CPU collectives: gloo).

`tests/distributed/check_multiprocess.py` runs in each process with 4 simulated devices: the
expert axis spans both processes, each feeds its own half of every batch, and process 0 writes
a checkpoint from the gathered state; a third, single-device process restores it.
"""

import json
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent / "distributed"))
from check_runner import CHECKS  # noqa: E402
from check_runner import check_environment  # noqa: E402
from check_runner import run_check  # noqa: E402

TIMEOUT_SECONDS = 420


def _free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _train_in_two_processes(output_dir):
    port = _free_port()
    logs = [open(output_dir / f"process_{index}.log", "w") for index in range(2)]
    processes = [
        subprocess.Popen(
            [sys.executable, str(CHECKS / "check_multiprocess.py"), "train", str(index),
             str(port), str(output_dir)],
            cwd=CHECKS,
            env=check_environment(),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        for index, log in enumerate(logs)
    ]
    try:
        for process in processes:
            process.wait(timeout=TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        pass
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
        for log in logs:
            log.close()
    failed = [index for index, process in enumerate(processes) if process.returncode != 0]
    if failed:
        output = "\n".join(
            (output_dir / f"process_{index}.log").read_text()[-4000:] for index in failed
        )
        pytest.fail(f"Processes {failed} failed or timed out:\n{output}")
    return [json.loads((output_dir / f"process_{index}.json").read_text()) for index in range(2)]


@pytest.mark.slow
def test_two_processes_train_as_one_and_the_checkpoint_restores_on_one_device(tmp_path):
    first, second = _train_in_two_processes(tmp_path)

    for result in (first, second):
        assert (result["global_devices"], result["local_devices"]) == (8, 4)
        assert result["local_experts"] == 4  # expert=8 over two processes of 4 devices
    assert [first["process_id"], second["process_id"]] == [0, 1]
    # Both processes hold the same global loss, and it is the one-device loss on whole batches.
    assert first["step_losses"] == second["step_losses"]
    assert len(first["step_losses"]) == 3
    np.testing.assert_allclose(first["step_losses"], first["reference_step_losses"], rtol=1e-6)
    assert first["evaluation"] == second["evaluation"]

    restored = run_check("check_multiprocess.py", "restore", tmp_path, timeout=TIMEOUT_SECONDS)
    assert restored["state"] == {"step": 3}
    assert restored["optimizer_iterations"] == 3
    np.testing.assert_allclose(
        restored["evaluation"]["loss"], first["evaluation"]["loss"], rtol=1e-6
    )
    np.testing.assert_allclose(
        restored["evaluation"]["cross_entropy"], first["evaluation"]["cross_entropy"], rtol=1e-6
    )
