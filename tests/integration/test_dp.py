"""A DP-SGD run end to end on a real local Ray with a real sqlite MLflow store: epsilon per round, training."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from mlflow.tracking import MlflowClient

from testbed.config.topology import validate
from testbed.engine import run_experiment
from testbed.runtime.preparation import prepare_data
from testbed.runtime.scheduling import group_bounds
from tests.conftest import small_experiment

pytestmark = pytest.mark.ray

GROUPS = {
    "rdp": {"clip": 1.0, "noise_multiplier": 0.8, "delta": 1e-5, "accountant": "rdp"},
    "prv": {"clip": 1.0, "noise_multiplier": 1.2, "delta": 1e-4, "accountant": "prv"},
}
LOCAL_STEPS = 3


def _library_epsilon(dp: dict[str, Any], rate: float, steps: int) -> float:
    """Opacus's accountant driven as a training loop would drive it: one step() per DP-SGD step."""
    from opacus.accountants import PRVAccountant, RDPAccountant

    accountant = RDPAccountant() if dp["accountant"] == "rdp" else PRVAccountant()
    for _ in range(steps):
        accountant.step(noise_multiplier=dp["noise_multiplier"], sample_rate=rate)
    return float(accountant.get_epsilon(delta=dp["delta"]))


def test_dp_groups_log_the_accountants_epsilon_every_round_and_train(local_ray: None, tracking: dict[str, Any]) -> None:
    data = small_experiment(tracking, rounds=3, algorithm={"name": "fedavg", "lr": 1.0, "local_steps": LOCAL_STEPS})
    data["clients"] = [
        {"group": name, "count": 20, "batch_size": 16, "defence": {"dp": dp}} for name, dp in GROUPS.items()
    ]
    experiment = validate(data)
    result = run_experiment(experiment, show_progress=False)

    sizes = prepare_data(experiment).partition.sizes()
    bounds = group_bounds(experiment)
    client = MlflowClient(tracking_uri=tracking["uri"])
    for index, (name, dp) in enumerate(GROUPS.items()):
        rate = 16 / float(sizes[bounds[index] : bounds[index + 1]].min())  # the group's largest sample rate
        history = sorted(client.get_metric_history(result.run_id, f"privacy/{name}/epsilon"), key=lambda m: m.step)
        assert [m.step for m in history] == [1, 2, 3]
        for metric in history:
            expected = _library_epsilon(dp, rate, metric.step * LOCAL_STEPS)
            assert metric.value == pytest.approx(expected, rel=1e-6), (name, metric.step)
        assert history[0].value < history[1].value < history[2].value
        assert result.history[-1][f"privacy/{name}/sample_rate"] == pytest.approx(rate, rel=1e-12)
        assert result.history[-1][f"privacy/{name}/steps"] == 3 * LOCAL_STEPS
    accuracies = [row["test_accuracy"] for row in result.history]
    assert accuracies[-1] > 0.3, accuracies  # ten classes: chance is 0.1


def test_dp_runs_are_identical_on_one_and_two_workers(local_ray: None, tracking: dict[str, Any]) -> None:
    """Batches and noise come from each client's own streams, so the worker count changes nothing."""
    results = []
    for workers in (1, 2):
        data = small_experiment(tracking, rounds=2, algorithm={"name": "fedsgd", "lr": 1.0})
        data["clients"][0]["defence"] = {"dp": GROUPS["rdp"]}
        data["resources"] = {"chunk_size": 8, "workers": workers}
        data["sampling"] = {"clients_per_round": 30}
        results.append(run_experiment(validate(data), show_progress=False))
    one, two = results
    for key in one.params:
        assert torch.equal(one.params[key], two.params[key]), key
    assert one.history[-1]["privacy/a/epsilon"] == two.history[-1]["privacy/a/epsilon"] > 0
    assert "privacy/b/epsilon" not in one.history[-1]
