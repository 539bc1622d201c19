"""A round's client counts, overall and per group, from the chunk summaries the workers return; and the
privacy spent so far by every DP-SGD group.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from defenses import DPSGD, build_policy, sample_rate
from testbed.config.schema import Experiment
from testbed.runtime.dp_update import dp_local_steps
from testbed.runtime.records import ChunkSummary
from testbed.runtime.scheduling import group_bounds


def round_metrics(summaries: list[ChunkSummary], experiment: Experiment) -> dict[str, float]:
    """Sampled, accepted, dropped, late, rejected (by reason) and short batches, overall and per group."""
    metrics: dict[str, float] = {}
    for group in experiment.clients:
        mine = [s for s in summaries if s.group == group.group]
        prefix = f"clients/{group.group}/"
        metrics[prefix + "sampled"] = sum(s.sampled for s in mine)
        metrics[prefix + "accepted"] = sum(s.accepted for s in mine)
        metrics[prefix + "dropped"] = sum(s.dropped for s in mine)
        metrics[prefix + "late"] = sum(s.late for s in mine)
        metrics[prefix + "short_batches"] = sum(s.short_batches for s in mine)
        for reason in mine[0].rejected if mine else ():
            metrics[prefix + f"rejected_{reason}"] = sum(s.rejected[reason] for s in mine)
    for key in ("sampled", "accepted", "dropped", "late"):
        metrics[key] = sum(getattr(s, key) for s in summaries)
    metrics["rejected"] = sum(sum(s.rejected.values()) for s in summaries)
    metrics["simulated_delay_s"] = max((s.max_delay_s for s in summaries), default=0.0)
    return metrics


@dataclass(frozen=True)
class GroupPrivacy:
    """A DP-SGD group's accounting: its settings and the (sample rate, steps per round) pairs that can be worst.

    Epsilon grows with both the sample rate and the number of steps, so ``regimes`` keeps, of the group's
    clients, only the pairs no other client exceeds in both.
    """

    group: str
    dp: DPSGD
    regimes: tuple[tuple[float, int], ...]

    def metrics(self, rounds: int) -> dict[str, float]:
        """Epsilon at ``delta`` after ``rounds`` rounds for the worst client that took part in every one of them."""
        spent = [(self.dp.epsilon(rate, rounds * steps), rate, rounds * steps) for rate, steps in self.regimes]
        worst, rate, steps = max(spent)
        prefix = f"privacy/{self.group}/"
        return {
            prefix + "epsilon": worst,
            prefix + "delta": self.dp.delta,
            prefix + "sample_rate": rate,
            prefix + "steps": float(steps),
            prefix + "noise_multiplier": self.dp.noise_multiplier,
        }


def privacy_plan(experiment: Experiment, sizes: np.ndarray) -> list[GroupPrivacy]:
    """The accounting of every DP-SGD group, from the number of examples each client holds."""
    bounds = group_bounds(experiment)
    plan = []
    for index, group in enumerate(experiment.clients):
        dp = build_policy(group.defence).dp
        if dp is None:
            continue
        held = sizes[bounds[index] : bounds[index + 1]]
        worst: dict[int, float] = {}
        for samples in np.unique(held).tolist():
            steps = dp_local_steps(experiment.algorithm, samples, group.batch_size)
            worst[steps] = max(worst.get(steps, 0.0), sample_rate(samples, group.batch_size))
        regimes: list[tuple[float, int]] = []
        for steps, rate in sorted(worst.items(), reverse=True):  # a pair with more steps and as high a rate wins
            if not regimes or rate > regimes[-1][0]:
                regimes.append((rate, steps))
        plan.append(GroupPrivacy(group.group, dp, tuple(regimes)))
    return plan


def privacy_metrics(plan: list[GroupPrivacy], rounds: int) -> dict[str, float]:
    """``privacy/<group>/...`` of every DP-SGD group after ``rounds`` rounds."""
    metrics: dict[str, float] = {}
    for group in plan:
        metrics.update(group.metrics(rounds))
    return metrics
