"""The vectorised client computation equals the plain one-client autograd path."""

from __future__ import annotations

import pytest
import torch

from defenses import build_policy
from testbed.runtime.local_update import (
    StackedBatches,
    reference_update,
    stacked_deltas,
    stacked_gradients,
    weighted_sum,
)
from testbed.runtime.models import build_model

SIZES = [[5, 5, 2], [5, 3], [4]]  # per client: the sizes of its local batches (ragged on purpose)


def _setup(model_name: str) -> tuple[torch.nn.Module, dict[str, torch.Tensor], list[list[tuple[torch.Tensor, ...]]]]:
    shape = (1, 12, 12) if model_name != "lenet" else (1, 28, 28)
    model = build_model(model_name, shape, 10, hidden=[16], activation="sigmoid", seed=3)
    params = {name: value.detach().clone() for name, value in model.named_parameters()}
    generator = torch.Generator().manual_seed(0)
    clients = [
        [
            (torch.rand(size, *shape, generator=generator), torch.randint(0, 10, (size,), generator=generator))
            for size in sizes
        ]
        for sizes in SIZES
    ]
    return model, params, clients


def _stack(clients: list[list[tuple[torch.Tensor, ...]]]) -> StackedBatches:
    steps = max(len(batches) for batches in clients)
    width = max(x.shape[0] for batches in clients for x, _ in batches)
    shape = clients[0][0][0].shape[1:]
    x = torch.zeros(len(clients), steps, width, *shape)
    y = torch.zeros(len(clients), steps, width, dtype=torch.int64)
    w = torch.zeros(len(clients), steps, width)
    for c, batches in enumerate(clients):
        for s, (xb, yb) in enumerate(batches):
            x[c, s, : len(yb)], y[c, s, : len(yb)], w[c, s, : len(yb)] = xb, yb, 1.0
    return StackedBatches(x, y, w)


@pytest.mark.parametrize("model_name", ["mlp", "lenet", "cnn"])
@pytest.mark.parametrize("loss_name", ["cross-entropy", "mse"])
def test_vectorised_gradients_and_deltas_match_one_client_autograd(model_name: str, loss_name: str) -> None:
    model, params, clients = _setup(model_name)
    loss = build_policy({"loss": loss_name}).loss
    stacked = _stack(clients)
    gradients = stacked_gradients(model, loss, params, stacked)
    deltas = stacked_deltas(model, loss, params, stacked, lr=0.3)
    for c, batches in enumerate(clients):
        expected_gradient = reference_update(model, loss, params, batches, kind="gradient", lr=0.3)
        expected_delta = reference_update(model, loss, params, batches, kind="delta", lr=0.3)
        for name in params:
            torch.testing.assert_close(gradients[name][c], expected_gradient[name], rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(deltas[name][c], expected_delta[name], rtol=1e-4, atol=1e-6)
    assert not torch.equal(deltas[next(iter(params))][0], deltas[next(iter(params))][1])


def test_weighted_sum_is_the_weighted_sum() -> None:
    generator = torch.Generator().manual_seed(1)
    update = {"a": torch.randn(4, 3, 2, generator=generator), "b": torch.randn(4, 5, generator=generator)}
    weights = torch.tensor([1.0, 2.0, 0.5, 3.0])
    result = weighted_sum(update, weights)
    for name, value in update.items():
        torch.testing.assert_close(result[name], (value * weights.view(-1, *[1] * (value.dim() - 1))).sum(0))


def _norms(update: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.stack([v.reshape(v.shape[0], -1).pow(2).sum(1) for v in update.values()]).sum(0).sqrt()


@pytest.mark.parametrize(
    ("model_name", "loss_name"),
    [("mlp", "cross-entropy"), ("softmax", "mse"), ("mlp", "mse"), ("mlp", "sigmoid-bce")],
)
def test_fused_fedsgd_matches_the_per_client_path(model_name: str, loss_name: str) -> None:
    from testbed.runtime.fused import fused_trace, is_dense_stack

    model, params, clients = _setup(model_name)
    loss = build_policy({"loss": loss_name}).loss
    stacked = _stack([batches[:1] for batches in clients])
    assert is_dense_stack(model)
    trace = fused_trace(model, loss, params, stacked, lr=None)
    per_client = stacked_gradients(model, loss, params, stacked)
    counts = stacked.w[:, 0].sum(dim=1)
    torch.testing.assert_close(trace.norms(), _norms(per_client), rtol=1e-4, atol=1e-7)
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

    _, params, clients = _setup(model_name)
    model = build_model(model_name, (1, 12, 12), 10, hidden=[16, 8], activation=activation, seed=3)
    params = {name: value.detach().clone() for name, value in model.named_parameters()}
    loss = build_policy({"loss": loss_name}).loss
    stacked = _stack(clients)
    trace = fused_trace(model, loss, params, stacked, lr=0.3)
    deltas = stacked_deltas(model, loss, params, stacked, lr=0.3)
    held = torch.tensor([12.0, 8.0, 4.0])
    torch.testing.assert_close(trace.norms(), _norms(deltas), rtol=1e-4, atol=1e-6)
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

    _, _, clients = _setup("mlp")
    model = build_model("mlp", (1, 12, 12), 10, hidden=[16, 8], activation=activation, seed=5)
    params = {name: value.detach().clone() for name, value in model.named_parameters()}
    loss = build_policy({"loss": loss_name}).loss
    stacked = _stack(clients)
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
