"""MLflow outages: a real ``mlflow server`` on 127.0.0.1 is killed while a run logs to it.

A short outage costs nothing: metrics wait in the tracker's queue and every round reaches the store
once the server is back. A long one stops the run after a checkpoint, with a ``--resume`` hint, and
the resumed run fills in every round. An address that does not answer at start is a one-line error.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from mlflow.tracking import MlflowClient

from testbed.cli import main
from testbed.engine import RoundLoop
from testbed.tracking.checkpoint import load_checkpoint
from testbed.tracking.store import Tracker
from tests.conftest import free_port, small_experiment, wait_for

pytestmark = pytest.mark.ray

DEADLINE_S = 180.0


class MlflowServer:
    """An ``mlflow server`` subprocess (in its own session, so stopping it stops all its workers)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Launch the server and wait until it answers."""
        self.launch()
        self.wait_healthy()

    def launch(self) -> None:
        """Launch the server without waiting for it."""
        command = [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{self.folder / 'srv.db'}",
            "--default-artifact-root",
            str(self.folder / "art"),
        ]
        env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
        with open(self.folder / "server.log", "ab") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )

    def wait_healthy(self) -> None:
        wait_for(self.healthy, "the MLflow server to answer /health", timeout=120, every=0.2)

    def healthy(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            pytest.fail(f"the MLflow server exited: {(self.folder / 'server.log').read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as answer:
                return bool(answer.status == 200)
        except OSError:
            return False

    def stop(self) -> None:
        """SIGKILL the server and its workers: an abrupt outage."""
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)
        self.process = None


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    running = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    try:
        running.start()
        yield running
    finally:
        running.stop()


@pytest.fixture(autouse=True)
def _quick_http_failures(monkeypatch: pytest.MonkeyPatch) -> None:
    """One HTTP attempt per call: the tracker's own back-off is what is under test."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")


def _topology(folder: Path, uri: str, rounds: int, **tracking: Any) -> dict[str, Any]:
    block = {
        "uri": uri,
        "experiment": folder.name,
        "artifact_location": str(folder / "mlartifacts"),
        "checkpoints": str(folder / "checkpoints"),
        **tracking,
    }
    data = small_experiment(block, rounds=rounds)
    data["name"] = folder.name
    return data


def _checkpoint(folder: Path) -> dict[str, Any] | None:
    files = list((folder / "checkpoints").glob("*/state.pt"))
    return load_checkpoint(files[0]) if files else None


def _round(folder: Path) -> int:
    state = _checkpoint(folder)
    return int(state["round"]) if state else 0


class BackgroundCommand:
    """``testbed.cli.main`` in a thread of this process (it reuses the test's Ray)."""

    def __init__(self, argv: list[str]) -> None:
        self.status: int | None = None
        self.out = io.StringIO()
        self.err = io.StringIO()
        self.thread = threading.Thread(target=self._target, args=(argv,), daemon=True)
        self.thread.start()

    def _target(self, argv: list[str]) -> None:
        with contextlib.redirect_stdout(self.out), contextlib.redirect_stderr(self.err):
            self.status = main(argv)

    @property
    def running(self) -> bool:
        return self.thread.is_alive()

    def finish(self) -> int:
        self.thread.join(timeout=DEADLINE_S)
        assert not self.thread.is_alive(), "the run did not finish in time"
        assert self.status is not None, self.err.getvalue()[-3000:]
        return self.status


class RoundGate:
    """Holds a run of this process right after it checkpoints round ``after``, until the test releases it.

    The outage tests stop MLflow at a known point of the run. Polling for a checkpoint and then stopping
    the server races the run: a round takes a few tens of milliseconds (0.02-0.04 s measured on a busy
    2-core machine), so a faster machine could finish more rounds before the server is down than the
    test allows for. The gate makes that point exact on any machine.
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch, after: int) -> None:
        self.reached = threading.Event()
        self.released = threading.Event()
        checkpoint = RoundLoop.checkpoint

        def checkpoint_then_wait(loop: RoundLoop, round_index: int) -> None:
            checkpoint(loop, round_index)
            if round_index + 1 == after:
                self.reached.set()
                self.released.wait(timeout=DEADLINE_S)

        monkeypatch.setattr(RoundLoop, "checkpoint", checkpoint_then_wait)

    def wait(self, command: BackgroundCommand) -> None:
        """Until the run is held at the gate (or has ended, which the test's assertions then report)."""
        wait_for(lambda: self.reached.is_set() or not command.running, "the run to reach the gate", DEADLINE_S)


def _assert_every_round_once(uri: str, run_id: str, rounds: int) -> None:
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    for name in ("test_accuracy", "accepted", "sampled", "round_seconds"):
        steps = sorted(metric.step for metric in client.get_metric_history(run_id, name))
        assert steps == list(range(1, rounds + 1)), (name, steps)
    assert {"config.yaml", "model_state_dict.pt", "summary.json"} <= {a.path for a in client.list_artifacts(run_id)}


def _held_back(state: dict[str, Any] | None) -> int:
    """Rounds before the checkpoint's own whose metrics are still queued: each is a flush MLflow refused."""
    return sum(step < state["round"] for _, step, _ in state["pending_metrics"]) if state else 0


def _run_id(folder: Path) -> str:
    ids = [path.name for path in (folder / "checkpoints").iterdir()]
    assert len(ids) == 1, ids
    return ids[0]


def test_outage_to_the_end_of_the_run_loses_nothing(
    local_ray: None, server: MlflowServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MLflow goes down once round 1 is checkpointed and is back only once the last round is done: nothing is lost."""
    rounds = 4
    file = tmp_path / "run.yaml"
    file.write_text(yaml.safe_dump(_topology(tmp_path, server.url, rounds)), encoding="utf-8")
    gate = RoundGate(monkeypatch, after=1)
    command = BackgroundCommand(["run", str(file), "--quiet"])
    try:
        gate.wait(command)
        server.stop()
        stopped_after = _round(tmp_path)
        gate.released.set()

        def last_round_done_while_down() -> bool:
            if not command.running:
                pytest.fail(f"the run ended while MLflow was down: {command.err.getvalue()[-2000:]}")
            return _round(tmp_path) == rounds

        wait_for(last_round_done_while_down, "the last round, with MLflow down", timeout=DEADLINE_S)
        assert _held_back(_checkpoint(tmp_path)) >= rounds - stopped_after - 1
        server.start()  # the run is flushing or logging its final artifacts: both wait for MLflow
    finally:
        gate.released.set()
        if server.process is None:
            server.start()
    assert command.finish() == 0, command.err.getvalue()[-3000:]
    assert stopped_after == 1
    run_id = _run_id(tmp_path)
    _assert_every_round_once(server.url, run_id, rounds)
    assert [json.loads(line)["run_id"] for line in command.out.getvalue().splitlines()] == [run_id]


def test_long_outage_stops_with_a_resume_hint_and_resume_fills_every_round(
    local_ray: None, server: MlflowServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rounds = 8
    file = tmp_path / "run.yaml"
    file.write_text(yaml.safe_dump(_topology(tmp_path, server.url, rounds, outage_s=1.0)), encoding="utf-8")
    gate = RoundGate(monkeypatch, after=1)
    command = BackgroundCommand(["run", str(file), "--quiet"])
    try:
        gate.wait(command)
        server.stop()
        gate.released.set()
        status = command.finish()
    finally:
        gate.released.set()
        if server.process is None:
            server.start()
    message = command.err.getvalue()
    assert status == 1, message[-3000:]
    assert "testbed: run stopped: MLflow at" in message and "unreachable" in message, message[-3000:]
    run_id = _run_id(tmp_path)
    assert f"--resume {run_id}" in message
    state = _checkpoint(tmp_path)
    assert state is not None and 1 <= state["round"] < rounds
    assert _held_back(state) >= 1, "the rounds logged while MLflow was down are kept in the checkpoint"
    assert MlflowClient(tracking_uri=server.url).get_run(run_id).info.status == "RUNNING"

    resumed = BackgroundCommand(["run", str(file), "--resume", run_id, "--quiet"])
    assert resumed.finish() == 0, resumed.err.getvalue()[-3000:]
    _assert_every_round_once(server.url, run_id, rounds)


def test_unreachable_tracking_uri_fails_before_training(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    address = f"http://127.0.0.1:{free_port()}"
    file = tmp_path / "run.yaml"
    file.write_text(yaml.safe_dump(_topology(tmp_path, address, 2)), encoding="utf-8")
    started = time.monotonic()
    assert main(["run", str(file), "--quiet"]) == 2
    seconds = time.monotonic() - started
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err == f"testbed: error: tracking.uri: cannot reach MLflow at '{address}': Connection refused", err
    assert "Traceback" not in err
    assert not (tmp_path / "checkpoints").exists()
    assert seconds < 30, f"{seconds:.1f} s to report an unreachable tracking server"


def test_a_queued_round_sent_twice_is_stored_once(tmp_path: Path) -> None:
    """What a resume does: the checkpoint's queue still holds a round that already reached MLflow."""
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    tracker = Tracker(uri, "dedup", str(tmp_path / "art"))
    run_id = tracker.start_run("dedup", {})
    tracker.queue(run_id, {"test_accuracy": 0.5, "accepted": 40}, step=1)
    saved = list(tracker.pending)
    tracker.flush()
    tracker.queue(run_id, {"test_accuracy": 0.75, "accepted": 38}, step=2)
    tracker.flush()
    tracker.pending = [(run, step, dict(values)) for run, step, values in saved]
    tracker.flush()
    client = MlflowClient(tracking_uri=uri)
    for name, values in (("test_accuracy", [0.5, 0.75]), ("accepted", [40, 38])):
        history = sorted(client.get_metric_history(run_id, name), key=lambda metric: metric.step)
        assert [(metric.step, metric.value) for metric in history] == list(zip((1, 2), values, strict=True))
