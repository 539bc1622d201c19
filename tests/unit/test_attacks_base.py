"""``Attack.reconstruct_many``, the template around an attack's batched kernel: every view checked first, views
grouped by ``batch_key``, one kernel call per group, results in the views' order with their group's seconds."""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import pytest
import torch

from attacks import Attack, AttackerView, AttackNotApplicable, Reconstruction
from testbed.runtime.models import build_model
from tests.support.attacks import make_view, mnist_digits


class Echo(Attack):
    """Answers each view with its sample count; batches views by sample count when ``batched``."""

    name = "echo"

    def __init__(self, batched: bool) -> None:
        super().__init__()
        self.batched = batched
        self.calls: list[list[int]] = []

    def check(self, view: AttackerView) -> None:
        if view.num_samples > 3:
            raise AttackNotApplicable(f"echo: {view.num_samples} samples")

    def _reconstruct(self, view: AttackerView) -> Reconstruction:
        self.calls.append([view.num_samples])
        return Reconstruction(torch.full((1, 1), float(view.num_samples)), None)

    def batch_key(self, view: AttackerView) -> Hashable | None:
        return view.num_samples if self.batched else None

    def _reconstruct_batch(self, views: Sequence[AttackerView]) -> list[Reconstruction]:
        if not self.batched:
            return super()._reconstruct_batch(views)
        self.calls.append([view.num_samples for view in views])
        return [Reconstruction(torch.full((1, 1), float(view.num_samples)), None) for view in views]


def _views(counts: list[int]) -> list[AttackerView]:
    model = build_model("softmax", (1, 28, 28), 10, seed=0)
    views = []
    for count in counts:
        images, labels = mnist_digits(list(range(count)))
        views.append(make_view(model, images, labels))
    return views


@pytest.mark.parametrize("batched", [True, False])
def test_views_are_grouped_by_key_and_answered_in_order(batched: bool) -> None:
    attack = Echo(batched)
    results = attack.reconstruct_many(_views([1, 2, 1, 3, 2]))
    assert [float(result.images[0, 0]) for result in results] == [1, 2, 1, 3, 2]
    assert all(result.diagnostics["seconds"] >= 0 for result in results)
    if batched:
        assert attack.calls == [[1, 1], [2, 2], [3]]  # one kernel call per key, first-seen order
        assert results[0].diagnostics["seconds"] == results[2].diagnostics["seconds"]  # the group's share
    else:
        assert attack.calls == [[1], [2], [1], [3], [2]]  # no key: each view on its own


def test_every_view_is_checked_before_any_is_attacked() -> None:
    attack = Echo(batched=True)
    with pytest.raises(AttackNotApplicable, match="echo: 4 samples"):
        attack.reconstruct_many(_views([1, 4, 2]))
    assert attack.calls == []
