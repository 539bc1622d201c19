"""The audit queue: hands attack outcomes to the scorer actors and takes the scored audits back.

``AuditQueue`` sends each attack task's outcome to a ``LeakageScorer`` (in turn), keeps the backlog of
audited rounds still out, waits for the oldest when asked, and hands each round whose every scoring
task is back to its ``on_round`` callback, the round's audits in send order, once, and rounds in
round order (a round done early waits for the earlier ones), so what is logged never depends on
timing. It knows nothing of metrics or MLflow: that is the leakage log's part (testbed.audit.leakage).
``make_room`` applies ``attack.audit.backlog`` and ``when_busy`` before an audited round.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np

from testbed.audit.scoring import ScoredAudit
from testbed.config.schema import AuditConfig

log = logging.getLogger(__name__)

RoundHandler = Callable[[int, list[ScoredAudit], int], None]
"""Called with (round index, the round's scored audits in send order, its failed audit tasks)."""


class AuditQueue:
    """Scoring tasks in flight and the audits back from them, released a whole round at a time."""

    def __init__(self, scorers: Any, on_round: RoundHandler) -> None:
        self.scorers = list(scorers) if isinstance(scorers, (list, tuple)) else [scorers]
        self.on_round = on_round
        self.sent = 0  # scoring tasks sent so far: each task's place, so a round logs in the same order always
        self.pending: dict[Any, tuple[int, int]] = {}  # scoring task -> (its round, its place)
        self.outstanding: dict[int, int] = defaultdict(int)  # round -> scoring tasks not yet back
        self.arrived: dict[int, list[tuple[int, ScoredAudit]]] = defaultdict(list)  # round -> (place, audit)
        self.failed = 0  # audit tasks that raised (their clients are not scored; logged as audit/failed_tasks)
        self.failed_in: dict[int, int] = defaultdict(int)

    def expect(self, round_index: int, ground_truth: dict[int, np.ndarray], outcome_refs: Sequence[Any]) -> None:
        """Send a round's attack outcomes to the scorers (in turn) with the ground truth (client -> sample indices)."""
        if not outcome_refs:
            return
        import ray

        truth_ref = ray.put(ground_truth)
        for ref in outcome_refs:
            scorer = self.scorers[self.sent % len(self.scorers)]
            self.pending[scorer.score.remote(ref, truth_ref, round_index)] = (round_index, self.sent)
            self.sent += 1
            self.outstanding[round_index] += 1

    def collect(self, *, wait: bool) -> None:
        """Take the scored audits that are back (all of them when ``wait``); release every completed round."""
        import ray

        if not self.pending:
            return
        ready, _ = ray.wait(list(self.pending), num_returns=len(self.pending), timeout=None if wait else 0)
        for ref in ready:
            round_index, place = self.pending.pop(ref)
            self.outstanding[round_index] -= 1
            try:
                self.arrived[round_index].append((place, ray.get(ref)))
            except ray.exceptions.RayError as exc:
                self.failed += 1
                self.failed_in[round_index] += 1
                lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
                cause = lines[-1] if lines else type(exc).__name__  # Ray puts the task's own error last
                log.warning("round %d: an audit task failed and its clients are not scored: %s", round_index + 1, cause)
        busy = [r for r, count in self.outstanding.items() if count > 0]
        first_busy = min(busy) if busy else None
        for round_index in sorted(r for r, count in self.outstanding.items() if count == 0):
            if first_busy is not None and round_index > first_busy:
                break  # released in round order: a round waits for every earlier audited round
            del self.outstanding[round_index]
            audits = [audit for _, audit in sorted(self.arrived.pop(round_index, []), key=lambda pair: pair[0])]
            self.on_round(round_index, audits, self.failed_in.pop(round_index, 0))

    def busy_rounds(self) -> int:
        """Audited rounds whose scores are not all back yet."""
        return sum(1 for count in self.outstanding.values() if count > 0)

    def wait_below(self, limit: int) -> None:
        """Wait for the oldest audited rounds until fewer than ``limit`` are still busy."""
        import ray

        while self.busy_rounds() >= limit:
            oldest = min(r for r, count in self.outstanding.items() if count > 0)
            mine = [ref for ref, (r, _) in self.pending.items() if r == oldest]
            ray.wait(mine, num_returns=self.outstanding[oldest])
            self.collect(wait=False)

    def wait_through(self, round_index: int) -> None:
        """Wait until every audited round up to ``round_index`` is back and released."""
        import ray

        while any(r <= round_index for r in self.outstanding):
            oldest = min(self.outstanding)
            mine = [ref for ref, (r, _) in self.pending.items() if r == oldest]
            if mine:
                ray.wait(mine, num_returns=len(mine))
            self.collect(wait=False)


class Backlog(Protocol):
    """What ``make_room`` needs of a queue."""

    def busy_rounds(self) -> int:
        """Audited rounds still out."""

    def wait_below(self, limit: int) -> None:
        """Wait until fewer than ``limit`` are out."""


def make_room(queue: Backlog, audit: AuditConfig, clients: int) -> tuple[float, int]:
    """Keep the audit backlog bounded before an audited round: (seconds waited, clients not audited)."""
    if queue.busy_rounds() < audit.backlog:
        return 0.0, 0
    if audit.when_busy == "skip":
        return 0.0, clients
    started = time.perf_counter()
    queue.wait_below(audit.backlog)
    return time.perf_counter() - started, 0
