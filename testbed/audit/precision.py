"""Audits sized by a precision target: the interval of each group's recovered fraction per window of rounds.

With ``attack.audit.target_half_width`` the unit is the audited update: within a round the global model
is fixed and the audited clients are drawn at random from the group's sampled clients, so each audited
update's recovered fraction (the share of its samples recovered, the worst case over the attacks) is a
draw from that round's population. A window's observations are its rounds' audited updates, in round
order and within a round by client id; ``metrics.betting_confidence_sequence`` turns them into a 95%
confidence sequence, valid whenever one stops looking, which is what the scheduler does: a group is
audited until its interval is at most ``2 * target_half_width`` wide, then not again in the window.

Decisions are deterministic: round ``r`` asks ``settled(r)``, which reads only what the audits of rounds up
to ``r - lag`` gave (``lag`` is ``attack.audit.backlog``; the engine waits for those rounds first), never
what happens to have arrived since.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from metrics import betting_confidence_sequence
from testbed.audit.worst_case import WorstCase


@dataclass(frozen=True)
class WindowInterval:
    """A group's interval in one window after the audits logged so far."""

    window: int
    audited: int
    low: float
    high: float

    @property
    def half_width(self) -> float:
        """Half the interval's width."""
        return (self.high - self.low) / 2


class PrecisionTarget:
    """Per group and window: the audited updates' recovered fractions, and the round their interval met the
    target (``reached``)."""

    def __init__(self, target: float, window: int, lag: int, groups: Sequence[str]) -> None:
        self.target = target
        self.window = window
        self.lag = lag
        self.groups = set(groups)
        self.observed: dict[str, dict[int, list[float]]] = {}  # group -> window -> fractions, in audit order
        self.reached: dict[str, dict[int, int]] = {}  # group -> window -> round whose audits met the target

    def observe(self, round_index: int, cases: Sequence[WorstCase]) -> dict[str, float]:
        """Add a logged round's audited updates (rounds come in order); the metrics of each group audited in it:
        ``leakage/<group>/recovered_ci_low``, ``..._high``, ``..._half_width``, ``audit/<group>/audited_in_window``."""
        window = round_index // self.window
        fresh: dict[str, list[tuple[int, float]]] = {}
        for case in cases:
            group = case.client.outcome.group
            if group in self.groups and case.client.result.n:
                fresh.setdefault(group, []).append((case.client.outcome.client, float(np.mean(case.client.flags))))
        metrics: dict[str, float] = {}
        for group in sorted(fresh):
            values = self.observed.setdefault(group, {}).setdefault(window, [])
            values += [fraction for _, fraction in sorted(fresh[group])]
            interval = self.interval(group, window)
            if interval.half_width <= self.target:
                self.reached.setdefault(group, {}).setdefault(window, round_index)
            metrics[f"leakage/{group}/recovered_ci_low"] = interval.low
            metrics[f"leakage/{group}/recovered_ci_high"] = interval.high
            metrics[f"leakage/{group}/recovered_ci_half_width"] = interval.half_width
            metrics[f"audit/{group}/audited_in_window"] = float(interval.audited)
        return metrics

    def interval(self, group: str, window: int) -> WindowInterval:
        """The group's 95% interval in ``window`` from every audit logged there so far."""
        values = np.asarray(self.observed.get(group, {}).get(window, []), dtype=np.float64)
        if not len(values):
            return WindowInterval(window, 0, 0.0, 1.0)
        low, high = betting_confidence_sequence(values)
        return WindowInterval(window, len(values), float(low[-1]), float(high[-1]))

    def settled(self, round_index: int) -> frozenset[str]:
        """Groups not to audit in round ``round_index``: their interval in its window met the target with the
        audits of rounds up to ``round_index - lag``."""
        window = round_index // self.window
        limit = round_index - self.lag
        return frozenset(
            group for group, by_window in self.reached.items() if by_window.get(window, limit + 1) <= limit
        )

    def latest(self) -> dict[str, list[WindowInterval]]:
        """Every group's interval in every window it was audited in, windows in order."""
        return {
            group: [self.interval(group, window) for window in sorted(self.observed[group])]
            for group in sorted(self.observed)
        }

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps: the observations and the rounds the target was met."""
        return {
            "observed": {g: {str(w): list(v) for w, v in by.items()} for g, by in self.observed.items()},
            "reached": {g: {str(w): r for w, r in by.items()} for g, by in self.reached.items()},
        }

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint's state (empty for runs checkpointed without a target)."""
        self.observed = {g: {int(w): list(v) for w, v in by.items()} for g, by in state.get("observed", {}).items()}
        self.reached = {g: {int(w): int(r) for w, r in by.items()} for g, by in state.get("reached", {}).items()}
