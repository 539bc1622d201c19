"""The fused dense-layer path (testbed.runtime.fused) equals the per-client path and is taken where it pays."""

from __future__ import annotations

import pytest
import torch

from defenses import build_policy
from testbed.runtime.fused import is_dense_stack
from testbed.runtime.local_update import (
    StackedBatches,
    reference_update,
    stacked_deltas,
    stacked_gradients,
    weighted_sum,
)
from testbed.runtime.models import build_model
from tests.support.batches import norms, setup_clients, stack


@pytest.mark.parametrize(
    ("model_name", "loss_name"),
    [("mlp", "cross-entropy"), ("softmax", "mse"), ("mlp", "mse"), ("mlp", "sigmoid-bce")],
)
def test_fused_fedsgd_matches_the_per_client_path(model_name: str, loss_name: str) -> None:
    from testbed.runtime.fused import fused_trace

    model, params, clients = setup_clients(model_name)
    loss = build_policy({"loss": loss_name}).loss
    stacked = stack([batches[:1] for batches in clients])
    assert is_dense_stack(model)
    trace = fused_trace(model, loss, params, stacked, lr=None)
    per_client = stacked_gradients(model, loss, params, stacked)
    counts = stacked.w[:, 0].sum(dim=1)
    torch.testing.assert_close(trace.norms(), norms(per_client), rtol=1e-4, atol=1e-7)
    for name, value in weighted_sum(per_client, counts).items():
        torch.testing.assert_close(trace.weighted_sum(counts)[name], value, rtol=1e-4, atol=1e-6)
    chosen = trace.per_client(torch.tensor([2, 0]))
    for name, value in per_client.items():
        torch.testing.assert_close(chosen[name], value[[2, 0]], rtol=1e-4, atol=1e-7)
    assert not is_dense_stack(build_model("lenet", (1, 28, 28), 10))


@pytest.mark.parametrize(
    ("model_name", "loss_name", "activation"),
    [("mlp", "cross-entropy", "relu"), ("mlp", "mse", "sigmoid"), ("softmax", "cross-entropy", "relu")],
)
def test_fused_fedavg_matches_the_per_client_path(model_name: str, loss_name: str, activation: str) -> None:
    """Low-rank local steps give each client's delta, its norm and the weighted sum of the vmap path."""
    from testbed.runtime.fused import fused_trace

    _, params, clients = setup_clients(model_name)
    model = build_model(model_name, (1, 12, 12), 10, hidden=[16, 8], activation=activation, seed=3)
    params = {name: value.detach().clone() for name, value in model.named_parameters()}
    loss = build_policy({"loss": loss_name}).loss
    stacked = stack(clients)
    trace = fused_trace(model, loss, params, stacked, lr=0.3)
    deltas = stacked_deltas(model, loss, params, stacked, lr=0.3)
    held = torch.tensor([12.0, 8.0, 4.0])
    torch.testing.assert_close(trace.norms(), norms(deltas), rtol=1e-4, atol=1e-6)
    for name, value in weighted_sum(deltas, held).items():
        torch.testing.assert_close(trace.weighted_sum(held)[name], value, rtol=1e-4, atol=1e-5)
    every = trace.per_client(torch.arange(3))
    for c, batches in enumerate(clients):
        expected = reference_update(model, loss, params, batches, kind="delta", lr=0.3)
        for name in params:
            torch.testing.assert_close(every[name][c], expected[name], rtol=1e-4, atol=1e-6)
    # the later steps really run on moved weights: the first step alone gives another delta
    first = fused_trace(model, loss, params, StackedBatches(stacked.x[:, :1], stacked.y[:, :1], stacked.w[:, :1]), 0.3)
    assert not torch.allclose(first.per_client(torch.arange(1))[next(iter(params))], every[next(iter(params))][:1])


def test_fusing_is_chosen_by_rows_per_client() -> None:
    from testbed.runtime.fused import low_rank_cheaper

    model = build_model("mlp", (1, 28, 28), 10, hidden=[256], activation="relu", seed=0)
    assert low_rank_cheaper(model, 64)  # the reference workload: two local steps of 32
    assert not low_rank_cheaper(model, 600)  # nineteen steps: per-client weights are cheaper


@pytest.mark.parametrize(("loss_name", "activation"), [("cross-entropy", "relu"), ("mse", "tanh")])
def test_dense_fedavg_with_per_client_weights_matches_the_vmap_path(loss_name: str, activation: str) -> None:
    from testbed.runtime.fused import dense_deltas

    _, _, clients = setup_clients("mlp")
    model = build_model("mlp", (1, 12, 12), 10, hidden=[16, 8], activation=activation, seed=5)
    params = {name: value.detach().clone() for name, value in model.named_parameters()}
    loss = build_policy({"loss": loss_name}).loss
    stacked = stack(clients)
    expected = stacked_deltas(model, loss, params, stacked, lr=0.3)
    got = dense_deltas(model, loss, params, stacked, lr=0.3)
    for name in params:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6)
    assert float(got[next(iter(params))].abs().sum()) > 0


@pytest.mark.parametrize(
    ("algorithm", "steps", "width", "fused"),
    [("fedsgd", 1, 600, True), ("fedavg", 1, 600, True), ("fedavg", 2, 32, True), ("fedavg", 19, 32, False)],
)
def test_which_chunks_take_the_fused_path(algorithm: str, steps: int, width: int, fused: bool) -> None:
    """One step never needs low-rank corrections; many steps are cheaper with per-client weights."""
    import numpy as np

    from testbed.config.topology import validate
    from testbed.data.partition import partition
    from testbed.runtime.simulation import SimulationContext, _fused_path_applies

    experiment = validate(
        {
            "name": "t",
            "rounds": 1,
            "dataset": {"name": "synthetic", "synthetic_shape": [1, 28, 28]},
            "model": {"name": "mlp", "hidden": [256]},
            "algorithm": {"name": algorithm},
            "clients": [{"group": "a", "count": 4, "batch_size": 8}],
        }
    )
    labels = np.arange(40) % 10
    context = SimulationContext.build(
        experiment, np.zeros((40, 1, 28, 28), np.float32), labels, partition(labels, 4, "iid", seed=0), 10
    )
    assert _fused_path_applies(context, context.groups[0], np.zeros((4, steps, width), dtype=np.int64)) is fused
