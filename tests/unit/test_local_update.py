"""The vectorised client computation equals the plain one-client autograd path."""

from __future__ import annotations

import pytest
import torch

from defenses import build_policy
from testbed.local_update import StackedBatches, reference_update, stacked_deltas, stacked_gradients, weighted_sum
from testbed.models import build_model

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


@pytest.mark.parametrize(("model_name", "loss_name"), [("mlp", "cross-entropy"), ("softmax", "mse"), ("mlp", "mse")])
def test_fused_fedsgd_matches_the_per_client_path(model_name: str, loss_name: str) -> None:
    from testbed.fused import fusable, fused_gradients

    model, params, clients = _setup(model_name)
    loss = build_policy({"loss": loss_name}).loss
    stacked = _stack([batches[:1] for batches in clients])
    assert fusable(model)
    total, norms = fused_gradients(model, loss, params, stacked)
    per_client = stacked_gradients(model, loss, params, stacked)
    counts = stacked.w[:, 0].sum(dim=1)
    expected_norms = torch.stack([v.reshape(v.shape[0], -1).pow(2).sum(1) for v in per_client.values()]).sum(0).sqrt()
    torch.testing.assert_close(norms, expected_norms, rtol=1e-4, atol=1e-7)
    for name, value in weighted_sum(per_client, counts).items():
        torch.testing.assert_close(total[name], value, rtol=1e-4, atol=1e-6)
    assert not fusable(build_model("lenet", (1, 28, 28), 10))
