"""ce-demix and cocktail-party batched over several updates answer as they do one update at a time."""

from __future__ import annotations

import pytest
import torch

from attacks import AttackerView, build_attack
from testbed.runtime.models import build_model
from tests.support.attacks import make_view, mnist_digits

SHAPE = (1, 28, 28)
IMAGE_TOLERANCE = 1e-4
"""Largest pixel difference allowed between a batched and a one-update answer (images lie in [0, 1]). Measured
on this machine: none (bit-identical); the margin is for BLAS builds that sum batched products in another order."""


def _views(batch: int, count: int) -> list[AttackerView]:
    views = []
    for offset in range(count):
        labels = [(3 * offset + position) % 10 for position in range(batch)]
        images, targets = mnist_digits(labels, offset=offset)
        model = build_model("mlp", SHAPE, 10, hidden=(64,), activation="sigmoid", seed=offset)
        views.append(make_view(model, images, targets))
    return views


def _assert_batched_equals_single(name: str, views: list[AttackerView], params: dict[str, object]) -> None:
    attack = build_attack(name, params)
    batched = attack.reconstruct_many(views)
    for view, together in zip(views, batched, strict=True):
        alone = attack.reconstruct(view)
        assert together.images.shape == alone.images.shape
        assert float((together.images - alone.images).abs().max()) <= IMAGE_TOLERANCE
        if alone.labels is not None:
            assert together.labels is not None and torch.equal(together.labels, alone.labels)


def test_ce_demix_batched_over_updates_equals_one_at_a_time() -> None:
    _assert_batched_equals_single("ce-demix", _views(4, 3), {})


@pytest.mark.slow  # over 10 s on two shared cores: make test runs it, make quick does not
def test_cocktail_party_batched_over_updates_equals_one_at_a_time() -> None:
    _assert_batched_equals_single("cocktail-party", _views(4, 3), {"iterations": 200})
