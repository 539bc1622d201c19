"""Batching strategies: label rules, the short-of-samples rule, epoch coverage, determinism."""

from __future__ import annotations

import math

import numpy as np
import pytest

from defenses import DistinctLabels, IdenticalLabels, LabelCount, RandomBatching


def label_sets() -> dict[str, np.ndarray]:
    """Client label lists: balanced, Dirichlet-skewed, one dominant class, sparse ids, tiny."""
    rng = np.random.default_rng(123)
    skewed = rng.choice(10, size=150, p=rng.dirichlet(np.full(10, 0.3)))
    return {
        "balanced": np.repeat(np.arange(10), 20),
        "dirichlet": skewed.astype(np.int64),
        "dominant": np.repeat(np.arange(4), [90, 5, 3, 1]),
        "sparse-ids": np.repeat(np.array([3, 17, 42]), [12, 9, 30]),
        "tiny": np.array([5, 5, 2]),
    }


CASES = [(name, labels, b) for name, labels in label_sets().items() for b in (1, 4, 8, 16)]


def check_positions(plan_batches: list[np.ndarray], labels: np.ndarray, batch_size: int) -> None:
    """Every batch: int64 positions in range, no repeats, at most batch_size."""
    for batch in plan_batches:
        assert batch.dtype == np.int64
        assert len(batch) <= batch_size
        assert len(np.unique(batch)) == len(batch)
        assert batch.size == 0 or (batch.min() >= 0 and batch.max() < len(labels))


@pytest.mark.parametrize(("name", "labels", "batch_size"), CASES)
def test_identical_labels_one_label_per_batch(name: str, labels: np.ndarray, batch_size: int) -> None:
    counts = dict(zip(*np.unique(labels, return_counts=True), strict=True))
    for seed in range(15):
        for num_batches in (1, math.ceil(len(labels) / batch_size)):
            plan = IdenticalLabels().plan(labels, batch_size, num_batches, np.random.default_rng(seed))
            assert len(plan.batches) == num_batches
            check_positions(plan.batches, labels, batch_size)
            for batch in plan.batches:
                assert len(np.unique(labels[batch])) == 1
                # short rule: a batch is smaller only when its label has fewer samples than batch_size
                assert len(batch) == min(batch_size, counts[labels[batch[0]]])
            assert plan.short == sum(len(batch) < batch_size for batch in plan.batches)


@pytest.mark.parametrize(("name", "labels", "batch_size"), CASES)
def test_distinct_labels_all_different(name: str, labels: np.ndarray, batch_size: int) -> None:
    classes = len(np.unique(labels))
    for seed in range(15):
        num_batches = math.ceil(len(labels) / batch_size)
        plan = DistinctLabels().plan(labels, batch_size, num_batches, np.random.default_rng(seed))
        check_positions(plan.batches, labels, batch_size)
        for batch in plan.batches:
            assert len(np.unique(labels[batch])) == len(batch) == min(batch_size, classes)
        assert plan.short == (num_batches if batch_size > classes else 0)


@pytest.mark.parametrize("k", [1, 2, 3, 5])
@pytest.mark.parametrize(("name", "labels", "batch_size"), [c for c in CASES if c[2] >= 4])
def test_label_count_has_k_labels(name: str, labels: np.ndarray, batch_size: int, k: int) -> None:
    counts = dict(zip(*np.unique(labels, return_counts=True), strict=True))
    expected_labels = min(k, len(counts), batch_size)
    for seed in range(8):
        num_batches = math.ceil(len(labels) / batch_size)
        plan = LabelCount(k).plan(labels, batch_size, num_batches, np.random.default_rng(seed))
        check_positions(plan.batches, labels, batch_size)
        short = 0
        for batch in plan.batches:
            present, per_label = np.unique(labels[batch], return_counts=True)
            assert len(present) == expected_labels
            # slots are shared evenly: a label fills ceil/floor(b / k) unless it runs out of samples
            slots = batch_size // expected_labels
            for label, used in zip(present, per_label, strict=True):
                assert used in (min(slots, counts[label]), min(slots + 1, counts[label]))
            short += len(batch) < batch_size or expected_labels < k
        assert plan.short == short


def test_short_rule_shrinks_batch_of_scarce_label() -> None:
    labels = np.array([0] * 3 + [1] * 40)
    scarce = 0
    for seed in range(400):
        plan = IdenticalLabels().plan(labels, 8, 1, np.random.default_rng(seed))
        (batch,) = plan.batches
        if labels[batch[0]] == 0:
            scarce += 1
            assert sorted(batch.tolist()) == [0, 1, 2]
            assert plan.short == 1
        else:
            assert len(batch) == 8 and plan.short == 0
    # label 0 holds 3 of 43 samples, so it is drawn for about 7% of single batches
    assert 0.03 < scarce / 400 < 0.12


def test_distinct_labels_with_batch_larger_than_classes_takes_one_per_class() -> None:
    labels = np.repeat(np.arange(3), 10)
    plan = DistinctLabels().plan(labels, 8, 4, np.random.default_rng(0))
    assert [sorted(labels[b].tolist()) for b in plan.batches] == [[0, 1, 2]] * 4
    assert plan.short == 4


def test_label_count_with_too_few_classes_is_counted_short() -> None:
    labels = np.repeat(np.arange(2), 20)
    plan = LabelCount(3).plan(labels, 6, 5, np.random.default_rng(0))
    assert all(len(np.unique(labels[b])) == 2 and len(b) == 6 for b in plan.batches)
    assert plan.short == 5


def test_random_epoch_is_a_permutation_with_smaller_last_batch() -> None:
    labels = np.arange(43) % 7
    plan = RandomBatching().plan(labels, 8, math.ceil(43 / 8), np.random.default_rng(1))
    assert [len(b) for b in plan.batches] == [8, 8, 8, 8, 8, 3]
    assert sorted(np.concatenate(plan.batches).tolist()) == list(range(43))
    assert plan.short == 1


def test_random_single_batch_from_small_client_is_short() -> None:
    plan = RandomBatching().plan(np.zeros(5, dtype=np.int64), 8, 1, np.random.default_rng(0))
    assert sorted(plan.batches[0].tolist()) == [0, 1, 2, 3, 4] and plan.short == 1


def test_identical_labels_epoch_covers_samples_about_once() -> None:
    labels = np.repeat(np.arange(10), 24)  # every label fills whole batches
    num_batches = math.ceil(len(labels) / 8)
    for seed in range(20):
        plan = IdenticalLabels().plan(labels, 8, num_batches, np.random.default_rng(seed))
        uses = np.bincount(np.concatenate(plan.batches), minlength=len(labels))
        assert uses.max() == 1 and uses.min() == 1


def test_label_plans_cover_balanced_data_well_and_reuse_little() -> None:
    labels = np.repeat(np.arange(10), 20)
    num_batches = math.ceil(len(labels) / 8)
    for batching, least in [(IdenticalLabels(), 0.8), (LabelCount(2), 0.95), (DistinctLabels(), 0.95)]:
        coverage = []
        for seed in range(20):
            plan = batching.plan(labels, 8, num_batches, np.random.default_rng(seed))
            uses = np.bincount(np.concatenate(plan.batches), minlength=len(labels))
            assert uses.max() <= 2
            coverage.append((uses > 0).mean())
        assert min(coverage) >= least


@pytest.mark.parametrize("batching", [IdenticalLabels(), LabelCount(2), DistinctLabels()])
def test_many_passes_never_repeat_a_sample_within_a_batch(batching: IdenticalLabels) -> None:
    labels = np.repeat(np.arange(3), [9, 10, 11])
    for seed in range(30):
        plan = batching.plan(labels, 8, 25, np.random.default_rng(seed))
        check_positions(plan.batches, labels, 8)
        uses = np.bincount(np.concatenate(plan.batches), minlength=len(labels))
        per_label = [uses[labels == c] for c in range(3)]
        # streams of permutations spread the reuse: usage within a label differs by at most 2
        assert all(u.max() - u.min() <= 2 for u in per_label)


def test_identical_labels_single_batch_label_frequency_follows_counts() -> None:
    labels = np.repeat(np.arange(3), [10, 30, 60])
    drawn = np.zeros(3)
    for seed in range(3000):
        (batch,) = IdenticalLabels().plan(labels, 4, 1, np.random.default_rng(seed)).batches
        drawn[labels[batch[0]]] += 1
    np.testing.assert_allclose(drawn / drawn.sum(), [0.1, 0.3, 0.6], atol=0.03)


@pytest.mark.parametrize("batching", [RandomBatching(), IdenticalLabels(), DistinctLabels(), LabelCount(3)])
def test_plans_are_deterministic_given_the_generator(batching: RandomBatching) -> None:
    labels = label_sets()["dirichlet"]
    first = batching.plan(labels, 8, 5, np.random.default_rng(7))
    again = batching.plan(labels, 8, 5, np.random.default_rng(7))
    other = batching.plan(labels, 8, 5, np.random.default_rng(8))
    assert all(np.array_equal(a, b) for a, b in zip(first.batches, again.batches, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(first.batches, other.batches, strict=True))


@pytest.mark.parametrize("batching", [RandomBatching(), IdenticalLabels(), DistinctLabels(), LabelCount(2)])
def test_empty_client_and_zero_batches(batching: RandomBatching) -> None:
    empty = batching.plan(np.zeros(0, dtype=np.int64), 4, 3, np.random.default_rng(0))
    assert [len(b) for b in empty.batches] == [0, 0, 0] and empty.short == 3
    none = batching.plan(np.arange(5), 4, 0, np.random.default_rng(0))
    assert none.batches == [] and none.short == 0


@pytest.mark.parametrize(("batch_size", "num_batches"), [(0, 1), (4, -1)])
def test_invalid_plan_arguments_raise(batch_size: int, num_batches: int) -> None:
    with pytest.raises(ValueError, match="must be"):
        IdenticalLabels().plan(np.arange(5), batch_size, num_batches, np.random.default_rng(0))


def test_identical_labels_min_batch_leaves_out_labels_too_small_to_fill_it() -> None:
    from defenses.batching import IdenticalLabels

    labels = np.array([0] * 3 + [1] * 10 + [2] * 1)
    rng = np.random.default_rng(0)
    plain = IdenticalLabels().plan(labels, batch_size=8, num_batches=20, rng=rng)
    assert min(len(batch) for batch in plain.batches) < 4  # labels 0 and 2 give batches of 3 and 1
    kept = IdenticalLabels(min_batch=4).plan(labels, batch_size=8, num_batches=20, rng=np.random.default_rng(0))
    assert all(len(batch) >= 4 for batch in kept.batches)
    assert all(set(labels[batch]) == {1} for batch in kept.batches)  # only label 1 has 4 or more samples
    assert all(len(set(batch.tolist())) == len(batch) for batch in kept.batches)
    nothing = IdenticalLabels(min_batch=11).plan(labels, batch_size=16, num_batches=2, rng=np.random.default_rng(0))
    assert [len(batch) for batch in nothing.batches] == [0, 0] and nothing.short == 2
    with pytest.raises(ValueError, match="min_batch"):
        IdenticalLabels(min_batch=0)


def test_identical_labels_min_batch_from_a_spec() -> None:
    from defenses import build_policy

    policy = build_policy({"batching": {"identical-labels": {"min_batch": 4}}})
    assert policy.batching.describe() == {"name": "identical-labels", "min_batch": 4}
    assert build_policy({"batching": {"identical-labels": 2}}).batching.describe()["min_batch"] == 2
