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
from metrics.baselines import BaselineCache, ClassPrototypes, recovered_beyond
from testbed.audit.outcome import AuditOutcome
from testbed.audit.priority import lower_priority

log = logging.getLogger(__name__)

MATCH_BLOCK = 4  # clients matched per vectorised pass: small blocks keep the image maps in cache


@dataclasses.dataclass
class ScoredClient:
    """One audited client's sample indices, matched reconstructions and scores, for one attack.

    ``baselines`` holds, per no-information baseline and metric, the baseline's score against each of
    the client's originals; ``flags`` says which samples were recovered beyond every baseline
    (metrics.recovered_beyond). ``labels_exact`` is whether the inferred labels equal the true label
    histogram (None when the attack inferred none). ``best_ssim`` is set on a worst case over several
    attacks: per sample, the highest SSIM any attack reached (None: the client's own SSIM).
    """

    outcome: AuditOutcome  # its reconstruction is dropped unless kept for an image grid
    sample_indices: np.ndarray
    result: MatchResult
    label_accuracy: float | None
    baselines: dict[str, dict[str, np.ndarray]] = dataclasses.field(default_factory=dict)
    flags: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, dtype=bool))
    labels_exact: bool | None = None
    best_ssim: np.ndarray | None = None

    def ssim_best(self) -> np.ndarray:
        """Per sample, the best SSIM over the attacks behind this client (its own SSIM for one attack)."""
        return self.result.scores["ssim"] if self.best_ssim is None else self.best_ssim


@dataclasses.dataclass
class ScoredAudit:
    """What scoring one attack task gives back: the scored clients and the outcomes' bookkeeping."""

    round: int
    scored: list[ScoredClient]
    not_applicable: list[tuple[str, str, str]]  # (group, attack, reason) per outcome an attack could not run on
    attack_seconds: float


def score_outcomes(
    outcomes: Sequence[AuditOutcome],
    truth: Mapping[int, np.ndarray],
    train_x: np.ndarray,
    train_y: np.ndarray,
    round_index: int,
    keep_images: int = 0,
    baselines: BaselineCache | None = None,
) -> ScoredAudit:
    """Match every outcome with the originals behind it; keep the reconstructions of the first ``keep_images``
    clients (of every attack, so a grid can show each client's worst case).

    With ``baselines`` (drawn from a held-out split), each sample is also scored against the no-information
    baselines (once per sample and scorer: ``BaselineCache``), and ``flags`` marks the samples recovered beyond
    them; without, ``flags`` is the plain threshold rule.
    """
    found: list[tuple[AuditOutcome, np.ndarray]] = []
    reasons: list[tuple[str, str, str]] = []
    for outcome in outcomes:
        indices = truth.get(outcome.client)
        if outcome.reconstruction is None or indices is None:
            if outcome.not_applicable:
                reasons.append((outcome.group, outcome.attack, outcome.not_applicable))
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
    shown = list(dict.fromkeys(outcome.client for outcome, _ in found))[:keep_images]  # every attack's images
    scored = []
    for (outcome, indices), result in zip(found, results, strict=True):
        reconstruction = outcome.reconstruction
        assert reconstruction is not None
        labels, exact = None, None
        if reconstruction.labels is not None:
            inferred = reconstruction.labels.cpu().numpy()
            labels = label_accuracy(train_y[indices], inferred)
            exact = bool(np.array_equal(np.sort(train_y[indices]), np.sort(inferred.astype(train_y.dtype))))
        known = baselines.scores(indices) if baselines is not None else {}
        flags = recovered_beyond(result.scores, known)
        kept = outcome if outcome.client in shown else dataclasses.replace(outcome, reconstruction=None)
        scored.append(ScoredClient(kept, indices, result, labels, known, flags, exact))
    return ScoredAudit(round_index, scored, reasons, float(sum(o.seconds for o in outcomes)))


class LeakageScorer:
    """An actor holding the training set (and a held-out split for the baselines) that scores attack outcomes.

    ``held_out`` holds ``x`` and ``y`` of the held-out split; the class means and random class images of
    the no-information baselines come from it, never from the clients' training data.
    """

    def __init__(
        self, data: dict[str, Any], nice: int, keep_images: int, held_out: dict[str, Any] | None = None, seed: int = 0
    ) -> None:
        lower_priority(nice)
        self.train_x = np.asarray(data["x"])
        self.train_y = np.asarray(data["y"])
        self.keep_images = keep_images
        self.baselines = (
            BaselineCache(ClassPrototypes(held_out["x"], held_out["y"]), self.train_x, self.train_y, seed)
            if held_out is not None
            else None
        )

    def score(self, outcomes: list[AuditOutcome], truth: dict[int, np.ndarray], round_index: int) -> ScoredAudit:
        """Score one attack task's outcomes (Ray resolves both arguments before the call)."""
        return score_outcomes(
            outcomes, truth, self.train_x, self.train_y, round_index, self.keep_images, self.baselines
        )
