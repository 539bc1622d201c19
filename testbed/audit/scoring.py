"""Scoring audits: joining an attack's reconstructions with the ground truth, away from the driver.

The attack actor never sees client data; the simulator keeps the sample indices behind every audited
update. ``score_outcomes`` joins the two once the attack has returned: it matches each client's
reconstructions with its originals (AVD assignment, all four metrics). ``LeakageScorer`` is the actor
that does this for a run, beside the attack actors and at their CPU priority, so neither the attacks
nor their scoring hold up the driver between rounds. Only the scores travel back, and the
reconstructions of the few clients a round's image grid shows.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from metrics import MatchResult, label_accuracy, match_many
from testbed.audit.outcome import AuditOutcome
from testbed.audit.priority import lower_priority

log = logging.getLogger(__name__)

MATCH_BLOCK = 4  # clients matched per vectorised pass: small blocks keep the image maps in cache


@dataclasses.dataclass
class ScoredClient:
    """One audited client's sample indices, matched reconstructions and scores."""

    outcome: AuditOutcome  # its reconstruction is dropped unless kept for an image grid
    sample_indices: np.ndarray
    result: MatchResult
    label_accuracy: float | None


@dataclasses.dataclass
class ScoredAudit:
    """What scoring one attack task gives back: the scored clients and the outcomes' bookkeeping."""

    round: int
    scored: list[ScoredClient]
    not_applicable: list[str]  # one reason per outcome the attack could not run on
    attack_seconds: float


def score_outcomes(
    outcomes: Sequence[AuditOutcome],
    truth: Mapping[int, np.ndarray],
    train_x: np.ndarray,
    train_y: np.ndarray,
    round_index: int,
    keep_images: int = 0,
) -> ScoredAudit:
    """Match every outcome with the originals behind it; keep the reconstructions of the first ``keep_images``."""
    found: list[tuple[AuditOutcome, np.ndarray]] = []
    reasons: list[str] = []
    for outcome in outcomes:
        indices = truth.get(outcome.client)
        if outcome.reconstruction is None or indices is None:
            if outcome.not_applicable:
                reasons.append(outcome.not_applicable)
            continue
        found.append((outcome, indices))
    shape = train_x.shape[1:]
    batches = [
        (train_x[indices], outcome.reconstruction.images.detach().cpu().numpy().reshape(-1, *shape))
        for outcome, indices in found
        if outcome.reconstruction is not None
    ]
    results = [
        result
        for start in range(0, len(batches), MATCH_BLOCK)
        for result in match_many(batches[start : start + MATCH_BLOCK])
    ]
    scored = []
    for position, ((outcome, indices), result) in enumerate(zip(found, results, strict=True)):
        reconstruction = outcome.reconstruction
        assert reconstruction is not None
        labels = None
        if reconstruction.labels is not None:
            labels = label_accuracy(train_y[indices], reconstruction.labels.cpu().numpy())
        kept = outcome if position < keep_images else dataclasses.replace(outcome, reconstruction=None)
        scored.append(ScoredClient(kept, indices, result, labels))
    return ScoredAudit(round_index, scored, reasons, float(sum(o.seconds for o in outcomes)))


class LeakageScorer:
    """An actor holding the training set that scores attack outcomes against the simulator's ground truth."""

    def __init__(self, data: dict[str, Any], nice: int, keep_images: int) -> None:
        lower_priority(nice)
        self.train_x = np.asarray(data["x"])
        self.train_y = np.asarray(data["y"])
        self.keep_images = keep_images

    def score(self, outcomes: list[AuditOutcome], truth: dict[int, np.ndarray], round_index: int) -> ScoredAudit:
        """Score one attack task's outcomes (Ray resolves both arguments before the call)."""
        return score_outcomes(outcomes, truth, self.train_x, self.train_y, round_index, self.keep_images)
