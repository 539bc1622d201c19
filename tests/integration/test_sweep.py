"""Sweeps on a real local Ray: child runs under one parent, and resuming skips finished cells."""

from __future__ import annotations

import json
from typing import Any

import pytest
from mlflow.tracking import MlflowClient

from testbed.config.sweep_plan import expand, plan
from testbed.config.topology import validate
from testbed.errors import UserError
from testbed.sweep import COMBINATION_TAG, run_sweep
from tests.conftest import small_experiment

pytestmark = pytest.mark.ray


def test_grid_and_zipped_keys_expand_in_order() -> None:
    cells = expand({"rounds": [1, 2], "model.name,model.hidden": [["mlp", [8]], ["softmax", [4]]]})
    assert [c.values for c in cells] == [
        {"rounds": 1, "model.name": "mlp", "model.hidden": [8]},
        {"rounds": 1, "model.name": "softmax", "model.hidden": [4]},
        {"rounds": 2, "model.name": "mlp", "model.hidden": [8]},
        {"rounds": 2, "model.name": "softmax", "model.hidden": [4]},
    ]
    assert [c.values for c in expand([{"rounds": 3}, {"seed": 1}])] == [{"rounds": 3}, {"seed": 1}]
    with pytest.raises(UserError, match=r"sweep.a,b: each value must be a list of 2 values"):
        expand({"a,b": [[1]]})


def test_an_invalid_cell_is_reported_before_anything_runs(tracking: dict[str, Any]) -> None:
    data = small_experiment(tracking, sweep={"clients.a.batch_size": [4, 0]})
    with pytest.raises(UserError, match=r"clients\[0\].batch_size"):
        plan(validate(data))


def test_sweep_runs_children_and_resume_skips_finished(local_ray: None, tracking: dict[str, Any]) -> None:
    sweep = {"clients.a.batch_size,clients.b.batch_size": [[4, 4], [8, 8]], "algorithm.lr": [0.1, 0.5]}
    data = small_experiment(tracking, rounds=2, sweep=sweep)
    experiment = validate(data)
    result = run_sweep(experiment, show_progress=False)
    assert len(result.runs) == 4
    client = MlflowClient(tracking_uri=tracking["uri"])
    parent = client.get_run(result.parent_run_id)
    assert parent.data.tags["testbed.sweep"] == "parent" and parent.info.status == "FINISHED"
    assert json.loads(parent.data.params["sweep"]) == sweep
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{result.parent_run_id}'"
    )
    assert len(children) == 4
    seen = set()
    accuracy = {}
    for child in children:
        combination = json.loads(child.data.tags[COMBINATION_TAG])
        assert child.data.params["clients.a.batch_size"] == str(combination["clients.a.batch_size"])
        assert child.data.params["clients.b.batch_size"] == str(combination["clients.b.batch_size"])
        assert child.data.params["algorithm.lr"] == str(combination["algorithm.lr"])
        cell = (combination["clients.a.batch_size"], combination["algorithm.lr"])
        seen.add(cell)
        accuracy[cell] = child.data.metrics["test_accuracy"]
    assert seen == {(4, 0.1), (4, 0.5), (8, 0.1), (8, 0.5)}
    # two rounds of FedSGD: the larger step learns more, whatever the batch size
    assert accuracy[(4, 0.5)] > accuracy[(4, 0.1)] and accuracy[(8, 0.5)] > accuracy[(8, 0.1)], accuracy
    assert max(accuracy.values()) > 0.3, accuracy

    client.set_terminated(result.runs[-1][1], status="FAILED")
    again = run_sweep(experiment, show_progress=False, resume_parent_id=result.parent_run_id)
    assert again.skipped == 3
    assert [c.values for c, _ in again.runs] == [result.runs[-1][0].values]
