"""The curious aggregator on a real local Ray: audits, leakage metrics, grids and CSV in MLflow."""

from __future__ import annotations

import csv
import io
from typing import Any

import pytest
from mlflow.tracking import MlflowClient

from testbed.engine import run_experiment
from testbed.topology import load_experiment
from tests.conftest import REPO

pytestmark = pytest.mark.ray


def test_attack_demo_logs_leakage(local_ray: None, tracking: dict[str, Any]) -> None:
    # two attack actors: each round's audits come back in two parts and must be logged once, complete
    overrides = [f"tracking.{key}={value}" for key, value in tracking.items()] + [
        "rounds=2",
        "resources.attack.workers=2",
        "resources.attack.num_cpus=0",
    ]
    experiment = load_experiment(REPO / "topologies" / "attack-demo.yaml", overrides)
    result = run_experiment(experiment, show_progress=False)
    client = MlflowClient(tracking_uri=tracking["uri"])
    metrics = client.get_run(result.run_id).data.metrics
    # distinct labels: ce-demix separates every image; identical labels: only mixtures come out
    assert metrics["leakage/distinct/recovered_fraction"] >= 0.9, metrics
    assert metrics["leakage/identical/recovered_fraction"] <= 0.3, metrics
    assert metrics["leakage/distinct/avd_mean"] < metrics["leakage/identical/avd_mean"]
    assert metrics["leakage/distinct/label_accuracy"] == 1.0
    assert metrics["audit/skipped_clients"] == 0.0  # the default backlog policy waits, so nothing is skipped
    history = client.get_metric_history(result.run_id, "leakage/root/avd_mean")
    assert sorted(point.step for point in history) == [1, 2]
    artifacts = {item.path for item in client.list_artifacts(result.run_id, "audits")}
    assert {"audits/round_0001.png", "audits/round_0002.png", "audits/samples.csv"} <= artifacts
    text = open(client.download_artifacts(result.run_id, "audits/samples.csv"), encoding="utf-8").read()
    rows = list(csv.DictReader(io.StringIO(text)))
    assert len(rows) == 2 * 8 * 4  # rounds x audited clients x batch size
    assert {row["group"] for row in rows} == {"distinct", "identical"}
