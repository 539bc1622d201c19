"""The study trains through the engine's own server step: BatchNorm buffers and min_clients, without Ray."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from testbed.config.topology import validate
from testbed.runtime.preparation import prepare_data
from testbed.runtime.round_step import RunAborted
from testbed.study.training import train
from tests.conftest import small_experiment
from tests.support.user_code import BATCHNORM_NET, write_module


def _bn_experiment(tmp_path: Path, tracking: dict[str, Any], **changes: Any) -> Any:
    module = write_module(tmp_path, BATCHNORM_NET)
    data = small_experiment(tracking, rounds=3, **changes)
    data["model"] = {"name": f"{module}:small_bn_net", "path": str(tmp_path), "params": {"width": 4}}
    return validate(data)


def test_study_training_averages_batchnorm_statistics(tmp_path: Path, tracking: dict[str, Any]) -> None:
    experiment = _bn_experiment(tmp_path, tracking)
    run = train(experiment, prepare_data(experiment), keep=True)
    start, end = run.snapshots[0], run.snapshots[3]
    # FedSGD: every client takes one step a round, so the aggregated counter (the largest) is the round count;
    # a loop that only steps the parameters leaves the initial statistics (0 steps, mean 0, variance 1)
    assert int(start["1.num_batches_tracked"]) == 0
    assert int(end["1.num_batches_tracked"]) == 3
    assert not torch.equal(end["1.running_mean"], start["1.running_mean"])
    assert not torch.equal(end["4.running_var"], start["4.running_var"])


def test_study_training_stops_below_min_clients(tracking: dict[str, Any]) -> None:
    data = small_experiment(tracking, rounds=2)
    data["algorithm"] = {"name": "fedsgd", "lr": 0.5, "max_update_norm": 1e-12}  # every update is rejected
    experiment = validate(data)
    with pytest.raises(RunAborted, match="min_clients=1"):
        train(experiment, prepare_data(experiment), keep=False)
