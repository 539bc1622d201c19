"""Driver death and ``--resume``: a run SIGKILLed twice and resumed twice ends exactly like an uninterrupted one.

The driver runs as ``python -m testbed run`` in its own session, so killing its process group also
kills the Ray it started. Every process the driver spawned carries a marker in its environment,
which is how the test checks that nothing survives the kill.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from testbed.cli import main
from testbed.config.topology import validate
from testbed.engine import RunResult, run_experiment
from testbed.tracking.checkpoint import checkpoint_path, load_checkpoint
from tests.conftest import small_experiment, wait_for

pytestmark = pytest.mark.ray

ROUNDS = 10
MARK = "TESTBED_TEST_MARK"
DEADLINE_S = 240.0


def _marked(mark: str) -> list[int]:
    """Live processes whose environment carries ``mark``."""
    found = []
    for process in psutil.process_iter():
        try:
            if process.environ().get(MARK) == mark and process.status() != psutil.STATUS_ZOMBIE:
                found.append(process.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def _topology(folder: Path) -> dict[str, Any]:
    tracking = {
        "uri": f"sqlite:///{folder / 'mlruns.db'}",
        "artifact_location": str(folder / "mlartifacts"),
        "checkpoints": str(folder / "checkpoints"),
    }
    data = small_experiment(tracking, rounds=ROUNDS, algorithm={"name": "fedavg", "lr": 0.1, "local_epochs": 2})
    data["resources"] = {"chunk_size": 2, "num_cpus": 2}
    return data


def _checkpointed_round(folder: Path) -> int:
    files = list((folder / "checkpoints").glob("*/state.pt"))
    return int(load_checkpoint(files[0])["round"]) if files else 0


def _run_and_kill(folder: Path, args: list[str], kill_at: int) -> int:
    """Start ``testbed run ARGS`` in its own session; SIGKILL its process group once round ``kill_at`` is saved.

    Returns the round of the checkpoint the kill left behind.
    """
    mark = uuid.uuid4().hex
    env = dict(os.environ, **{MARK: mark})
    driver = subprocess.Popen(
        [sys.executable, "-m", "testbed", "run", *args, "--quiet"],
        cwd=folder,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:

        def reached() -> bool:
            if driver.poll() is not None:
                err = driver.stderr.read().decode(errors="replace")[-2000:] if driver.stderr else ""
                pytest.fail(f"the driver exited ({driver.returncode}) before round {kill_at}: {err}")
            return _checkpointed_round(folder) >= kill_at

        wait_for(reached, f"round {kill_at} to be checkpointed", timeout=DEADLINE_S)
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(timeout=30)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait(timeout=30)
        if driver.stderr is not None:
            driver.stderr.close()
    wait_for(lambda: not _marked(mark), "every process of the killed driver to be gone", timeout=30)
    return _checkpointed_round(folder)


@dataclass
class Interrupted:
    """What the twice-interrupted, twice-resumed run left behind."""

    folder: Path
    file: Path
    run_id: str
    killed_at: list[int]
    resumed_stdout: str
    reference: RunResult


@pytest.fixture(scope="module")
def interrupted(local_ray: None, tmp_path_factory: pytest.TempPathFactory) -> Interrupted:
    """Kill the driver after round >= 2, resume with FILE, kill again, resume without FILE to the end."""
    folder = tmp_path_factory.mktemp("resume")
    data = _topology(folder)
    file = folder / "run.yaml"
    file.write_text(yaml.safe_dump(data), encoding="utf-8")
    first = _run_and_kill(folder, [str(file)], kill_at=2)
    run_ids = [path.name for path in (folder / "checkpoints").iterdir()]
    assert len(run_ids) == 1
    run_id = run_ids[0]
    assert MlflowClient(tracking_uri=data["tracking"]["uri"]).get_run(run_id).info.status == "RUNNING"
    second = _run_and_kill(folder, [str(file), "--resume", run_id], kill_at=first + 1)
    assert first < second < ROUNDS, (first, second)

    out = _capture_main(["run", "--resume", run_id, "--checkpoints", str(folder / "checkpoints"), "--quiet"])
    reference_data = _topology(tmp_path_factory.mktemp("reference"))
    reference = run_experiment(validate(reference_data), show_progress=False)
    return Interrupted(folder, file, run_id, [first, second], out, reference)


def _capture_main(argv: list[str]) -> str:
    """Run the CLI in this process and return its stdout (it must succeed)."""
    import contextlib
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        status = main(argv)
    assert status == 0, buffer.getvalue()
    return buffer.getvalue()


def test_resumed_run_has_the_parameters_of_an_uninterrupted_one(interrupted: Interrupted) -> None:
    assert json.loads(interrupted.resumed_stdout)["run_id"] == interrupted.run_id
    state = load_checkpoint(checkpoint_path(interrupted.folder / "checkpoints", interrupted.run_id))
    assert state["round"] == ROUNDS
    client = MlflowClient(tracking_uri=f"sqlite:///{interrupted.folder / 'mlruns.db'}")
    final = torch.load(client.download_artifacts(interrupted.run_id, "model_state_dict.pt"), weights_only=True)
    reference = interrupted.reference.params
    assert final.keys() == reference.keys() == state["params"].keys()
    for key in reference:
        assert torch.equal(final[key], reference[key]), key
        assert torch.equal(state["params"][key], reference[key]), key


def test_resumed_run_is_one_finished_mlflow_run_with_every_round(interrupted: Interrupted) -> None:
    client = MlflowClient(tracking_uri=f"sqlite:///{interrupted.folder / 'mlruns.db'}")
    experiment = client.get_experiment_by_name("test")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    assert [run.info.run_id for run in runs] == [interrupted.run_id]
    assert runs[0].info.status == "FINISHED"
    for name in ("test_accuracy", "accepted", "round_seconds"):
        steps = [metric.step for metric in client.get_metric_history(interrupted.run_id, name)]
        assert sorted(steps) == list(range(1, ROUNDS + 1)), (name, steps)
    accuracy = {m.step: m.value for m in client.get_metric_history(interrupted.run_id, "test_accuracy")}
    expected = {row["round"]: row["test_accuracy"] for row in interrupted.reference.history}
    assert accuracy == pytest.approx(expected, abs=1e-12)


def test_resume_of_an_unknown_run_is_one_line_and_exit_2(
    interrupted: Interrupted, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoints = str(interrupted.folder / "checkpoints")
    for argv in (
        ["run", str(interrupted.file), "--resume", "0123456789abcdef", "--quiet"],
        ["run", "--resume", "0123456789abcdef", "--checkpoints", checkpoints, "--quiet"],
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        assert "--resume: no checkpoint at" in err and "0123456789abcdef" in err, err


def test_resume_with_a_changed_configuration_names_the_field(
    interrupted: Interrupted, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoints = interrupted.folder / "checkpoints"
    before = checkpoint_path(checkpoints, interrupted.run_id).read_bytes()
    for argv in (
        ["run", str(interrupted.file), "--resume", interrupted.run_id, "--set", "algorithm.lr=0.2", "--quiet"],
        ["run", "--resume", interrupted.run_id, "--checkpoints", str(checkpoints), "--set", "algorithm.lr=0.2"],
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        assert "different configuration" in err and "algorithm" in err, err
    assert checkpoint_path(checkpoints, interrupted.run_id).read_bytes() == before
