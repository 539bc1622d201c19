"""Batching strategies: how a client cuts its samples into local batches.

Rule for a client short of samples (every strategy): a batch never holds the same sample twice and
never breaks its label rule. When the client lacks the samples to fill a batch that way, the batch is
smaller than ``batch_size``; ``BatchPlan.short`` counts such batches (and, for ``label-count``, batches
with fewer than ``k`` labels).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from defenses.errors import ParameterError
from defenses.label_plans import plan_label_groups, plan_shuffled
from defenses.parts import Part
from defenses.registry import Registry


@dataclass(frozen=True)
class BatchPlan:
    """A client's local batches as positions into its sample list, and how many fell short."""

    batches: list[np.ndarray]
    short: int


class Batching(Part, abc.ABC):
    """A strategy that plans a client's local batches from its sample labels."""

    @abc.abstractmethod
    def plan(
        self, labels: np.ndarray, batch_size: int, num_batches: int, rng: np.random.Generator
    ) -> BatchPlan:
        """Plan ``num_batches`` batches of at most ``batch_size`` positions into ``labels``, from ``rng``."""


BATCHINGS: Registry[Batching] = Registry("batching", Batching)


def _check_plan_arguments(labels: np.ndarray, batch_size: int, num_batches: int) -> None:
    """Reject calls no strategy can serve (these are programming errors, not user input)."""
    if labels.ndim != 1:
        raise ValueError(f"labels must be one-dimensional, got shape {labels.shape}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_batches < 0:
        raise ValueError(f"num_batches must be >= 0, got {num_batches}")


@BATCHINGS.add
@dataclass(frozen=True)
class RandomBatching(Batching):
    """Shuffled batches regardless of labels, like a shuffling data loader.

    One pass over the data is a random permutation cut into ``ceil(n / batch_size)`` batches; the last
    batch of a pass holds the leftover samples and counts as short when smaller than ``batch_size``.
    With ``num_batches = ceil(n / batch_size)`` every sample is used exactly once.
    """

    name: ClassVar[str] = "random"

    def plan(
        self, labels: np.ndarray, batch_size: int, num_batches: int, rng: np.random.Generator
    ) -> BatchPlan:
        """Cut successive random permutations of the client's samples into batches."""
        _check_plan_arguments(labels, batch_size, num_batches)
        batches = plan_shuffled(len(labels), batch_size, num_batches, rng)
        return BatchPlan(batches, sum(len(batch) < batch_size for batch in batches))


def _label_plan(
    labels: np.ndarray,
    batch_size: int,
    num_batches: int,
    labels_per_batch: int,
    rng: np.random.Generator,
    per_label_cap: int | None = None,
) -> BatchPlan:
    """A plan whose batches each hold ``labels_per_batch`` different labels (see ``plan_label_groups``)."""
    _check_plan_arguments(labels, batch_size, num_batches)
    batches, short = plan_label_groups(labels, batch_size, num_batches, labels_per_batch, rng, per_label_cap)
    return BatchPlan(batches, int(short.sum()))


@BATCHINGS.add
@dataclass(frozen=True)
class IdenticalLabels(Batching):
    """Every batch draws all its samples from one label (the mixing strategy of Eloul et al. 2022).

    A label is chosen for about as many batches as its samples fill; a label with fewer than
    ``batch_size`` samples gives a smaller (short) batch of all its samples. ``min_batch`` keeps every
    batch at least that large: a client's labels with fewer samples are left out of its batches (those
    samples are not trained on), and a client with no such label sends no update. A single-sample batch
    is recovered exactly by the row-ratio attack, so short batches are where this strategy leaks most.
    """

    name: ClassVar[str] = "identical-labels"
    main_parameter: ClassVar[str | None] = "min_batch"

    min_batch: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.min_batch, bool) or not isinstance(self.min_batch, int) or self.min_batch < 1:
            raise ParameterError("min_batch", "an integer >= 1", self.min_batch)

    def parameters(self) -> dict[str, Any]:
        """``min_batch`` only when set: the plain strategy describes (and is labelled) as before it existed."""
        return {"min_batch": self.min_batch} if self.min_batch != 1 else {}

    def plan(
        self, labels: np.ndarray, batch_size: int, num_batches: int, rng: np.random.Generator
    ) -> BatchPlan:
        """Plan single-label batches of at least ``min_batch`` samples."""
        if self.min_batch <= 1:
            return _label_plan(labels, batch_size, num_batches, 1, rng)
        _check_plan_arguments(labels, batch_size, num_batches)
        values, counts = np.unique(labels, return_counts=True)
        kept = np.flatnonzero(np.isin(labels, values[counts >= min(self.min_batch, batch_size)]))
        if len(kept) == 0:
            return BatchPlan([np.zeros(0, dtype=np.int64) for _ in range(num_batches)], num_batches)
        plan = _label_plan(labels[kept], batch_size, num_batches, 1, rng)
        return BatchPlan([kept[batch] for batch in plan.batches], plan.short)


@BATCHINGS.add
@dataclass(frozen=True)
class DistinctLabels(Batching):
    """Every batch holds samples of all-different labels (the worst case for cross-entropy de-mixing).

    When ``batch_size`` exceeds the number of classes the client holds, each batch has one sample of
    every class it holds and is smaller than ``batch_size`` (counted as short).
    """

    name: ClassVar[str] = "distinct-labels"

    def plan(
        self, labels: np.ndarray, batch_size: int, num_batches: int, rng: np.random.Generator
    ) -> BatchPlan:
        """Plan batches with one sample per label."""
        return _label_plan(labels, batch_size, num_batches, batch_size, rng, per_label_cap=1)


@BATCHINGS.add
@dataclass(frozen=True)
class LabelCount(Batching):
    """Every batch holds exactly ``k`` different labels, its slots shared as evenly as possible.

    With fewer than ``k`` classes at the client (or ``batch_size < k``) a batch takes as many labels as
    it can and is counted as short; so is a batch shrunk because a label ran out of samples.
    """

    name: ClassVar[str] = "label-count"
    main_parameter: ClassVar[str | None] = "k"

    k: int = 2

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ParameterError("k", "an integer >= 1", self.k)

    def plan(
        self, labels: np.ndarray, batch_size: int, num_batches: int, rng: np.random.Generator
    ) -> BatchPlan:
        """Plan batches with ``k`` labels each."""
        return _label_plan(labels, batch_size, num_batches, self.k, rng)
