"""Runs on a real two-node Ray cluster, and clean-up of the Ray a run starts itself."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml

from testbed.config.topology import validate
from testbed.engine import run_experiment
from tests.conftest import small_experiment

pytestmark = pytest.mark.ray


@pytest.fixture
def two_node_cluster() -> Iterator[Any]:
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    yield cluster
    if ray.is_initialized():
        ray.shutdown()
    cluster.shutdown()


def test_client_work_runs_on_both_nodes(two_node_cluster: Any, tracking: dict[str, Any]) -> None:
    data = small_experiment(tracking, rounds=2)
    data["resources"] = {"address": two_node_cluster.address, "workers": 2, "chunk_size": 4}
    result = run_experiment(validate(data), show_progress=False)
    assert len(result.worker_nodes) == 2
    assert len(set(result.worker_nodes)) == 2, result.worker_nodes
    assert result.history[-1]["accepted"] == 40
    assert result.final_accuracy > 0.3


def _marked(marker: str) -> list[int]:
    """Processes whose environment carries ``marker`` (a run's Ray inherits its driver's environment)."""
    found = []
    for process in psutil.process_iter():
        try:
            if process.environ().get("TESTBED_TEST_MARKER") == marker:
                found.append(process.pid)
        except psutil.Error:
            continue
    return found


def test_cli_run_shuts_down_the_ray_it_started(tmp_path: Path, tracking: dict[str, Any]) -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
    marker = uuid.uuid4().hex
    probe = subprocess.Popen(["sleep", "30"], env={**os.environ, "TESTBED_TEST_MARKER": marker})
    try:
        deadline = time.monotonic() + 10  # the child shows the marker once it has exec'd
        while _marked(marker) != [probe.pid] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _marked(marker) == [probe.pid]  # the marker is visible in a child's environment
    finally:
        probe.kill()
        probe.wait()
    data = small_experiment(tracking, rounds=1)
    data["resources"] = {"num_cpus": 2, "chunk_size": 8}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    done = subprocess.run(
        [sys.executable, "-m", "testbed", "run", str(path), "--quiet"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env={**os.environ, "TESTBED_TEST_MARKER": marker},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert '"run_id"' in done.stdout
    assert _marked(marker) == []  # the driver, its raylet, GCS and workers are all gone


def test_a_cluster_that_refuses_our_token_is_one_line(tmp_path: Path, tracking: dict[str, Any]) -> None:
    """A head started with ``ray start`` and token authentication; a driver holding another token."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    marker = uuid.uuid4().hex  # the head's processes carry it, so only they are stopped afterwards
    head_env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": uuid.uuid4().hex + marker}
    head_env["TESTBED_TEST_MARKER"] = marker
    ray_cli = str(Path(sys.executable).with_name("ray"))
    head = [ray_cli, "start", "--head", f"--port={port}", "--num-cpus=1", "--include-dashboard=false"]
    temp = tempfile.mkdtemp(prefix="tb-", dir="/tmp")  # Ray's socket paths must stay under 108 bytes
    head += [f"--temp-dir={temp}", "--node-ip-address=127.0.0.1", "--disable-usage-stats"]
    started = subprocess.run(head, capture_output=True, text=True, timeout=120, env=head_env)
    assert started.returncode == 0, started.stderr[-2000:]
    try:
        data = small_experiment(tracking, rounds=1)
        data["resources"] = {"address": f"127.0.0.1:{port}"}
        path = tmp_path / "run.yaml"
        path.write_text(yaml.safe_dump(data), encoding="utf-8")
        wrong = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "f" * 64}
        done = subprocess.run(
            [sys.executable, "-m", "testbed", "run", str(path), "--quiet"],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=tmp_path,
            env=wrong,
        )
        assert done.returncode == 2, done.stderr[-2000:]
        lines = [line for line in done.stderr.splitlines() if line.startswith("testbed:")]
        assert lines == [line for line in done.stderr.splitlines() if line.strip() and "gcs_client" not in line]
        assert len(lines) == 1 and "refused this machine's authentication token" in lines[0], done.stderr[-2000:]
        assert "RAY_AUTH_MODE=token" in lines[0] and "~/.ray/auth_token" in lines[0]
    finally:
        for pid in _marked(marker):
            with contextlib.suppress(psutil.Error):
                psutil.Process(pid).kill()
        shutil.rmtree(temp, ignore_errors=True)
