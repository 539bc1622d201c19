"""The vectorised client computation equals the plain one-client autograd path."""

from __future__ import annotations

import pytest
import torch

from defenses import build_policy
from testbed.runtime.local_update import (
    reference_update,
    stacked_deltas,
    stacked_gradients,
    weighted_sum,
)
from tests.support.batches import setup_clients, stack


@pytest.mark.parametrize("model_name", ["mlp", "lenet", "cnn"])
@pytest.mark.parametrize("loss_name", ["cross-entropy", "mse"])
def test_vectorised_gradients_and_deltas_match_one_client_autograd(model_name: str, loss_name: str) -> None:
    model, params, clients = setup_clients(model_name)
    loss = build_policy({"loss": loss_name}).loss
    stacked = stack(clients)
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
