"""Shared fixtures: a small real Ray instance and a throw-away MLflow store per test."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    """A real local Ray instance with 2 CPUs, shared by the tests of one module."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, _node_ip_address="127.0.0.1")
    yield
    ray.shutdown()


@pytest.fixture
def tracking(tmp_path: Path) -> dict[str, Any]:
    """A tracking block pointing at a fresh sqlite MLflow store under the test's tmp folder."""
    return {
        "uri": f"sqlite:///{tmp_path / 'mlruns.db'}",
        "artifact_location": str(tmp_path / "mlartifacts"),
        "checkpoints": str(tmp_path / "checkpoints"),
    }


def small_experiment(tracking: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """A fast experiment on the offline MNIST subset, as plain data to tweak before validation."""
    data: dict[str, Any] = {
        "name": "test",
        "seed": 0,
        "rounds": 3,
        "dataset": {"name": "mnist-5k", "max_test": 500, "partition": {"scheme": "iid"}},
        "model": {"name": "mlp", "hidden": [32]},
        "algorithm": {"name": "fedsgd", "lr": 0.5},
        "clients": [
            {"group": "a", "count": 20, "batch_size": 16},
            {"group": "b", "count": 20, "batch_size": 16},
        ],
        "resources": {"chunk_size": 8},
        "tracking": tracking,
    }
    data.update(changes)
    return data


def wait_for(condition: Callable[[], Any], what: str, timeout: float = 180.0, every: float = 0.05) -> Any:
    """Poll ``condition`` until it returns something truthy; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    pytest.fail(f"timed out after {timeout:g} s waiting for {what}")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
