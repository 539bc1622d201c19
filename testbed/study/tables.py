"""From the study's raw tables to its cells: leakage per seed with intervals, paired differences, accuracy.

A leakage cell is (arm, stage, policy, batch size): the audited updates of every seed at that stage.
Every statistic takes one number per seed (the trained model is the unit, ``testbed.study.stats``):
per era (``testbed.study.eras``) and per level of the graded ladder (``metrics.graded_leakage``), each
seed's fraction of samples leaked, and against the baseline policy each seed's paired difference over
the clients both audited. Its accuracy columns are the policy's final accuracy over seeds.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from metrics.graded import SSIM_LEVELS, graded_leakage, level_name
from testbed.study.eras import ERAS, attacks_of
from testbed.study.stats import (
    NAN_INTERVAL,
    Comparison,
    Interval,
    minimum_detectable,
    seed_fractions,
    seed_interval,
    sign_flip,
    sign_flip_p,
    t_comparison,
    t_interval,
)

STAGE_ORDER = {"initial": 0, "half": 1, "ninety": 2}
STRICT = "recovered"
LEVELS: tuple[str, ...] = (STRICT, *(level_name(level) for level in sorted(SSIM_LEVELS, reverse=True)))
"""The graded ladder, strictest first: near copies, then SSIM >= 0.7 and >= 0.5 beyond the baselines."""

Measure = tuple[str, str]
"""(era, level): what a seed fraction counts."""


def _float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def _samples_of(row: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An update's per-sample SSIM, baseline SSIM and recovered flags. Tables that kept only the update's
    mean SSIM (``ssim``, ``ssim_baseline``) give that mean to each of its samples."""
    n = int(_float(row["samples"]))
    hits = int(_float(row["recovered"]))
    flags = np.arange(n) < hits
    listed = row.get("ssim_samples")
    if listed:
        ssim = np.asarray(json.loads(listed) if isinstance(listed, str) else listed, dtype=np.float64)
        base_listed = row.get("ssim_baseline_samples")
        base = (
            np.asarray(json.loads(base_listed) if isinstance(base_listed, str) else base_listed, dtype=np.float64)
            if base_listed
            else np.full(len(ssim), np.nan)
        )
        return ssim, base, np.arange(len(ssim)) < hits
    return np.full(n, _float(row.get("ssim"))), np.full(n, _float(row.get("ssim_baseline"))), flags


def _era_hits(row: dict[str, Any], era: str) -> float:
    """Samples of an update recovered by the era's attacks: the update's worst case over the whole
    portfolio for the last era; for an earlier one the most any of its attacks recovered alone (a lower
    bound on their union, which the per-attack counts do not give)."""
    if era == ERAS[-1]:
        return _float(row["recovered"])
    attacks = [key[10:-1] for key in row if key.startswith("recovered[") and row[key] not in ("", None)]
    counted = attacks_of(era, attacks)
    if not counted:
        return math.nan
    return max(_float(row[f"recovered[{attack}]"]) for attack in counted)


def unit_fractions(rows: Sequence[dict[str, Any]], measure: Measure) -> dict[tuple[Any, Any], tuple[float, float]]:
    """Per (seed, client): the update's (leaked samples, samples) under ``measure`` (NaN when not measured)."""
    era, level = measure
    out: dict[tuple[Any, Any], tuple[float, float]] = {}
    for row in rows:
        samples = _float(row["samples"])
        if level == STRICT:
            hits = _era_hits(row, era)
        elif era != ERAS[-1]:
            hits = math.nan  # the graded ladder scores the worst case over the whole portfolio only
        else:
            ssim, base, flags = _samples_of(row)
            threshold = float(level.removeprefix("ssim_ge_"))
            hits = graded_leakage(ssim, flags, base, levels=(threshold,)).at_least[threshold] * len(ssim)
        out[(str(row["seed"]), str(row["client"]))] = (hits, samples)
    return out


def fractions_by_seed(units: dict[tuple[Any, Any], tuple[float, float]]) -> dict[str, float]:
    """Per seed, leaked samples over samples of its measured updates."""
    keys = [key for key, (hits, _) in units.items() if math.isfinite(hits)]
    if not keys:
        return {}
    seeds = np.array([key[0] for key in keys])
    hits = np.array([units[key][0] for key in keys])
    samples = np.array([units[key][1] for key in keys])
    return {str(seed): value for seed, value in seed_fractions(hits, samples, seeds).items()}


def paired_seed_differences(
    mine: dict[tuple[Any, Any], tuple[float, float]], theirs: dict[tuple[Any, Any], tuple[float, float]]
) -> dict[str, float]:
    """Per seed, this policy's fraction minus the baseline's over the clients audited under both."""
    shared = [key for key in mine if key in theirs and math.isfinite(mine[key][0]) and math.isfinite(theirs[key][0])]
    return {
        seed: fractions_by_seed({k: mine[k] for k in shared if k[0] == seed})[seed]
        - fractions_by_seed({k: theirs[k] for k in shared if k[0] == seed})[seed]
        for seed in dict.fromkeys(key[0] for key in shared)
    }


@dataclass
class Cell:
    """One leakage cell and everything the report says about it."""

    arm: str
    stage: str
    policy: str
    batch_size: int
    rows: list[dict[str, Any]] = field(default_factory=list)
    fractions: dict[Measure, dict[str, float]] = field(default_factory=dict)
    """(era, level) -> seed -> fraction of the seed's samples leaked."""
    intervals: dict[Measure, Interval] = field(default_factory=dict)
    versus: dict[Measure, Comparison] = field(default_factory=dict)
    """(era, level) -> mean seed difference against the baseline, sign-flip interval and p-value."""
    detectable: dict[Measure, float] = field(default_factory=dict)
    """(era, level) -> minimum detectable difference at the cell's seeds (infinite when none is)."""
    by_attack: dict[str, float] = field(default_factory=dict)
    attack_fractions: dict[str, dict[str, float]] = field(default_factory=dict)
    ssim_quartiles: tuple[float, float, float] = (math.nan, math.nan, math.nan)
    accuracy: Interval | None = None
    cost: Comparison | None = None
    epsilon: float | None = None

    @property
    def recovered(self) -> Interval:
        """The strict recovered fraction over every attack, with its seed-level interval."""
        return self.intervals.get((ERAS[-1], STRICT), NAN_INTERVAL)

    @property
    def versus_baseline(self) -> Comparison | None:
        """The strict paired difference against the baseline over every attack."""
        return self.versus.get((ERAS[-1], STRICT))

    @property
    def p_value(self) -> float | None:
        """The sign-flip p-value of ``versus_baseline``."""
        return self.versus_baseline.p_value if self.versus_baseline is not None else None

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


def study_budget(audits: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows audited at the study's budgets (not the budget check's re-audits)."""
    return [row for row in audits if row.get("budget", "study") in ("study", "")]


def budget_rows(audits: Sequence[dict[str, Any]], alpha: float = 0.05) -> list[dict[str, Any]]:
    """The budget check: per (arm, stage, policy, batch size), the recovered fraction of the same updates at
    the study's budget and at the larger one (seed-level intervals) and the sign-flip p-value of their
    paired seed differences."""
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
    measure = (ERAS[-1], STRICT)
    for (arm, stage, policy, size), pairs in sorted(cells.items()):
        small = unit_fractions([a for a, _ in pairs], measure)
        large = unit_fractions([b for _, b in pairs], measure)
        before = seed_interval(list(fractions_by_seed(small).values()), alpha)
        after = seed_interval(list(fractions_by_seed(large).values()), alpha)
        differences = paired_seed_differences(large, small)
        rows.append(
            {
                "arm": arm,
                "stage": stage,
                "policy": policy,
                "batch_size": int(size),
                "seeds": len(differences),
                "updates": len(pairs),
                "recovered_study_budget": before.value,
                "recovered_study_budget_ci_low": before.low,
                "recovered_study_budget_ci_high": before.high,
                "recovered_larger_budget": after.value,
                "recovered_larger_budget_ci_low": after.low,
                "recovered_larger_budget_ci_high": after.high,
                "paired_p_value": sign_flip_p(np.array(list(differences.values()))),
            }
        )
    return rows


def accuracy_by_policy(training: Sequence[dict[str, Any]]) -> dict[tuple[str, str], dict[int, float]]:
    """(arm, policy) -> seed -> final test accuracy."""
    table: dict[tuple[str, str], dict[int, float]] = defaultdict(dict)
    for row in training:
        table[(row["arm"], row["policy"])][int(row["seed"])] = _float(row["final_accuracy"])
    return table


def measures() -> list[Measure]:
    """Every (era, level) a cell is measured at: the strict level in every era, the ladder in the last."""
    return [(era, STRICT) for era in ERAS] + [(ERAS[-1], level) for level in LEVELS[1:]]


def build_cells(
    audits: Sequence[dict[str, Any]],
    training: Sequence[dict[str, Any]],
    baseline: str,
    alpha: float = 0.05,
) -> list[Cell]:
    """Every leakage cell with its seed-level intervals, per-attack fractions, paired comparisons against
    ``baseline`` (with their minimum detectable differences at ``alpha``) and accuracy cost."""
    grouped: dict[tuple[str, str, str, int], list[dict[str, Any]]] = defaultdict(list)
    for row in study_budget(audits):
        grouped[(row["arm"], row["stage"], row["policy"], int(row["batch_size"]))].append(row)
    accuracy = accuracy_by_policy(training)
    epsilons = {(row["arm"], row["policy"]): _float(row.get("epsilon")) for row in training}
    cells: list[Cell] = []
    for (arm, stage, policy, size), rows in grouped.items():
        cell = Cell(arm, stage, policy, size, rows)
        base_rows = grouped.get((arm, stage, baseline, size), [])
        for measure in measures():
            units = unit_fractions(rows, measure)
            by_seed = fractions_by_seed(units)
            if not by_seed:
                continue
            cell.fractions[measure] = by_seed
            cell.intervals[measure] = seed_interval(list(by_seed.values()), alpha)
            if policy != baseline and base_rows:
                differences = paired_seed_differences(units, unit_fractions(base_rows, measure))
                if differences:
                    values = np.array(list(differences.values()))
                    cell.versus[measure] = sign_flip(values, alpha)
                    cell.detectable[measure] = minimum_detectable(values, alpha)
        attacks = sorted({key[10:-1] for r in rows for key in r if key.startswith("recovered[") and r[key] != ""})
        for attack in attacks:
            units = {
                (str(r["seed"]), str(r["client"])): (_float(r.get(f"recovered[{attack}]") or 0), _float(r["samples"]))
                for r in rows
            }
            cell.attack_fractions[attack] = fractions_by_seed(units)
            cell.by_attack[attack] = float(np.mean(list(cell.attack_fractions[attack].values())))
        everything = [_samples_of(row) for row in rows]
        if everything:
            ssim = np.concatenate([item[0] for item in everything])
            flags = np.concatenate([item[2] for item in everything])
            cell.ssim_quartiles = graded_leakage(ssim, flags, None).ssim_quartiles
        by_seed_accuracy = accuracy.get((arm, policy))
        if by_seed_accuracy:
            cell.accuracy = t_interval(np.array(list(by_seed_accuracy.values())))
            reference = accuracy.get((arm, baseline), {})
            paired = [by_seed_accuracy[seed] - reference[seed] for seed in by_seed_accuracy if seed in reference]
            if policy != baseline and paired:
                cell.cost = t_comparison(np.array(paired), alpha)
            epsilon = epsilons.get((arm, policy), float("nan"))
            cell.epsilon = epsilon if np.isfinite(epsilon) else None
        cells.append(cell)
    return sorted(cells, key=lambda cell: cell.key)


def _suffix(measure: Measure) -> str:
    era, level = measure
    name = "recovered_fraction" if level == STRICT else f"{level}_fraction"
    return name + ("" if era == ERAS[-1] else f"[{era} era]")


def leakage_rows(cells: Sequence[Cell]) -> list[dict[str, Any]]:
    """The rows of leakage.csv: one per cell, interval columns beside their estimates.

    ``recovered_fraction`` is over every attack of the portfolio; ``recovered_fraction[paper era]`` over
    the paper's era's attacks; ``ssim_ge_0.7_fraction`` and ``ssim_ge_0.5_fraction`` the graded ladder;
    ``paired_*`` the comparison against the baseline (mean seed difference, sign-flip interval and p,
    minimum detectable difference).
    """
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
        }
        for measure in measures():
            name = _suffix(measure)
            interval = cell.intervals.get(measure)
            row[name] = interval.value if interval else ""
            row[f"{name}_ci_low"] = interval.low if interval else ""
            row[f"{name}_ci_high"] = interval.high if interval else ""
        for label, value in zip(("ssim_q1", "ssim_median", "ssim_q3"), cell.ssim_quartiles, strict=True):
            row[label] = value
        for attack in attacks:
            row[f"recovered_fraction[{attack}]"] = cell.by_attack.get(attack, "")
        for name in ("avd", "avd_baseline", "ssim", "ssim_baseline", "labels_exact"):
            row[name if name != "labels_exact" else "label_histogram_exact"] = cell.mean(name)
        for measure in measures():
            name = "paired_difference" + _suffix(measure).removeprefix("recovered_fraction")
            versus = cell.versus.get(measure)
            row[name] = versus.value if versus else ""
            row[f"{name}_ci_low"] = versus.low if versus else ""
            row[f"{name}_ci_high"] = versus.high if versus else ""
            row[f"{name}_p_value"] = versus.p_value if versus else ""
            detectable = cell.detectable.get(measure)
            row[f"{name}_detectable"] = detectable if detectable is not None else ""
        pairs: tuple[tuple[str, Interval | None], ...] = (
            ("final_accuracy", cell.accuracy),
            ("accuracy_cost", cell.cost.interval if cell.cost else None),
        )
        for prefix, estimate in pairs:
            row[prefix] = estimate.value if estimate else ""
            row[f"{prefix}_ci_low"] = estimate.low if estimate else ""
            row[f"{prefix}_ci_high"] = estimate.high if estimate else ""
        row["accuracy_cost_p_value"] = cell.cost.p_value if cell.cost else ""
        row["epsilon"] = cell.epsilon if cell.epsilon is not None else ""
        rows.append(row)
    return rows
