"""End-to-end runs on a real local Ray with a real sqlite MLflow store."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from mlflow.tracking import MlflowClient

from testbed.config.topology import validate
from testbed.engine import run_experiment
from tests.conftest import small_experiment

pytestmark = pytest.mark.ray


def _run(data: dict[str, Any]) -> Any:
    return run_experiment(validate(data), show_progress=False)


def test_fedsgd_run_is_tracked_in_mlflow(local_ray: None, tracking: dict[str, Any]) -> None:
    result = _run(small_experiment(tracking, rounds=4))
    accuracies = [row["test_accuracy"] for row in result.history]
    assert accuracies[-1] > 0.5, accuracies  # ten classes: chance is 0.1
    assert accuracies[-1] > accuracies[0]

    client = MlflowClient(tracking_uri=tracking["uri"])
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["clients.a.batch_size"] == "16"
    assert run.data.params["algorithm.name"] == "fedsgd"
    # MLflow orders a metric's history by the wall-clock time it was queued: read it by step instead
    steps = sorted(m.step for m in client.get_metric_history(result.run_id, "test_accuracy"))
    assert steps == [1, 2, 3, 4]
    for name in ("test_loss", "round_seconds", "clients_per_second", "accepted"):
        assert len(client.get_metric_history(result.run_id, name)) == 4, name
    assert max(client.get_metric_history(result.run_id, "accepted"), key=lambda m: m.step).value == 40
    artifacts = {item.path for item in client.list_artifacts(result.run_id)}
    assert {"config.yaml", "model_state_dict.pt", "summary.json"} <= artifacts
    folder = Path(client.download_artifacts(result.run_id, "model_state_dict.pt"))
    state = torch.load(folder, weights_only=True)
    assert all(torch.equal(state[key], result.params[key]) for key in result.params)


def test_fedavg_improves_accuracy(local_ray: None, tracking: dict[str, Any]) -> None:
    data = small_experiment(tracking, rounds=3, algorithm={"name": "fedavg", "lr": 0.1, "local_epochs": 1})
    result = _run(data)
    accuracies = [row["test_accuracy"] for row in result.history]
    assert accuracies[-1] > 0.6, accuracies
    assert accuracies[-1] > accuracies[0]


@pytest.mark.parametrize("algorithm", [{"name": "fedsgd", "lr": 0.5}, {"name": "fedavg", "lr": 0.1, "local_steps": 3}])
def test_one_and_two_workers_give_identical_parameters(
    local_ray: None, tracking: dict[str, Any], algorithm: dict[str, Any]
) -> None:
    results = []
    for workers in (1, 2):
        data = small_experiment(tracking, rounds=2, algorithm=algorithm)
        data["resources"] = {"chunk_size": 8, "workers": workers}
        data["sampling"] = {"clients_per_round": 30}
        results.append(_run(data))
    one, two = results
    assert one.params.keys() == two.params.keys()
    for key in one.params:
        assert torch.equal(one.params[key], two.params[key]), key
    assert one.run_id != two.run_id
