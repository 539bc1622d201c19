"""From the study's raw tables to its cells: leakage with intervals, paired differences, accuracy costs.

A leakage cell is (arm, stage, policy, batch size): the audited updates of every seed at that stage.
Its accuracy columns are the policy's final accuracy over seeds (trained at the setting's batch size).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from testbed.study.stats import Interval, cluster_bootstrap, paired_pooled_difference, paired_sign_flip, t_interval

STAGE_ORDER = {"initial": 0, "half": 1, "ninety": 2}


def _float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


@dataclass
class Cell:
    """One leakage cell and everything the report says about it."""

    arm: str
    stage: str
    policy: str
    batch_size: int
    rows: list[dict[str, Any]] = field(default_factory=list)
    recovered: Interval = field(default_factory=lambda: Interval(float("nan"), float("nan"), float("nan")))
    by_attack: dict[str, float] = field(default_factory=dict)
    versus_baseline: Interval | None = None
    p_value: float | None = None
    accuracy: Interval | None = None
    cost: Interval | None = None
    epsilon: float | None = None

    @property
    def key(self) -> tuple[str, int, str, int]:
        """Sort key: arm, stage order, policy, batch size."""
        return (self.arm, STAGE_ORDER.get(self.stage, 9), self.policy, self.batch_size)

    def mean(self, column: str) -> float:
        """Mean of a numeric column over the cell's updates (NaN where none is finite)."""
        values = np.array([_float(row.get(column)) for row in self.rows])
        values = values[np.isfinite(values)]
        return float(values.mean()) if len(values) else float("nan")

    @property
    def seeds(self) -> int:
        """Seeds with at least one audited update in the cell."""
        return len({row["seed"] for row in self.rows})


def _units(rows: Iterable[dict[str, Any]]) -> dict[tuple[Any, Any], tuple[float, float]]:
    """Per (seed, client): the update's (recovered, samples)."""
    return {(row["seed"], row["client"]): (_float(row["recovered"]), _float(row["samples"])) for row in rows}


def study_budget(audits: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows audited at the study's budgets (not the budget check's re-audits)."""
    return [row for row in audits if row.get("budget", "study") in ("study", "")]


def budget_rows(audits: Sequence[dict[str, Any]], resamples: int) -> list[dict[str, Any]]:
    """The budget check: per (arm, stage, policy, batch size), the recovered fraction of the same updates at
    the study's budget and at the larger one, their paired difference and its sign-flip p-value."""
    key = ("arm", "seed", "stage", "policy", "batch_size", "client")
    study = {tuple(str(row[k]) for k in key): row for row in study_budget(audits)}
    cells: dict[tuple[str, str, str, str], list[tuple[dict[str, Any], dict[str, Any]]]] = defaultdict(list)
    for row in audits:
        if row.get("budget") != "check":
            continue
        unit = tuple(str(row[k]) for k in key)
        if unit in study:
            cells[(unit[0], unit[2], unit[3], unit[4])].append((study[unit], row))
    rows = []
    for (arm, stage, policy, size), pairs in sorted(cells.items()):
        samples = np.array([_float(a["samples"]) for a, _ in pairs])
        small = np.array([_float(a["recovered"]) for a, _ in pairs])
        large = np.array([_float(b["recovered"]) for _, b in pairs])
        before = cluster_bootstrap(small, samples, resamples)
        after = cluster_bootstrap(large, samples, resamples)
        differences = (large - small) / np.maximum(samples, 1.0)
        rows.append(
            {
                "arm": arm,
                "stage": stage,
                "policy": policy,
                "batch_size": int(size),
                "updates": len(pairs),
                "recovered_study_budget": before.value,
                "recovered_study_budget_ci_low": before.low,
                "recovered_study_budget_ci_high": before.high,
                "recovered_larger_budget": after.value,
                "recovered_larger_budget_ci_low": after.low,
                "recovered_larger_budget_ci_high": after.high,
                "paired_p_value": paired_sign_flip(differences),
            }
        )
    return rows


def accuracy_by_policy(training: Sequence[dict[str, Any]]) -> dict[tuple[str, str], dict[int, float]]:
    """(arm, policy) -> seed -> final test accuracy."""
    table: dict[tuple[str, str], dict[int, float]] = defaultdict(dict)
    for row in training:
        table[(row["arm"], row["policy"])][int(row["seed"])] = _float(row["final_accuracy"])
    return table


def build_cells(
    audits: Sequence[dict[str, Any]],
    training: Sequence[dict[str, Any]],
    baseline: str,
    resamples: int,
) -> list[Cell]:
    """Every leakage cell with its interval, per-attack fractions, paired comparison and accuracy cost."""
    grouped: dict[tuple[str, str, str, int], list[dict[str, Any]]] = defaultdict(list)
    for row in study_budget(audits):
        grouped[(row["arm"], row["stage"], row["policy"], int(row["batch_size"]))].append(row)
    accuracy = accuracy_by_policy(training)
    epsilons = {(row["arm"], row["policy"]): _float(row.get("epsilon")) for row in training}
    cells: list[Cell] = []
    for (arm, stage, policy, size), rows in grouped.items():
        cell = Cell(arm, stage, policy, size, rows)
        recovered = np.array([_float(r["recovered"]) for r in rows])
        samples = np.array([_float(r["samples"]) for r in rows])
        cell.recovered = cluster_bootstrap(recovered, samples, resamples)
        attacks = sorted({key[10:-1] for r in rows for key in r if key.startswith("recovered[") and r[key] != ""})
        for attack in attacks:
            hits = np.array([_float(r.get(f"recovered[{attack}]", 0)) for r in rows])
            cell.by_attack[attack] = float(np.nansum(hits) / max(samples.sum(), 1.0))
        if policy != baseline:
            base = _units(grouped.get((arm, stage, baseline, size), []))
            mine = _units(rows)
            shared = sorted(set(base) & set(mine))
            if shared:
                ours = np.array([mine[unit] for unit in shared])
                theirs = np.array([base[unit] for unit in shared])
                cell.versus_baseline = paired_pooled_difference(
                    ours[:, 0], theirs[:, 0], ours[:, 1], theirs[:, 1], resamples
                )
                fractions = ours[:, 0] / np.maximum(ours[:, 1], 1.0) - theirs[:, 0] / np.maximum(theirs[:, 1], 1.0)
                cell.p_value = paired_sign_flip(fractions)
        by_seed = accuracy.get((arm, policy))
        if by_seed:
            cell.accuracy = t_interval(np.array(list(by_seed.values())))
            reference = accuracy.get((arm, baseline), {})
            paired = [by_seed[seed] - reference[seed] for seed in by_seed if seed in reference]
            if policy != baseline and paired:
                cell.cost = t_interval(np.array(paired))
            epsilon = epsilons.get((arm, policy), float("nan"))
            cell.epsilon = epsilon if np.isfinite(epsilon) else None
        cells.append(cell)
    return sorted(cells, key=lambda cell: cell.key)


def leakage_rows(cells: Sequence[Cell]) -> list[dict[str, Any]]:
    """The rows of leakage.csv: one per cell, interval columns beside their estimates."""
    attacks = sorted({attack for cell in cells for attack in cell.by_attack})
    rows = []
    for cell in cells:
        row: dict[str, Any] = {
            "arm": cell.arm,
            "stage": cell.stage,
            "stage_round": cell.mean("stage_round"),
            "stage_accuracy": cell.mean("stage_accuracy"),
            "policy": cell.policy,
            "batch_size": cell.batch_size,
            "seeds": cell.seeds,
            "updates": len(cell.rows),
            "samples": int(sum(_float(r["samples"]) for r in cell.rows)),
            "realised_batch_mean": cell.mean("realised_batch"),
            "realised_batch_min": min(_float(r["realised_batch"]) for r in cell.rows),
            "recovered_fraction": cell.recovered.value,
            "recovered_fraction_ci_low": cell.recovered.low,
            "recovered_fraction_ci_high": cell.recovered.high,
        }
        for attack in attacks:
            row[f"recovered_fraction[{attack}]"] = cell.by_attack.get(attack, "")
        for name in ("avd", "avd_baseline", "ssim", "ssim_baseline", "labels_exact"):
            row[name if name != "labels_exact" else "label_histogram_exact"] = cell.mean(name)
        versus = cell.versus_baseline
        row["paired_difference"] = versus.value if versus else ""
        row["paired_difference_ci_low"] = versus.low if versus else ""
        row["paired_difference_ci_high"] = versus.high if versus else ""
        row["paired_p_value"] = cell.p_value if cell.p_value is not None else ""
        for prefix, interval in (("final_accuracy", cell.accuracy), ("accuracy_cost", cell.cost)):
            row[prefix] = interval.value if interval else ""
            row[f"{prefix}_ci_low"] = interval.low if interval else ""
            row[f"{prefix}_ci_high"] = interval.high if interval else ""
        row["epsilon"] = cell.epsilon if cell.epsilon is not None else ""
        rows.append(row)
    return rows
