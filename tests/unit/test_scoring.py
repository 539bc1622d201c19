"""Joining attack outcomes with the ground truth: exact copies score as recovered, reasons are counted."""

from __future__ import annotations

import numpy as np
import torch

from attacks import Reconstruction
from testbed.audit import AuditOutcome
from testbed.scoring import score_outcomes


def test_outcomes_are_matched_with_their_own_clients_samples() -> None:
    rng = np.random.default_rng(0)
    train_x = rng.random((20, 1, 8, 8)).astype(np.float32)
    train_y = np.arange(20) % 10
    truth = {3: np.array([0, 1, 2]), 5: np.array([10, 11]), 7: np.array([4])}
    exact = torch.from_numpy(train_x[[2, 0, 1]])  # client 3's images, out of order
    noise = torch.from_numpy(rng.random((2, 1, 8, 8)).astype(np.float32))
    outcomes = [
        AuditOutcome(3, "g", 0, "root", Reconstruction(images=exact, labels=None), seconds=0.5),
        AuditOutcome(5, "g", 0, "root", Reconstruction(images=noise, labels=None), seconds=0.25),
        AuditOutcome(7, "g", 0, "root", None, not_applicable="no dense layer"),
        AuditOutcome(9, "g", 0, "root", Reconstruction(images=noise, labels=None)),  # no ground truth: skipped
    ]
    audit = score_outcomes(outcomes, truth, train_x, train_y, round_index=0, keep_images=1)
    assert [item.outcome.client for item in audit.scored] == [3, 5]
    first, second = audit.scored
    assert (first.result.assignment == [1, 2, 0]).all()
    np.testing.assert_allclose(first.result.scores["avd"], 0.0, atol=1e-12)
    assert (second.result.scores["avd"] > 0.3).all()
    assert audit.not_applicable == ["no dense layer"]
    assert audit.attack_seconds == 0.75
    assert first.outcome.reconstruction is not None and second.outcome.reconstruction is None  # keep_images=1
