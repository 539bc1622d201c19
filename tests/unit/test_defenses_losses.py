"""Losses: values, vectorisation over clients with torch.func, and the mixing-related gradients."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import grad, vmap

from defenses import LOSSES, CrossEntropy, LabelSmoothing, Loss, MeanSquaredError, SigmoidBinaryCrossEntropy

ALL_LOSSES = [CrossEntropy(), MeanSquaredError(), LabelSmoothing(0.2), SigmoidBinaryCrossEntropy()]


def test_registry_holds_the_built_in_losses() -> None:
    assert {"cross-entropy", "mse", "label-smoothing", "sigmoid-bce"} <= set(LOSSES)


@pytest.mark.parametrize("loss", ALL_LOSSES, ids=lambda loss: loss.name)
def test_vmap_grad_over_clients_matches_a_per_client_loop(loss: Loss) -> None:
    torch.manual_seed(0)
    clients, batch, features, classes = 5, 6, 7, 4
    weights = torch.randn(clients, classes, features, dtype=torch.float64)
    x = torch.randn(clients, batch, features, dtype=torch.float64)
    y = torch.randint(0, classes, (clients, batch))

    def batch_loss(w: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return loss.per_sample(inputs @ w.T, targets).mean()

    stacked = vmap(grad(batch_loss))(weights, x, y)
    for c in range(clients):
        w = weights[c].clone().requires_grad_(True)
        (expected,) = torch.autograd.grad(batch_loss(w, x[c], y[c]), [w])
        torch.testing.assert_close(stacked[c], expected, rtol=0, atol=1e-6)
    assert stacked.abs().max() > 1e-3  # the gradients are not trivially zero


@pytest.mark.parametrize("loss", ALL_LOSSES, ids=lambda loss: loss.name)
def test_per_sample_shape_and_inputs_untouched(loss: Loss) -> None:
    logits = torch.randn(5, 3)
    targets = torch.tensor([0, 2, 1, 1, 0])
    before = logits.clone()
    values = loss.per_sample(logits, targets)
    assert values.shape == (5,) and torch.all(values >= 0)
    assert torch.equal(logits, before)


def test_cross_entropy_and_label_smoothing_match_torch() -> None:
    logits = torch.randn(8, 5)
    targets = torch.randint(0, 5, (8,))
    expected = F.cross_entropy(logits, targets, reduction="none")
    torch.testing.assert_close(CrossEntropy().per_sample(logits, targets), expected)
    torch.testing.assert_close(LabelSmoothing(0.0).per_sample(logits, targets), expected)
    smoothed = F.cross_entropy(logits, targets, reduction="none", label_smoothing=0.3)
    torch.testing.assert_close(LabelSmoothing(0.3).per_sample(logits, targets), smoothed)


def test_mse_is_mean_over_classes_of_squared_probability_error() -> None:
    logits = torch.zeros(1, 4)  # probabilities 1/4 each
    value = MeanSquaredError().per_sample(logits, torch.tensor([0]))
    # (0.75^2 + 3 * 0.25^2) / 4
    torch.testing.assert_close(value, torch.tensor([0.1875]))


def test_sigmoid_bce_sums_binary_losses_and_spreads_its_gradient() -> None:
    logits = torch.zeros(2, 4, requires_grad=True)
    targets = torch.tensor([1, 3])
    values = SigmoidBinaryCrossEntropy().per_sample(logits, targets)
    torch.testing.assert_close(values, torch.full((2,), 4 * math.log(2.0)))
    (gradient,) = torch.autograd.grad(values.sum(), [logits])
    # sigmoid(0) - onehot: every class entry has magnitude 1/2, true class negative
    expected = torch.full((2, 4), 0.5)
    expected[0, 1] = expected[1, 3] = -0.5
    torch.testing.assert_close(gradient, expected)
    # softmax cross-entropy concentrates the error on the true class instead: (C - 1) / C against 1 / C
    ce_logits = torch.zeros(1, 4, requires_grad=True)
    (ce_gradient,) = torch.autograd.grad(CrossEntropy().per_sample(ce_logits, targets[:1]).sum(), [ce_logits])
    torch.testing.assert_close(ce_gradient, torch.tensor([[0.25, -0.75, 0.25, 0.25]]))
