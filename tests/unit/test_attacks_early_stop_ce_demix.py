"""ce-demix's early stop (restarts in waves, a problem leaves once a start fits exactly) answers as the full budget.

The full-budget path is the same solve with the exact-fit criterion off (``GOOD_ENOUGH = 0``): all 16 starts
in one batch, each until it converges, the smallest residual wins. An exact fit (relative residual at most
``GOOD_ENOUGH * fit_tolerance`` = 1e-6, against about 1e-2 for wrong labels) determines the logits up to the
order of samples that share a label, so any start that fits gives the same images up to that order, to the
round-off bound of the solve (``100 * 2^-24 * cond(E)`` pixels, as in test_attacks_analytic). A batch that no
start fits exactly runs every start in both paths and gets the same answer.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

import attacks.ce_demix
import metrics
from attacks import Reconstruction, build_attack
from metrics.recovery import recovered
from testbed.runtime.models import build_model
from tests.support.attacks import make_view, mnist_digits
from tests.unit.test_attacks_analytic import _trained_softmax

SHAPE = (1, 28, 28)


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _model(name: str) -> torch.nn.Module:
    if name == "trained":
        return _trained_softmax()
    return build_model(name, SHAPE, 10, hidden=(256,), activation="relu", seed=0)


def _both(model: str, labels: list[int], offset: int) -> tuple[torch.Tensor, Reconstruction, Reconstruction]:
    images, targets = mnist_digits(labels, offset=offset)
    view = make_view(_model(model), images, targets)
    early = build_attack("ce-demix").reconstruct(view)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(attacks.ce_demix, "GOOD_ENOUGH", 0.0)
        full = build_attack("ce-demix").reconstruct(view)
    return images, early, full


def _recovered(images: torch.Tensor, result: Reconstruction) -> int:
    return int(recovered(metrics.match(images, result.images, metric="ssim").scores).sum())


@pytest.mark.parametrize(
    ("model", "labels", "offset"),
    [
        ("softmax", [3] * 8, 5),  # identical labels: 3 of 16 starts fit, after ~140 steps
        ("softmax", [0, 1, 2, 3, 4, 5, 6, 7], 5),
        ("softmax", [1, 1, 2, 2, 5, 5, 9, 9], 5),
        ("trained", [4, 4, 4, 4], 0),
        ("mlp", [6, 6, 6, 6], 300),
        ("mlp", [2, 7], 300),
    ],
)
def test_an_exact_fit_ends_the_solve_with_the_full_budgets_images(model: str, labels: list[int], offset: int) -> None:
    images, early, full = _both(model, labels, offset)
    assert early.labels is not None and full.labels is not None
    assert torch.equal(early.labels, full.labels)
    assert early.diagnostics["residual"] <= 1e-6 and full.diagnostics["residual"] <= 1e-6
    # Up to the order of same-label samples: pair them, then compare to the solve's round-off bound.
    paired = metrics.match(full.images, early.images, metric="mse").assignment
    bound = 100 * 2.0**-24 * max(early.diagnostics["condition"], full.diagnostics["condition"])
    assert float((early.images[torch.as_tensor(paired)] - full.images).abs().max()) <= bound
    # Measured: every sample recovered on the softmax batches; 1 of 4 on the ReLU MLP's identical labels in both
    # paths (carrying the error back through ReLU is the weak step there, not the logit solve).
    assert _recovered(images, early) == _recovered(images, full)


def test_a_batch_no_start_fits_exactly_runs_every_start_and_gets_the_same_answer() -> None:
    # Eight ReLU-MLP digits of one label: the best residual after 200 steps is ~1.3e-6, above the exact-fit
    # criterion (1e-6) and below fit_tolerance (no label search). Every start runs in both paths.
    images, early, full = _both("mlp", [6] * 8, 300)
    assert early.diagnostics["residual"] > 1e-6
    assert early.diagnostics["restarts"] == full.diagnostics["restarts"] == 16
    assert early.diagnostics["residual"] == pytest.approx(full.diagnostics["residual"], rel=1e-9)
    assert float((early.images - full.images).abs().max()) <= 1e-6
    assert _recovered(images, early) == _recovered(images, full)
