"""Joining attack outcomes with the ground truth: exact copies score as recovered, reasons are counted."""

from __future__ import annotations

import numpy as np
import torch

from attacks import Reconstruction
from testbed.audit.outcome import AuditOutcome
from testbed.audit.scoring import score_outcomes


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
    assert audit.not_applicable == [("g", "", "no dense layer")]  # (group, attack, reason)
    assert audit.attack_seconds == 0.75
    assert first.outcome.reconstruction is not None and second.outcome.reconstruction is None  # keep_images=1


class _Meter:
    """An audit queue's backlog as make_room sees it."""

    def __init__(self, busy: int) -> None:
        self.busy = busy
        self.waited_for: list[int] = []

    def busy_rounds(self) -> int:
        return self.busy

    def wait_below(self, limit: int) -> None:
        self.waited_for.append(limit)
        self.busy = limit - 1


def test_a_full_backlog_waits_or_skips_as_configured() -> None:
    from testbed.audit.queue import make_room
    from testbed.config.schema import AuditConfig

    room = _Meter(busy=1)
    assert make_room(room, AuditConfig(backlog=2), 40) == (0.0, 0) and room.waited_for == []
    full = _Meter(busy=2)
    seconds, skipped = make_room(full, AuditConfig(backlog=2, when_busy="wait"), 40)
    assert skipped == 0 and seconds >= 0.0 and full.waited_for == [2] and full.busy == 1
    busy = _Meter(busy=3)
    assert make_room(busy, AuditConfig(backlog=2, when_busy="skip"), 40) == (0.0, 40) and busy.waited_for == []
