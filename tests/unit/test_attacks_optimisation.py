"""The optimisation attacks on the sigmoid LeNet of DLG with real MNIST digits (fixed seeds, small budgets)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

import metrics
from attacks import AttackerView, build_attack
from testbed.models import build_model
from tests.unit.test_attacks_support import make_view, mnist_digits

SHAPE = (1, 28, 28)


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Small models run as fast on one thread, and OpenMP threads that spin on a shared, busy machine
    made these tests 15-30 times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def lenet() -> torch.nn.Module:
    return build_model("lenet", SHAPE, 10, seed=0)


def _random_image() -> torch.Tensor:
    return torch.rand(SHAPE, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("label", [3, 7])
def test_dlg_recovers_one_digit_through_the_sigmoid_lenet(lenet: torch.nn.Module, label: int) -> None:
    images, labels = mnist_digits([label])
    result = build_attack("dlg", {"iterations": 100, "seed": 0}).reconstruct(make_view(lenet, images, labels))
    # Measured with these seeds: SSIM 0.998 (digit 3) and 0.998 (digit 7) after 100 L-BFGS iterations.
    assert metrics.ssim(images[0], result.images[0]) > 0.8
    assert result.labels is not None and result.labels.tolist() == [label]
    assert result.diagnostics["iterations"] <= 100


def test_dlg_unrolls_a_two_step_delta_with_public_labels(lenet: torch.nn.Module) -> None:
    images, labels = mnist_digits([3, 7])
    view = make_view(lenet, images, labels, kind="delta", local_steps=2, lr=0.01, public_labels=True)
    result = build_attack("dlg", {"iterations": 200}).reconstruct(view)
    # Measured: SSIM 0.998 and 0.997.
    assert metrics.match(images, result.images, metric="ssim").scores["ssim"].min() > 0.8


def test_inverting_gradients_beats_a_random_image_by_far(lenet: torch.nn.Module) -> None:
    images, labels = mnist_digits([3])
    result = build_attack("inverting-gradients", {"iterations": 100}).reconstruct(make_view(lenet, images, labels))
    recovered = (metrics.ssim(images[0], result.images[0]), metrics.avd(images[0], result.images[0]))
    baseline = (metrics.ssim(images[0], _random_image()), metrics.avd(images[0], _random_image()))
    # Measured: reconstruction SSIM 0.999, AVD 0.009; uniform random image SSIM 0.036, AVD 0.97.
    assert recovered[0] > 0.9 and baseline[0] < 0.1
    assert recovered[1] < 0.1 * baseline[1]
    assert result.labels is not None and result.labels.tolist() == [3]
    assert 0.0 <= float(result.images.min()) and float(result.images.max()) <= 1.0


def test_inverting_gradients_unrolls_local_steps_of_a_fedavg_delta(lenet: torch.nn.Module) -> None:
    images, labels = mnist_digits([3, 7])
    view = make_view(lenet, images, labels, kind="delta", local_steps=2, lr=0.01)
    result = build_attack("inverting-gradients", {"iterations": 200}).reconstruct(view)
    matched = metrics.match(images, result.images, metric="ssim")
    # Measured: SSIM 1.000 and 0.999; the two inferred labels are right.
    assert matched.scores["ssim"].min() > 0.9
    assert result.labels is not None and sorted(result.labels.tolist()) == [3, 7]


def _views(models: list[torch.nn.Module]) -> list[AttackerView]:
    return [make_view(model, *mnist_digits([label])) for model, label in zip(models, [1, 3, 7], strict=True)]


@pytest.mark.parametrize("shared_params", [True, False])
def test_batched_inversion_equals_the_per_victim_path(lenet: torch.nn.Module, shared_params: bool) -> None:
    models = [lenet] * 3 if shared_params else [build_model("lenet", SHAPE, 10, seed=s) for s in range(3)]
    views = _views(models)
    attack = build_attack("inverting-gradients", {"iterations": 6, "restarts": 2, "seed": 5})
    one_by_one = [attack.reconstruct(view) for view in views]
    batched = attack.reconstruct_many(views)
    for single, many in zip(one_by_one, batched, strict=True):
        # Measured: identical images and objectives within 2.5e-6 (relative). Over hundreds of steps the
        # two paths may part on single pixels: a signed step turns round-off in a ~0 gradient entry into
        # a full step (docs/attacks.md).
        assert float((single.images - many.images).abs().max()) < 1e-5
        assert many.diagnostics["objective"] == pytest.approx(single.diagnostics["objective"], rel=1e-4)
        assert many.diagnostics["best_restart"] == single.diagnostics["best_restart"]
        assert many.labels is not None and single.labels is not None
        assert torch.equal(many.labels, single.labels)


def test_batched_inversion_groups_views_that_cannot_share_a_batch(lenet: torch.nn.Module) -> None:
    single = make_view(lenet, *mnist_digits([4]))
    pair = make_view(lenet, *mnist_digits([2, 8]))
    results = build_attack("inverting-gradients", {"iterations": 3}).reconstruct_many([single, pair, single])
    assert [tuple(r.images.shape) for r in results] == [(1, *SHAPE), (2, *SHAPE), (1, *SHAPE)]
    assert torch.equal(results[0].images, results[2].images)
    assert build_attack("inverting-gradients").reconstruct_many([]) == []


def test_optimisation_attacks_leave_the_model_untouched(lenet: torch.nn.Module) -> None:
    before = {name: value.clone() for name, value in lenet.state_dict().items()}
    view = make_view(lenet, *mnist_digits([5]))
    build_attack("dlg", {"iterations": 2}).reconstruct(view)
    build_attack("inverting-gradients", {"iterations": 2}).reconstruct_many([view, view])
    assert all(torch.equal(before[name], value) for name, value in lenet.state_dict().items())
    assert all(not p.requires_grad or p.grad is None for p in lenet.parameters())


def test_attacks_run_inside_no_grad(lenet: torch.nn.Module) -> None:
    view = make_view(lenet, *mnist_digits([5]))
    with torch.no_grad():
        single = build_attack("dlg", {"iterations": 3}).reconstruct(view)
        many = build_attack("inverting-gradients", {"iterations": 3}).reconstruct_many([view, view])
    assert single.images.shape == (1, *SHAPE) and torch.isfinite(single.images).all()
    assert torch.equal(many[0].images, many[1].images) and many[0].diagnostics["objective"] < 1
