"""The cocktail-party attack (ICA on the first dense layer) on real MNIST digits and a fresh sigmoid MLP."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch
from torch import nn

import metrics
from attacks import ATTACKS, AttackConfigError, AttackerView, AttackNotApplicable, build_attack
from attacks.ica import calibrate, to_images, whiten
from tests.conftest import REPO
from tests.support.attacks import make_view, mnist_digits

SHAPE = (1, 28, 28)


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    """The unmixing matrices are tiny; on a shared, busy machine a second OpenMP thread that spins made a
    1,000-step run 10-20 times slower (measured: 70 s against 3-7 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _mlp(activation: type[nn.Module] = nn.Sigmoid, seed: int = 0, hidden: int = 256) -> nn.Module:
    """A fresh MLP 784-hidden-10 with torch's default initialisation drawn from ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Flatten(), nn.Linear(784, hidden), activation(), nn.Linear(hidden, 10))


def _conv_first() -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(1, 4, 5, stride=2), nn.Sigmoid(), nn.Flatten(), nn.Linear(4 * 12 * 12, 10))


def _matched_ssim(images: torch.Tensor, reconstruction: torch.Tensor) -> np.ndarray:
    return metrics.match(images, reconstruction, metric="ssim").scores["ssim"]


def test_one_sample_is_the_image_itself() -> None:
    images, labels = mnist_digits([6])
    for kind in ("gradient", "delta"):
        result = build_attack("cocktail-party").reconstruct(make_view(_mlp(), images, labels, kind=kind))
        assert result.images.shape == (1, *SHAPE)
        assert float((result.images - images).abs().max()) < 1e-5


def test_random_labels_batch_of_8_on_a_sigmoid_mlp() -> None:
    images, labels = mnist_digits([0, 1, 2, 3, 4, 5, 6, 7], offset=20)
    result = build_attack("cocktail-party").reconstruct(make_view(_mlp(), images, labels))
    assert result.images.shape == (8, *SHAPE) and result.labels is None
    ssim = _matched_ssim(images, result.images)
    # Measured: every digit at matched SSIM 1.000 (to 3 decimals); max correlation of the sources 0.53.
    assert ssim.min() > 0.95


def test_identical_labels_do_not_stop_it() -> None:
    images, labels = mnist_digits([3] * 8, offset=20)
    result = build_attack("cocktail-party").reconstruct(make_view(_mlp(), images, labels))
    ssim = _matched_ssim(images, result.images)
    # Measured: mean 0.970, 7 of 8 at SSIM >= 0.9, the last at 0.892; max correlation of the sources 0.71
    # (same-class digits are correlated). Eight digits of each other class at this offset: mean 0.90 (7s)
    # to 1.00 (0s), 73 of the 80 at SSIM >= 0.9.
    assert ssim.mean() > 0.93
    assert (ssim >= 0.9).mean() >= 0.75


def test_no_decorrelation_gives_duplicate_sources() -> None:
    images, labels = mnist_digits([0, 1, 2, 3], offset=20)
    view = make_view(_mlp(), images, labels)
    result = build_attack("cocktail-party", {"decorrelation_weight": 0.0}).reconstruct(view)
    # Measured: two sources coincide (correlation 1.000) and the matched SSIM falls to a mean of 0.38.
    assert result.diagnostics["max_correlation"] > 0.99
    assert _matched_ssim(images, result.images).mean() < 0.6


def test_a_relu_mlp_and_a_two_step_delta() -> None:
    images, labels = mnist_digits([1, 3, 5, 7, 9, 0, 2, 4], offset=40)
    relu = build_attack("cocktail-party").reconstruct(make_view(_mlp(nn.ReLU), images, labels))
    delta = build_attack("cocktail-party").reconstruct(
        make_view(_mlp(), images, labels, kind="delta", local_steps=2, lr=0.1)
    )
    # Measured: every digit at SSIM 1.000 in both (the two-step delta mixes all eight digits: four per step).
    assert _matched_ssim(images, relu.images).min() > 0.95
    assert _matched_ssim(images, delta.images).min() > 0.95


def test_batched_equals_one_by_one() -> None:
    """Two views of 4 samples share one batched run; the view of 2 samples runs alone."""
    cases = [([2, 7, 1, 8], 0), ([3, 3, 3, 3], 1), ([0, 9], 2)]
    views = []
    for labels_list, seed in cases:
        images, labels = mnist_digits(labels_list, offset=60)
        views.append(make_view(_mlp(seed=seed), images, labels))
    attack = build_attack("cocktail-party", {"iterations": 300})
    batched = attack.reconstruct_many(views)
    for view, together in zip(views, batched, strict=True):
        alone = attack.reconstruct(view)
        # Measured: identical images and objectives on the development CPU, with and without OMP_NUM_THREADS=1.
        # The tolerances leave room for another CPU's float32 round-off over the 300 Adam steps.
        assert together.images.shape == alone.images.shape
        assert float((together.images - alone.images).abs().max()) < 1e-3
        assert together.diagnostics["objective"] == pytest.approx(alone.diagnostics["objective"], rel=1e-4)


def test_refuses_a_model_whose_first_layer_is_not_dense_on_the_input() -> None:
    images, labels = mnist_digits([1, 2])
    view = make_view(_conv_first(), images, labels)
    attack = build_attack("cocktail-party")
    for call in (attack.check, attack.reconstruct, lambda v: attack.reconstruct_many([v])):
        with pytest.raises(AttackNotApplicable) as error:
            call(view)
        message = str(error.value)
        assert message == "cocktail-party: first dense layer follows convolutions; its input is not the image"


def test_refuses_more_samples_than_first_layer_units() -> None:
    images, labels = mnist_digits([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0])
    view = make_view(_mlp(hidden=10), images, labels)
    with pytest.raises(AttackNotApplicable) as error:
        build_attack("cocktail-party").check(view)
    assert str(error.value) == (
        "cocktail-party: the first dense layer has 10 units, fewer than the 11 samples to separate"
    )


def test_parameters_are_validated() -> None:
    assert "cocktail-party" in ATTACKS
    with pytest.raises(AttackConfigError) as error:
        build_attack("cocktail-party", {"decorrelation": "orthogonal"})
    assert str(error.value) == ("cocktail-party.decorrelation: must be one of log-det, exp-cosine, got 'orthogonal'")


def test_whitening_and_post_processing() -> None:
    generator = torch.Generator().manual_seed(0)
    mixtures = torch.randn(2, 6, 50, generator=generator, dtype=torch.float64)
    white, rank = whiten(mixtures, 3, 1e-9)
    assert rank.tolist() == [6, 6]
    covariance = white @ white.transpose(-1, -2) / 50
    assert torch.allclose(covariance, torch.eye(3, dtype=torch.float64).expand(2, 3, 3), atol=1e-10)
    digit = torch.zeros(100, dtype=torch.float64)
    digit[:15] = torch.linspace(0.2, 1.0, 15, dtype=torch.float64)
    source = -(digit - digit.mean()) / digit.std() * 3.0
    assert torch.allclose(to_images(source).double(), digit, atol=1e-6)


def test_leaves_the_model_and_view_untouched() -> None:
    images, labels = mnist_digits([3, 8])
    model = _mlp()
    before = {name: value.clone() for name, value in model.state_dict().items()}
    view: AttackerView = make_view(model, images, labels)
    update = {name: value.clone() for name, value in view.update.items()}
    build_attack("cocktail-party", {"iterations": 20}).reconstruct(view)
    assert all(torch.equal(before[name], value) for name, value in model.state_dict().items())
    assert all(torch.equal(update[name], value) for name, value in view.update.items())


def test_docs_list_every_parameter_with_its_default() -> None:
    text = (REPO / "docs" / "attacks.md").read_text(encoding="utf-8")
    section = next(part for part in text.split("\n## ") if part.startswith("cocktail-party"))
    rows = [line.split("|") for line in section.splitlines() if line.startswith("| `")]
    documented = {cells[1].strip().strip("`"): cells[2].strip().strip("`") for cells in rows}
    declared = ATTACKS["cocktail-party"].parameters
    assert sorted(documented) == sorted(declared)
    for parameter, spec in declared.items():
        value = documented[parameter]
        assert (float(value) == pytest.approx(spec.default)) if spec.kind in (int, float) else value == spec.default


def test_calibration_recovers_sign_scale_and_offset_from_the_bias_gradient() -> None:
    """Exact sources of any sign, scale and offset map back to the images: gW = A X and gb = A 1 fix them."""
    images, _ = mnist_digits([1, 4, 4, 9], offset=7)
    flat = torch.cat([images.reshape(4, -1), 1.0 - images[:2].reshape(2, -1)]).double()  # two bright backgrounds
    generator = torch.Generator().manual_seed(3)
    mixing = torch.randn(32, 6, generator=generator, dtype=torch.float64)
    centred = flat - flat.mean(dim=-1, keepdim=True)
    scales = torch.tensor([2.0, -0.5, 3.0, -1.5, -4.0, 0.7], dtype=torch.float64)
    sources = centred / centred.std(dim=-1, keepdim=True) * scales.sign()[:, None]
    result = calibrate(sources[None], (mixing @ flat)[None], mixing.sum(dim=1)[None])
    assert result.by_bias.tolist() == [True]
    assert float(result.residual[0]) < 1e-8  # exact data: float64 least-squares round-off, cond x 2.2e-16
    assert torch.allclose(result.images[0].double(), flat, atol=1e-5)
    # the skew rule flips the two images on a bright background
    skew_rule = to_images(sources)
    assert float((skew_rule[4:].double() - flat[4:]).abs().mean()) > 0.3


def test_bright_backgrounds_are_recovered_not_negated() -> None:
    """Dark strokes on a white background (inverted digits): every image recovered upright, as the eye sees it."""
    images, labels = mnist_digits([0, 1, 2, 3, 4, 5, 6, 7], offset=20)
    inverted = 1.0 - images
    result = build_attack("cocktail-party").reconstruct(make_view(_mlp(), inverted, labels))
    assert result.diagnostics["calibrated_by_bias"] == 1.0
    ssim = _matched_ssim(inverted, result.images)
    assert (ssim >= 0.9).all(), ssim
