"""dense-ratio's projected screen keeps exactly the candidates of the all-pairs cosine, batched or not."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from attacks import AttackerView
from attacks.copy_ranking import rank_by_units
from attacks.dense_ratio import (
    DenseRatio,
    near_pairs,
    rank_by_similarity,
    rank_from_pairs,
    ranked_distinct_rows,
)
from attacks.layers import summed_gradient
from defenses import CrossEntropy
from testbed.runtime.models import build_model
from tests.support.attacks import make_view, mnist_digits

SHAPE = (1, 28, 28)
COPY, DEDUP = 1 - 1e-6, 0.99


def _model(seed: int = 0) -> torch.nn.Module:
    return build_model("mlp", SHAPE, 10, hidden=(256,), activation="relu", seed=seed)


def _reference(attack: DenseRatio, view: AttackerView) -> tuple[list[int], torch.Tensor]:
    """Kept row indices (into the layer's rows) and images by the all-pairs float64 cosine."""
    bias = summed_gradient(view, "1.bias")
    magnitude = bias.abs()
    usable = torch.nonzero(magnitude > attack.params["tol"] * magnitude.max()).flatten()
    candidates = summed_gradient(view, "1.weight")[usable] / bias[usable, None]
    kept, _ = ranked_distinct_rows(
        candidates, magnitude[usable], view.num_samples, attack.params["copy_cosine"], attack.params["dedup_cosine"]
    )
    return usable[kept].tolist(), candidates[kept].to(torch.float32).reshape(len(kept), *SHAPE)


def _assert_same(attack: DenseRatio, views: list[AttackerView]) -> None:
    """Batched and one-by-one answers equal the all-pairs reference: the same rows, bit for bit."""
    batched = attack.reconstruct_many(views)
    for view, result in zip(views, batched, strict=True):
        _, expected = _reference(attack, view)
        assert result.images.shape == expected.shape
        assert torch.equal(result.images, expected)
        assert torch.equal(attack.reconstruct(view).images, expected)


def _digit_views(batch: int, count: int, kind: str = "gradient") -> list[AttackerView]:
    views = []
    for offset in range(count):
        labels = [(offset + position) % 10 for position in range(batch)]
        images, targets = mnist_digits(labels, offset=offset)
        views.append(make_view(_model(offset), images, targets, kind=kind, lr=0.05))
    return views


@pytest.mark.parametrize("batch", [1, 2, 8, 32])
def test_real_digit_batches_keep_the_all_pairs_candidates(batch: int) -> None:
    _assert_same(DenseRatio(), _digit_views(batch, 3))


def test_weight_deltas_keep_the_all_pairs_candidates() -> None:
    _assert_same(DenseRatio(), _digit_views(8, 2, kind="delta"))


def _synthetic_view(weight: torch.Tensor, bias: torch.Tensor, num_samples: int) -> AttackerView:
    model = _model()
    params = {name: value.detach().clone() for name, value in model.named_parameters()}
    update = {name: torch.zeros_like(value) for name, value in params.items()}
    update["1.weight"], update["1.bias"] = weight, bias
    return AttackerView(
        model=model,
        global_params=params,
        update=update,
        kind="gradient",
        batch_size=num_samples,
        num_samples=num_samples,
        local_steps=1,
        lr=0.1,
        loss=CrossEntropy(),
        input_shape=SHAPE,
        num_classes=10,
    )


def _at_cosine(base: torch.Tensor, other: torch.Tensor, cosine: float) -> torch.Tensor:
    """A unit vector at exactly ``cosine`` (float64) to the unit vector ``base``, in the plane of ``other``."""
    orthogonal = other - (other @ base) * base
    orthogonal = orthogonal / orthogonal.norm()
    return cosine * base + math.sqrt(1 - cosine**2) * orthogonal


def _adversarial(seed: int) -> AttackerView:
    """Mixtures of 16 images, with exact copies (scaled, some negated) and pairs just on either side of both
    thresholds; the float32 rows of the update are what the all-pairs path reads too."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand((16, 784), generator=generator, dtype=torch.float64)
    mixing = torch.rand((256, 16), generator=generator, dtype=torch.float64) * (
        torch.rand((256, 16), generator=generator) < 0.3
    )
    weight = mixing @ images
    weight[:8] = images[0] * torch.linspace(0.5, 2.0, 8, dtype=torch.float64)[:, None]  # exact copies of image 0
    weight[8:12] = images[1] * torch.tensor([1.0, -1.0, 3.0, -0.25], dtype=torch.float64)[:, None]
    unit = weight[20] / weight[20].norm()
    dedup_offsets, copy_offsets = (-1e-4, -2e-7, 2e-7, 1e-4), (-1e-5, -2e-8, 2e-8, 9e-7)
    for position in range(4):  # just below and above dedup_cosine, then copy_cosine
        weight[40 + position] = _at_cosine(unit, weight[60 + position], DEDUP + dedup_offsets[position]) * 5
        weight[44 + position] = _at_cosine(unit, weight[64 + position], COPY + copy_offsets[position]) * 7
    bias = torch.rand(256, generator=generator, dtype=torch.float64) + 0.1
    bias[9] = -bias[9]
    bias[11] = -bias[11]
    scale = bias.clone()
    scale[:12] = torch.tensor([0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 1.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    weight[:12] *= (bias[:12] / scale[:12])[:, None]  # copies keep their ratio gW_j / gb_j up to a scale
    weight[100] = 0.0  # a usable row whose candidate is the zero image
    return _synthetic_view(weight.to(torch.float32), bias.to(torch.float32), 16)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_copies_and_pairs_at_the_thresholds_keep_the_all_pairs_candidates(seed: int) -> None:
    view = _adversarial(seed)
    attack = DenseRatio()
    kept, _ = _reference(attack, view)
    assert set(range(8)) & set(kept), "the copies of image 0 are among the kept candidates"
    _assert_same(attack, [view, _adversarial(seed + 10)])


def test_the_screen_finds_every_pair_above_the_threshold() -> None:
    """No false negatives: every usable pair at or above the lower threshold is a screened pair."""
    views = [_adversarial(3), *_digit_views(4, 2)]
    for view in views:
        bias = summed_gradient(view, "1.bias")
        usable = bias.abs() > 1e-6 * bias.abs().max()
        screen = near_pairs(view.update["1.weight"], bias, usable, 20, DEDUP)
        rows = torch.nonzero(usable).flatten()
        candidates = summed_gradient(view, "1.weight")[rows] / bias[rows, None]
        unit = candidates / candidates.norm(dim=1, keepdim=True).clamp_min(1e-30)
        close = torch.nonzero(torch.triu(unit @ unit.T >= DEDUP, diagonal=1))
        wanted = {(int(rows[i]), int(rows[j])) for i, j in close.tolist()}
        found = {(int(i), int(j)) for i, j in screen.pairs.tolist()}
        assert wanted <= found or screen.needs_all_pairs


@pytest.mark.parametrize(("copy", "dedup"), [(1.0, 0.99), (0.5, -0.1), (0.9, 0.9)])
def test_other_thresholds_keep_the_all_pairs_candidates(copy: float, dedup: float) -> None:
    attack = DenseRatio(copy_cosine=copy, dedup_cosine=dedup)
    _assert_same(attack, [_adversarial(4), *_digit_views(8, 1)])


def test_an_update_without_usable_rows_gives_no_candidate() -> None:
    view = _synthetic_view(torch.zeros(256, 784), torch.zeros(256), 4)
    other = dataclasses.replace(_digit_views(4, 1)[0])
    results = DenseRatio().reconstruct_many([view, other])
    assert results[0].images.shape == (0, *SHAPE)
    assert results[1].images.shape[0] == 4


@pytest.mark.parametrize("seed", range(5))
def test_ranking_from_the_near_pairs_equals_the_full_matrix(seed: int) -> None:
    """rank_from_pairs on the pairs that can reach a threshold gives rank_by_similarity's answer."""
    generator = np.random.default_rng(seed)
    count = 60
    similarity = np.full((count, count), -2.0)
    np.fill_diagonal(similarity, (generator.random(count) > 0.1).astype(np.float64))  # some all-zero rows
    pairs = np.array([(i, j) for i in range(count) for j in range(i + 1, count) if generator.random() < 0.08])
    cosines = generator.choice([COPY, COPY + 5e-7, DEDUP + 1e-3, DEDUP, 0.5, 1.0], size=len(pairs))
    similarity[pairs[:, 0], pairs[:, 1]] = cosines
    similarity[pairs[:, 1], pairs[:, 0]] = cosines
    magnitude = generator.random(count).round(1)  # ties in |gb| as well as in support
    for limit in (1, 7, count):
        expected = rank_by_similarity(similarity, magnitude, limit, COPY, DEDUP)
        kept, support = rank_from_pairs(np.diag(similarity).copy(), pairs, cosines, magnitude, limit, COPY, DEDUP)
        assert kept == expected[0] and np.array_equal(support, expected[1])


def _planted_units(generator: np.random.Generator, views: int, count: int, rank: int) -> np.ndarray:
    """Unit vectors with planted exact copies, copies just inside and outside the copy threshold, near
    duplicates either side of the merge threshold, and zero rows."""
    unit = generator.standard_normal((views, count, rank))
    for v in range(views):
        for i in range(0, count - 1, 5):
            base = unit[v, i] / np.linalg.norm(unit[v, i])
            kind = generator.integers(5)
            other = generator.standard_normal(rank)
            other -= (other @ base) * base
            other /= np.linalg.norm(other)
            # cosine cos(theta): copy (exact), 1 - 0.5e-6 / 1 - 2e-6 either side of COPY, DEDUP +- 1e-4
            cosine = [1.0, 1 - 0.5e-6, 1 - 2e-6, DEDUP + 1e-4, DEDUP - 1e-4][kind]
            unit[v, i + 1] = cosine * base + math.sqrt(max(1 - cosine**2, 0.0)) * other
            if generator.random() < 0.3 and i + 2 < count:
                unit[v, i + 2] = unit[v, i + 1] * 3.0  # a third row along the same line
    unit /= np.linalg.norm(unit, axis=2, keepdims=True)
    unit[:, ::17] = 0.0  # rows whose L is zero
    return unit


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("thresholds", [(COPY, DEDUP), (0.9, 0.8), (1 - 1e-4, 0.999)])
def test_ranking_many_views_from_unit_vectors_equals_ranking_each(seed: int, thresholds: tuple[float, float]) -> None:
    """rank_by_units gives every view rank_by_similarity's answer on the float64 cosines of its usable rows,
    through the projection screen (high copy thresholds) and the all-pairs path (low ones)."""
    copy, dedup = thresholds
    generator = np.random.default_rng(seed)
    views, count = 6, 60
    unit = _planted_units(generator, views, count, 12)
    magnitude = generator.random((views, count)).round(1)  # ties in |gb| as well as in support
    usable = generator.random((views, count)) > 0.2
    usable[0] = False  # a view without a usable row
    limits = [1, 7, count, 3, 12, 5]
    answers = rank_by_units(unit, usable, magnitude, limits, copy, dedup)
    for v, (kept, support) in enumerate(answers):
        rows = np.flatnonzero(usable[v])
        similarity = unit[v][rows] @ unit[v][rows].T
        expected_kept, expected_support = (
            rank_by_similarity(similarity, magnitude[v, rows], limits[v], copy, dedup)
            if len(rows)
            else ([], np.zeros(0, dtype=np.int64))
        )
        assert kept == rows[expected_kept].tolist()
        assert np.array_equal(support, expected_support)
    # the planted copies are found: some view has a candidate repeated by another row
    assert max(int(support[0]) for kept, support in answers if kept) >= 2


@pytest.mark.parametrize("thresholds", [(1.0, 0.99), (COPY, 1.0), (COPY, -1.0)])
def test_ranking_from_unit_vectors_refuses_thresholds_decided_by_round_off(thresholds: tuple[float, float]) -> None:
    unit = np.eye(4)[None]
    with pytest.raises(ValueError, match="thresholds"):
        rank_by_units(unit, np.ones((1, 4), dtype=bool), np.ones((1, 4)), [2], *thresholds)
