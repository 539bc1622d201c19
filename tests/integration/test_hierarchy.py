"""Hierarchical topologies on a real local Ray: edges see clients, the root sees edge aggregates."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from mlflow.tracking import MlflowClient

from testbed.config.load import load_experiment
from testbed.engine import run_experiment
from tests.conftest import REPO

pytestmark = pytest.mark.ray


def test_leakage_by_position_and_same_model_as_flat(local_ray: None, tracking: dict[str, Any]) -> None:
    overrides = [f"tracking.{key}={value}" for key, value in tracking.items()] + ["rounds=2"]
    tree = load_experiment(REPO / "topologies" / "hierarchical.yaml", overrides)
    result = run_experiment(tree, show_progress=False)
    metrics = MlflowClient(tracking_uri=tracking["uri"]).get_run(result.run_id).data.metrics
    # an edge sees single clients' batch-of-1 gradients: the dense layer gives each image back exactly
    for edge in ("edge-north", "edge-south"):
        assert metrics[f"leakage/{edge}/recovered_fraction"] == 1.0, metrics
        assert metrics[f"leakage/{edge}/avd_mean"] < 0.01
    # the root sees means over many clients: it recovers less, and worse
    assert metrics["leakage/root/avd_mean"] > 10 * max(metrics["leakage/edge-north/avd_mean"], 1e-3)
    assert metrics["leakage/root/recovered_fraction"] < 1.0

    flat = load_experiment(REPO / "topologies" / "hierarchical.yaml", [*overrides, "aggregators=[]", "attack=null"])
    plain = run_experiment(flat, show_progress=False)
    for key, value in result.params.items():
        assert torch.allclose(value, plain.params[key], atol=1e-6), key
