"""`testbed ui` serves the stock MLflow UI on 127.0.0.1 for a tracking store."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import free_port

pytestmark = pytest.mark.slow


def test_ui_serves_runs_on_loopback(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("shown", artifact_location=(tmp_path / "art").as_uri())
    run = client.create_run(experiment, run_name="visible")
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "testbed", "ui", "--uri", uri, "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as answer:
                    assert answer.status == 200
                    break
            except OSError:
                assert server.poll() is None, server.stderr.read().decode() if server.stderr else ""
                assert time.monotonic() < deadline, "the UI did not answer within 90 s"
                time.sleep(0.5)
        served = MlflowClient(tracking_uri=f"http://127.0.0.1:{port}").get_run(run.info.run_id)
        assert served.info.run_name == "visible"
        listening = [c for c in _connections(server.pid) if c.status == "LISTEN" and c.laddr.port == port]
        assert listening and all(c.laddr.ip == "127.0.0.1" for c in listening)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def _connections(pid: int) -> list:  # type: ignore[type-arg]
    import psutil

    found = []
    for process in [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]:
        try:
            found.extend(process.net_connections(kind="inet"))
        except psutil.Error:
            continue
    return found
