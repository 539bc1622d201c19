"""A round's client counts, overall and per group, from the chunk summaries the workers return."""

from __future__ import annotations

from testbed.config.schema import Experiment
from testbed.runtime.records import ChunkSummary


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
