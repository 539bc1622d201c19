"""What a study's answer cost: attack seconds per audited update and training seconds, per arm.

Read from the study's own tables (``audits.csv``: ``attack_seconds`` is the wall time of the audit call divided
over its updates; ``training.csv``: ``seconds`` per run), so the cost of a re-run can be planned from the last
one and the cheap arms told from the dear ones.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any


def _seconds(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if number == number else None  # NaN is no measurement


def cost_rows(audits: Sequence[dict[str, Any]], training: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per arm (in first-seen order): audited updates at the study's budget, attack seconds per update
    (mean and median), attack minutes, training runs and training minutes; budget-check rows are left out."""
    arms = list(dict.fromkeys([str(row["arm"]) for row in audits] + [str(row["arm"]) for row in training]))
    rows: list[dict[str, Any]] = []
    for arm in arms:
        attack = [
            seconds
            for row in audits
            if str(row["arm"]) == arm and str(row.get("budget", "study")) == "study"
            for seconds in [_seconds(row.get("attack_seconds"))]
            if seconds is not None
        ]
        trained = [
            seconds
            for row in training
            if str(row["arm"]) == arm
            for seconds in [_seconds(row.get("seconds"))]
            if seconds is not None
        ]
        rows.append(
            {
                "arm": arm,
                "audited_updates": len(attack),
                "attack_seconds_per_update": statistics.fmean(attack) if attack else float("nan"),
                "attack_seconds_per_update_median": statistics.median(attack) if attack else float("nan"),
                "attack_minutes": sum(attack) / 60,
                "training_runs": len(trained),
                "training_minutes": sum(trained) / 60,
            }
        )
    return rows


def cost_table(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The rows of ``cost_rows`` as a markdown table, with the totals."""
    lines = [
        "| arm | audited updates | attack seconds per update (mean / median) | attack minutes | training runs | "
        "training minutes |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['arm']} | {row['audited_updates']} | {row['attack_seconds_per_update']:.2f} / "
            f"{row['attack_seconds_per_update_median']:.2f} | {row['attack_minutes']:.1f} | {row['training_runs']} | "
            f"{row['training_minutes']:.1f} |"
        )
    updates = sum(int(row["audited_updates"]) for row in rows)
    attack = sum(float(row["attack_minutes"]) for row in rows)
    runs = sum(int(row["training_runs"]) for row in rows)
    training = sum(float(row["training_minutes"]) for row in rows)
    mean = 60 * attack / max(updates, 1)
    lines.append(f"| all | {updates} | {mean:.2f} (mean) | {attack:.1f} | {runs} | {training:.1f} |")
    return lines
