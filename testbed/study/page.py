"""The study's report: leakage.csv, accuracy.csv, figures with intervals, and the results page.

Everything here is computed from the tables the study wrote (tuning.csv, training.csv, audits.csv,
metric_noise.csv, meta.json); nothing is typed in. ``write_report`` returns the page's path.
"""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from testbed.study.claims import judge
from testbed.study.cost import cost_rows, cost_table
from testbed.study.eras import ATTACK_ERA
from testbed.study.metric_noise import tolerance
from testbed.study.spec import STAGE_HELP, StudySpec
from testbed.study.stats import t_interval
from testbed.study.summary import budgets_table, claims_table, conclusion, summary_figure
from testbed.study.tables import LEVELS, Cell, accuracy_by_policy, budget_rows, build_cells, leakage_rows


def read_table(path: Path) -> list[dict[str, Any]]:
    """A CSV file as a list of rows (empty when the file is absent)."""
    if not path.is_file():
        return []
    with open(path, encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


def write_rows(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """Rows as CSV, every column any row has."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)


def _n(value: Any, digits: int = 2) -> str:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return "-"
    return f"{number:.{digits}f}" if math.isfinite(number) else "-"


def _interval(value: Any, low: Any, high: Any, digits: int = 2) -> str:
    if _n(value) == "-":
        return "-"
    if _n(low) == "-":
        return _n(value, digits)
    return f"{_n(value, digits)} [{_n(low, digits)}, {_n(high, digits)}]"


def accuracy_rows(training: Sequence[dict[str, Any]], baseline: str) -> list[dict[str, Any]]:
    """accuracy.csv: per (arm, policy) the final accuracy and the paired cost against the baseline, over seeds."""
    table = accuracy_by_policy(training)
    lrs = {(row["arm"], row["policy"]): row["lr"] for row in training}
    epsilons = {(row["arm"], row["policy"]): row.get("epsilon", "") for row in training}
    rows = []
    for (arm, policy), by_seed in sorted(table.items()):
        accuracy = t_interval(np.array(list(by_seed.values())))
        reference = table.get((arm, baseline), {})
        paired = [by_seed[s] - reference[s] for s in by_seed if s in reference]
        cost = t_interval(np.array(paired)) if policy != baseline and paired else None
        rows.append(
            {
                "arm": arm,
                "policy": policy,
                "lr": lrs[(arm, policy)],
                "seeds": len(by_seed),
                "final_accuracy": accuracy.value,
                "final_accuracy_ci_low": accuracy.low,
                "final_accuracy_ci_high": accuracy.high,
                "accuracy_cost": cost.value if cost else "",
                "accuracy_cost_ci_low": cost.low if cost else "",
                "accuracy_cost_ci_high": cost.high if cost else "",
                "epsilon": epsilons[(arm, policy)],
            }
        )
    return rows


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    return plt


def plot_arm(cells: Sequence[Cell], arm: str, folder: Path, effect: float) -> Path:
    """Recovered fraction with its 95% interval over seeds per policy, one panel per batch size, one marker per
    stage; a dotted line at the meaningful ``effect``."""
    plt = _pyplot()
    mine = [cell for cell in cells if cell.arm == arm]
    sizes = sorted({cell.batch_size for cell in mine})
    policies = list(dict.fromkeys(cell.policy for cell in mine))
    stages = list(dict.fromkeys(cell.stage for cell in sorted(mine, key=lambda c: c.key)))
    figure, axes = plt.subplots(1, len(sizes), figsize=(5.2 * len(sizes), 3.8), squeeze=False, sharey=True)
    for axis, size in zip(axes[0], sizes, strict=True):
        for offset, stage in enumerate(stages):
            chosen = {c.policy: c for c in mine if c.batch_size == size and c.stage == stage}
            xs = [i + (offset - (len(stages) - 1) / 2) * 0.22 for i, p in enumerate(policies) if p in chosen]
            cs = [chosen[p] for p in policies if p in chosen]
            values = np.array([c.recovered.value for c in cs])
            low = np.nan_to_num(values - np.array([c.recovered.low for c in cs]))
            high = np.nan_to_num(np.array([c.recovered.high for c in cs]) - values)
            axis.errorbar(xs, values, yerr=[low, high], fmt="o", capsize=3, label=stage)
        axis.axhline(effect, color="grey", linewidth=0.8, linestyle=":")
        axis.set_xticks(range(len(policies)))
        axis.set_xticklabels(policies, rotation=35, ha="right", fontsize=8)
        axis.set_title(f"{arm}, batch {size}", fontsize=10)
        axis.set_ylim(-0.03, 1.03)
    axes[0][0].set_ylabel("recovered fraction (95% CI over seeds)")
    axes[0][-1].legend(title="stage", fontsize=8)
    figure.tight_layout()
    path = folder / f"leakage_{arm.replace('/', '_')}.png"
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_accuracy(rows: Sequence[dict[str, Any]], folder: Path) -> Path:
    """Final test accuracy with its 95% interval over seeds, per arm and trained policy."""
    plt = _pyplot()
    arms = list(dict.fromkeys(row["arm"] for row in rows))
    figure, axis = plt.subplots(figsize=(10, 4.2))
    policies = list(dict.fromkeys(row["policy"] for row in rows))
    width = 0.8 / max(len(policies), 1)
    for k, policy in enumerate(policies):
        chosen = {row["arm"]: row for row in rows if row["policy"] == policy}
        xs = [i + (k - (len(policies) - 1) / 2) * width for i, arm in enumerate(arms) if arm in chosen]
        values = np.array([float(chosen[arm]["final_accuracy"]) for arm in arms if arm in chosen])
        lows = np.array([float(chosen[arm]["final_accuracy_ci_low"]) for arm in arms if arm in chosen])
        highs = np.array([float(chosen[arm]["final_accuracy_ci_high"]) for arm in arms if arm in chosen])
        axis.errorbar(
            xs,
            values,
            yerr=[np.nan_to_num(values - lows), np.nan_to_num(highs - values)],
            fmt="o",
            capsize=2,
            label=policy,
        )
    axis.set_xticks(range(len(arms)))
    axis.set_xticklabels(arms, rotation=20, ha="right", fontsize=8)
    axis.set_ylabel("final test accuracy (95% CI over seeds)")
    axis.set_ylim(0, 1)
    axis.legend(fontsize=7, ncol=4)
    figure.tight_layout()
    path = folder / "accuracy.png"
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _rounds(cell: Cell) -> str:
    """The stage's round over seeds: one number, or its range."""
    rounds = sorted({int(float(row["stage_round"])) for row in cell.rows})
    return str(rounds[0]) if len(rounds) == 1 else f"{rounds[0]}-{rounds[-1]}"


def _leakage_table(cells: Sequence[Cell], attacks: list[str]) -> list[str]:
    head = [
        "arm",
        "stage (rounds, mean acc)",
        "policy",
        "batch",
        "seeds/updates",
        "realised batch",
        "recovered [95% CI]",
        "paper era",
        "SSIM >= 0.7",
        "SSIM >= 0.5",
        "SSIM median [q1, q3]",
    ]
    head += [f"{attack}" for attack in attacks] + ["vs baseline [95% CI] (p)", "label hist exact"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for cell in cells:
        versus = cell.versus_baseline
        shown = f"{versus.value:+.2f} [{versus.low:+.2f}, {versus.high:+.2f}] ({versus.p_value:.2g})" if versus else ""
        graded = []
        for measure in (("paper", LEVELS[0]), ("to date", LEVELS[1]), ("to date", LEVELS[2])):
            interval = cell.intervals.get(measure)
            graded.append(_interval(interval.value, interval.low, interval.high) if interval else "-")
        q1, median, q3 = cell.ssim_quartiles
        row = [
            cell.arm,
            f"{cell.stage} ({_rounds(cell)}, {cell.mean('stage_accuracy'):.2f})",
            cell.policy,
            str(cell.batch_size),
            f"{cell.seeds}/{len(cell.rows)}",
            f"{cell.mean('realised_batch'):.1f}",
            _interval(cell.recovered.value, cell.recovered.low, cell.recovered.high),
            *graded,
            f"{_n(median)} [{_n(q1)}, {_n(q3)}]",
        ]
        row += [_n(cell.by_attack[a]) if a in cell.by_attack else "" for a in attacks]
        row += [shown, _n(cell.mean("labels_exact"))]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def write_report(folder: Path, out: Path, page: Path | None, spec: StudySpec, produced_by: str = "") -> Path:
    """Read the study tables in ``folder``; write leakage.csv, accuracy.csv, claims.csv, figures and report.md
    to ``out``; with ``page``, also the results page (conclusion and claims first). ``spec`` is the study
    file (baseline, arms' metadata, claim rules); ``produced_by`` names the report command. Returns the
    report's path."""
    out.mkdir(parents=True, exist_ok=True)
    baseline = spec.baseline
    rules = spec.claims
    audits = read_table(folder / "audits.csv")
    training = read_table(folder / "training.csv")
    tuning = read_table(folder / "tuning.csv")
    noise = read_table(folder / "metric_noise.csv")
    meta = json.loads((folder / "meta.json").read_text(encoding="utf-8")) if (folder / "meta.json").is_file() else {}
    cells = build_cells(audits, training, baseline, rules.alpha)
    write_rows(out / "leakage.csv", leakage_rows(cells))
    accuracy = accuracy_rows(training, baseline)
    write_rows(out / "accuracy.csv", accuracy)
    if noise:
        write_rows(out / "metric_noise.csv", noise)
    verdicts = judge(cells, spec, noise)
    write_rows(out / "claims.csv", [verdict.row() for verdict in verdicts])
    figures = [summary_figure(cells, spec, out)]
    figures += [plot_arm(cells, arm, out, rules.meaningful_effect) for arm in dict.fromkeys(cell.arm for cell in cells)]
    if accuracy:
        figures.append(plot_accuracy(accuracy, out))
    attacks = sorted({attack for cell in cells for attack in cell.by_attack})
    lines = ["# Results: the mixing-gradients study", ""]
    lines += [conclusion(verdicts, spec), ""]
    lines += [f"![summary](results/{figures[0].name})", ""]
    lines += [
        "Per arm at its largest audited batch: the recovered fraction (95% interval over seeds) of the baseline, "
        "the identical-label policy that leaks least and DP-SGD at each stage; beside each point the attack that "
        f"recovered most; the dotted line is the meaningful effect ({rules.meaningful_effect:g}).",
        "",
        "Generated by `testbed report` from the tables of one run of `testbed study`; nothing here is typed in. "
        "CSV: [claims.csv](results/claims.csv), [leakage.csv](results/leakage.csv), "
        "[accuracy.csv](results/accuracy.csv).",
        "",
        "## Claims of the paper's abstract",
        "",
    ]
    lines += claims_table(verdicts)
    lines += [
        "",
        "## How to read the verdicts",
        "",
        "- **Unit**: the trained model (seed). The audited updates of one seed attack one and the same model, so "
        "each statistic takes one number per seed: the seed's leaked fraction, or its paired difference against "
        f"the baseline over the clients audited under both. Seeds: {len(spec.seeds)}.",
        "- **Intervals**: a cell's leaked fraction is the mean over seeds with a Clopper-Pearson interval, the seed "
        "as the trial (five of five seeds all recovered: [0.48, 1]); a paired difference is the mean seed "
        "difference with the exact sign-flip test over seeds and the interval that inverts it; accuracy costs "
        "are paired by seed with a Student t interval. All at 95%.",
        f"- **Thresholds**: meaningful effect {rules.meaningful_effect:g} (a leaked fraction, or a reduction of it); "
        f"accuracy margin {rules.accuracy_margin:g}; alpha {rules.alpha:g}, Holm-adjusted over each claim's "
        "comparisons in an era and level (values from the study file's `claims` block or its defaults).",
        "- **Verdicts**: supported (significant in the claimed direction after Holm), refuted (the interval "
        "excludes the meaningful effect the claim needs), inconclusive (the interval holds both no effect and a "
        "meaningful one: not enough seeds to tell), not tested (nothing in the study measures it).",
        "- **Levels**: 'recovered' is a near copy (SSIM >= 0.9 or AVD <= 0.02) beyond every no-information "
        "baseline (blank, class mean, random image of the class); the graded levels count samples whose best "
        "SSIM is at least 0.7 or 0.5 and above the best baseline's (`metrics.graded_leakage`). Each claim is "
        "judged at 'recovered'; the other columns are its sensitivity to the level.",
        "- **Eras**: 'paper' counts only the attacks of the paper's era ("
        + ", ".join(name for name, era in ATTACK_ERA.items() if era == "paper")
        + "; an update counts the most any one of them recovered), 'to date' the worst case over the whole "
        "portfolio (docs/study.md has the era table).",
        "- **Caveats**: conditional on the audited models, the attack portfolio and its budgets (below); "
        + (
            ""
            if any(row.get("ssim_samples") for row in audits)
            else "these tables keep each update's mean SSIM, which the graded levels give to each of its samples; "
        )
        + "the paper-era fraction is a lower bound on the union of its attacks.",
        "",
        "## Run",
        "",
        "| | |",
        "| --- | --- |",
    ]
    for key in ("command", "commit", "study_run", "wall_time", "machine"):
        if key in meta:
            lines.append(f"| {key.replace('_', ' ')} | {meta[key]} |")
    if produced_by:
        lines.append(f"| report | {produced_by} |")
    lines += [
        "",
        f"Seeds {spec.seeds}; audits: {spec.audit.clients} clients per seed and stage. Attack budgets:",
        "",
    ]
    lines += budgets_table(spec)
    lines += ["", "## Comparisons behind each verdict", ""]
    for verdict in verdicts:
        lines.append(f"- **{verdict.claim}, {verdict.era}, {verdict.level}: {verdict.verdict}**")
        lines += [f"  - {outcome.text}: {outcome.verdict}" for outcome in verdict.outcomes]
    lines += [
        "",
        f"Stages: {STAGE_HELP}.",
        "",
        "## Accuracy of each policy (final test accuracy, 95% CI over seeds; cost paired by seed)",
        "",
        "| arm | policy | lr | seeds | final accuracy | cost vs baseline | epsilon |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in accuracy:
        lines.append(
            f"| {row['arm']} | {row['policy']} | {row['lr']} | {row['seeds']} | "
            f"{_interval(row['final_accuracy'], row['final_accuracy_ci_low'], row['final_accuracy_ci_high'])} | "
            f"{_interval(row['accuracy_cost'], row['accuracy_cost_ci_low'], row['accuracy_cost_ci_high'])} | "
            f"{_n(row['epsilon'])} |"
        )
    lines += ["", "## Leakage by arm, stage, policy and batch size", ""]
    lines += _leakage_table(cells, attacks)
    checks = budget_rows(audits, rules.alpha)
    if checks:
        write_rows(out / "budget_check.csv", checks)
        lines += ["", "## Budget check: the same updates attacked with larger budgets", ""]
        lines += [f"Larger budgets: {meta.get('budget_check', 'see budget_check.csv')}.", ""]
        lines += [
            "| arm | stage | policy | batch | updates | recovered, study budget | recovered, larger budget | p |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for row in checks:
            lines.append(
                f"| {row['arm']} | {row['stage']} | {row['policy']} | {row['batch_size']} | {row['updates']} | "
                + _interval(
                    row["recovered_study_budget"],
                    row["recovered_study_budget_ci_low"],
                    row["recovered_study_budget_ci_high"],
                )
                + " | "
                + _interval(
                    row["recovered_larger_budget"],
                    row["recovered_larger_budget_ci_low"],
                    row["recovered_larger_budget_ci_high"],
                )
                + f" | {_n(row['paired_p_value'], 3)} |"
            )
        moved = [
            r for r in checks if abs(float(r["recovered_larger_budget"]) - float(r["recovered_study_budget"])) > 0.1
        ]
        lines += [
            "",
            "Cells whose recovered fraction moves by more than 0.1 with the larger budget: "
            + (
                ", ".join(
                    f"{r['arm']} {r['policy']} batch {r['batch_size']} {r['stage']} (p={_n(r['paired_p_value'], 3)})"
                    for r in moved
                )
                or "none"
            )
            + ".",
        ]
    costs = cost_rows(audits, training)
    write_rows(out / "cost.csv", costs)
    lines += ["", "## Cost: attack seconds per audited update and training, per arm", ""]
    lines += [
        "CPU seconds of one Ray task each (the study runs "
        f"{spec.workers} at once); an update's attack seconds are its audit call's wall time shared over the "
        "call's updates, every applicable attack of the arm's portfolio included (the budget check left out).",
        "",
    ]
    lines += cost_table(costs)
    lines += ["", "## Figures", ""]
    lines += [f"![{figure.stem}](results/{figure.name})" for figure in figures[1:]]
    lines += ["", "## Notes", ""]
    lines += _notes(tuning, training, noise, cells, meta)
    text = "\n".join(lines) + "\n"
    report = out / "report.md"
    report.write_text(text.replace("](results/", "]("), encoding="utf-8")
    if page is not None:
        page.parent.mkdir(parents=True, exist_ok=True)
        page.write_text(text, encoding="utf-8")
    return report


def _notes(
    tuning: Sequence[dict[str, Any]],
    training: Sequence[dict[str, Any]],
    noise: Sequence[dict[str, Any]],
    cells: Sequence[Cell],
    meta: dict[str, Any],
) -> list[str]:
    notes: list[str] = []
    grid: dict[tuple[str, str], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    chosen: set[tuple[str, str, str]] = set()
    for row in tuning:
        grid[(row["arm"], row["loss"])][str(row["lr"])].append(float(row["final_accuracy"]))
        if str(row.get("chosen")) == "1":
            chosen.add((row["arm"], row["loss"], str(row["lr"])))
    if grid:
        seeds = len({str(row.get("seed", "")) for row in tuning})
        notes.append(
            f"- Learning rates, tuned per arm and loss on {seeds} tuning seed(s) apart from the study's "
            "(worst / mean final accuracy over them; chosen in bold, the best worst case):"
        )
        for (arm, loss), by_lr in grid.items():
            tried = []
            for lr, values in sorted(by_lr.items(), key=lambda item: float(item[0])):
                mark = "**" if (arm, loss, lr) in chosen else ""
                tried.append(f"{mark}{lr}: {_n(min(values))} / {_n(sum(values) / len(values))}{mark}")
            notes.append(f"  - {arm}, {loss}: {', '.join(tried)}")
    finals: dict[str, list[float]] = defaultdict(list)
    for row in training:
        finals[row["arm"]].append(float(row["final_accuracy"]))
    for arm in (arm for arm, values in finals.items() if max(values) < 0.2):
        rounds = sorted({int(float(r["stage_round"])) for c in cells if c.arm == arm for r in c.rows})
        notes.append(
            f"- {arm} did not learn (every trained policy below 0.2 test accuracy on every seed, whatever the "
            f"grid's learning rate); its audited stages are rounds {rounds}, so its cells describe a network at chance."
        )
    by_run: dict[tuple[str, str], dict[str, float]] = defaultdict(dict)
    for row in training:
        by_run[(row["arm"], row["policy"])][str(row["seed"])] = float(row["final_accuracy"])
    diverged = [
        f"{arm} {policy} seed {seed} ({value:.2f} against a median of {median:.2f})"
        for (arm, policy), seeds in by_run.items()
        for median in [float(np.median(list(seeds.values())))]
        for seed, value in seeds.items()
        if median >= 0.5 and value < 0.5 * median
    ]
    if diverged:
        notes.append(
            "- Runs that did not train while the other seeds of their policy did (divergence at the tuned learning "
            "rate; their final accuracy is in the intervals above, and a diverged baseline's stages fall on early "
            "rounds): " + "; ".join(diverged)
        )
    short: dict[tuple[str, str], int] = defaultdict(int)
    for row in training:
        short[(row["arm"], row["policy"])] += int(float(row.get("short_batches") or 0))
    shorts = [f"{arm} {policy}: {count}" for (arm, policy), count in short.items() if count]
    if shorts:
        notes.append("- Short batches during training (a label or client ran out of samples): " + "; ".join(shorts))
    small = [c for c in cells if c.mean("realised_batch") < 0.9 * c.batch_size]
    if small:
        notes.append(
            "- Realised batch below the nominal size (identical labels on clients holding few samples of a class, "
            "DP-SGD's Poisson batches, FedAvg's last batch): "
            + "; ".join(
                f"{c.arm} {c.policy} batch {c.batch_size} {c.stage}: {c.mean('realised_batch'):.1f}" for c in small[:20]
            )
        )
    reasons = sorted({r.get("not_applicable", "") for c in cells for r in c.rows if r.get("not_applicable")})
    if reasons:
        notes.append("- Attacks that did not apply (their one-line reasons): " + " / ".join(reasons[:8]))
    if noise:
        notes.append(
            "- Metric noise test (metric_noise.csv): "
            + ", ".join(
                f"{m} detects noisy copies up to sigma {tolerance(noise, m):g}" for m in ("avd", "mse", "psnr", "ssim")
            )
        )
    for line in meta.get("notes", []):
        notes.append(f"- {line}")
    return notes
