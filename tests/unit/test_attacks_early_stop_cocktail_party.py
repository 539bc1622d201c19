"""cocktail-party's early stop (an objective plateau per client) answers as the full 1,000 Adam steps.

Adam at a fixed step size never settles: after the objective has plateaued the sources keep moving by
round-off-sized steps, and the full-budget answer itself changes by up to 0.03 per pixel (images in [0, 1])
over its last 200 steps (measured on 96 batches of 4-32 digits). The early-stopped answer must therefore
match the full budget to that scale, not bit for bit: every sample recovered in one is recovered in the
other, matched SSIM within 0.005, pixels within 0.06 (twice that drift).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch
from torch import nn

import metrics
from attacks import build_attack
from attacks.ica import IcaSettings, separate
from metrics.recovery import recovered
from tests.support.attacks import make_view, mnist_digits

PIXEL_TOLERANCE = 0.06
SSIM_TOLERANCE = 0.005


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _mlp(activation: type[nn.Module], seed: int = 0) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Flatten(), nn.Linear(784, 256), activation(), nn.Linear(256, 10))


def _scores(images: torch.Tensor, reconstruction: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    scores = metrics.match(images, reconstruction, metric="ssim").scores
    return np.asarray(scores["ssim"]), np.asarray(recovered(scores))


@pytest.mark.parametrize(
    ("activation", "labels", "offset", "stops"),
    [
        (nn.Sigmoid, [0, 1, 2, 3, 4, 5, 6, 7], 300, True),
        (nn.ReLU, [3] * 8, 300, True),
        (nn.ReLU, [5] * 32, 320, True),
        # One source of this batch still settles after 800 steps while the objective falls by less than 1e-4 in
        # 150 steps: patience 150 stopped at 750 and lost that digit (30 recovered, against 31). Whether the
        # default 200 stops before the budget depends on float32 round-off (CPUs with different vector kernels
        # stopped at 775 and ran to 1,000); either way it must recover what the full budget does.
        (nn.Sigmoid, [int(k) for k in np.random.default_rng(3).integers(0, 10, 32)], 340, None),
    ],
)
def test_the_plateau_stop_recovers_what_the_full_budget_recovers(
    activation: type[nn.Module], labels: list[int], offset: int, stops: bool | None
) -> None:
    images, targets = mnist_digits(labels, offset=offset)
    view = make_view(_mlp(activation), images, targets)
    early = build_attack("cocktail-party").reconstruct(view)
    full = build_attack("cocktail-party", {"patience": 0}).reconstruct(view)
    assert full.diagnostics["iterations"] == 1000
    if stops is not None:
        assert (early.diagnostics["iterations"] < 1000) == stops
    early_ssim, early_recovered = _scores(images, early.images)
    full_ssim, full_recovered = _scores(images, full.images)
    assert np.array_equal(np.sort(early_recovered), np.sort(full_recovered))
    assert early_recovered.sum() == full_recovered.sum()
    assert np.abs(np.sort(early_ssim) - np.sort(full_ssim)).max() <= SSIM_TOLERANCE
    paired = metrics.match(full.images, early.images, metric="mse").assignment
    assert float((early.images[torch.as_tensor(paired)] - full.images).abs().max()) <= PIXEL_TOLERANCE


def test_no_early_stop_before_the_objective_has_settled() -> None:
    # While the objective still falls by more than min_delta per window the run continues: with a step size
    # ten times smaller progress is slow but steady, and no client stops before the budget.
    images, targets = mnist_digits([3] * 8, offset=300)
    view = make_view(_mlp(nn.ReLU), images, targets)
    slow = build_attack("cocktail-party", {"lr": 0.001, "iterations": 400}).reconstruct(view)
    assert slow.diagnostics["iterations"] == 400


def _settings(patience: int) -> IcaSettings:
    return IcaSettings(
        iterations=600,
        lr=0.01,
        negentropy_weight=1.0,
        decorrelation="log-det",
        decorrelation_weight=6.0,
        temperature=5.0,
        tv_weight=30.0,
        seed=0,
        rtol=1e-9,
        patience=patience,
        min_delta=1e-4,
    )


def test_clients_that_stop_leave_the_batch_without_changing_the_others() -> None:
    mixtures, shapes = [], []
    for seed, labels in enumerate([[2, 7, 1, 8], [3, 3, 3, 3], [0, 9, 4, 4]]):
        images, targets = mnist_digits(labels, offset=60)
        view = make_view(_mlp(nn.Sigmoid, seed=seed), images, targets)
        mixtures.append(view.update["1.weight"].to(torch.float64))
        shapes.append(images.shape[1:])
    together = separate(torch.stack(mixtures), 4, (1, 28, 28), _settings(100), torch.device("cpu"))
    assert len(set(together.iterations.tolist())) > 1, together.iterations  # they stopped at different steps
    for index, mixture in enumerate(mixtures):
        alone = separate(mixture[None], 4, (1, 28, 28), _settings(100), torch.device("cpu"))
        assert int(alone.iterations[0]) == int(together.iterations[index])
        assert float((alone.sources[0] - together.sources[index]).abs().max()) < 1e-3
