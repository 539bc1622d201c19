"""The parts of the results page a reader needs first: the conclusion, the summary figure, the claims.

The conclusion paragraph is written from the verdicts (``testbed.study.claims``), never typed in; the
summary figure shows, per arm, the baseline, the identical-label policy with the least leakage and
DP-SGD at each stage, with seed-level intervals and the attack that recovered most.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from testbed.study.claims import CLAIMS, INCONCLUSIVE, REFUTED, SUPPORTED, Study, Verdict
from testbed.study.eras import ERAS
from testbed.study.spec import StudySpec
from testbed.study.stats import seeds_for_significance
from testbed.study.tables import LEVELS, STAGE_ORDER, STRICT, Cell

ERA_TEXT = {"paper": "the attacks of the paper's era", "to date": "every attack of the portfolio"}


def _numbered(claim: str) -> str:
    return f"claim {list(CLAIMS).index(claim) + 1}"


def conclusion(verdicts: Sequence[Verdict], spec: StudySpec) -> str:
    """One paragraph from the verdicts at each claim's primary level, era by era."""
    seeds = len(spec.seeds)
    alpha = spec.claims.alpha
    parts = []
    for era in ERAS:
        primary = [v for v in verdicts if v.era == era and v.primary]
        groups = {
            verdict: [_numbered(v.claim) for v in primary if v.verdict == verdict]
            for verdict in (SUPPORTED, REFUTED, INCONCLUSIVE)
        }
        said = "; ".join(f"{verdict}: {', '.join(names)}" for verdict, names in groups.items() if names)
        parts.append(f"Against {ERA_TEXT[era]}, {said or 'no claim could be tested'}.")
    largest = max((v.counts[SUPPORTED] + v.counts[REFUTED] + v.counts[INCONCLUSIVE] for v in verdicts), default=1)
    smallest_p = 2.0 / 2**seeds
    power = (
        f"With {seeds} trained models (seeds) per cell, the smallest two-sided p an exact sign-flip test can give is "
        f"{smallest_p:.4g}"
        + (
            f", above alpha = {alpha:g}: no paired reduction can be significant, so the claims that rest on one are "
            "inconclusive, not refuted"
            if smallest_p >= alpha
            else ""
        )
        + f"; significance becomes reachable at {seeds_for_significance(1, alpha)} seeds for one comparison and at "
        f"{seeds_for_significance(largest, alpha)} for the largest claim ({largest} comparisons, Holm)."
    )
    refuted = [v for v in verdicts if v.primary and v.verdict == REFUTED]
    why = ""
    if refuted:
        example = refuted[0]
        first = next(o for o in example.outcomes if o.verdict == REFUTED)
        why = f" For example, {_numbered(example.claim)} against {ERA_TEXT[example.era]} rests on: {first.text}."
    return (
        " ".join(parts)
        + " "
        + power
        + why
        + f" A leaked fraction of {spec.claims.meaningful_effect:g} counts as meaningful; 'recovered' is a near copy "
        "beyond every no-information baseline. The verdicts hold for the models and budgets audited here."
    )


def claims_table(verdicts: Sequence[Verdict]) -> list[str]:
    """The claims table in full: per claim and era, the primary verdict and the graded sensitivity."""
    sensitivity = [level for level in LEVELS if level != STRICT]
    head = ["#", "claim (abstract)", "era", "verdict (recovered)"]
    head += [f"at {level.replace('_ge_', ' >= ').replace('ssim', 'SSIM')}" for level in sensitivity]
    head += ["comparisons (supporting / refuting / inconclusive)", "seeds for significance (Holm)", "rule"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for claim in CLAIMS:
        for era in ERAS:
            mine = {v.level: v for v in verdicts if v.claim == claim and v.era == era}
            primary = mine.get(STRICT)
            if primary is None:
                continue
            counts = primary.counts
            row = [
                str(list(CLAIMS).index(claim) + 1),
                f'"{CLAIMS[claim]}"',
                era,
                f"**{primary.verdict}**",
                *[mine[level].verdict if level in mine else "-" for level in sensitivity],
                f"{len(primary.outcomes)} ({counts[SUPPORTED]} / {counts[REFUTED]} / {counts[INCONCLUSIVE]})",
                str(primary.seeds_needed) if primary.seeds_needed is not None else "-",
                primary.rule,
            ]
            lines.append("| " + " | ".join(row) + " |")
    return lines


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    return plt


def summary_figure(cells: Sequence[Cell], spec: StudySpec, folder: Path) -> Path:
    """Per arm (largest audited batch): the baseline, the least-leaking identical-label policy and DP-SGD per
    stage, recovered fraction over every attack with its seed-level interval, the top attack named."""
    plt = _pyplot()
    study = Study(spec)
    arms = list(dict.fromkeys(cell.arm for cell in cells))
    columns = 4
    rows_n = (len(arms) + columns - 1) // columns
    figure, axes = plt.subplots(rows_n, columns, figsize=(4.2 * columns, 3.4 * rows_n), squeeze=False, sharey=True)
    for index, arm in enumerate(arms):
        axis = axes[index // columns][index % columns]
        mine = [c for c in cells if c.arm == arm]
        size = max(c.batch_size for c in mine)
        mine = [c for c in mine if c.batch_size == size]
        stages = sorted({c.stage for c in mine}, key=lambda s: STAGE_ORDER.get(s, 9))
        identical = [c for c in mine if study.batching(c.policy) == "identical-labels" and not study.dp(c.policy)]
        best = (
            min(
                {c.policy for c in identical},
                key=lambda p: np.mean([c.recovered.value for c in identical if c.policy == p]),
            )
            if identical
            else None
        )
        series = [("baseline", spec.baseline)]
        if best is not None:
            series.append((f"best identical ({best})", best))
        series += [("DP-SGD", p) for p in dict.fromkeys(c.policy for c in mine) if study.dp(p)][:1]
        for offset, (label, policy) in enumerate(series):
            chosen = {c.stage: c for c in mine if c.policy == policy}
            xs = [i + (offset - 1) * 0.18 for i, s in enumerate(stages) if s in chosen]
            cs = [chosen[s] for s in stages if s in chosen]
            values = np.array([c.recovered.value for c in cs])
            low = np.nan_to_num(values - np.array([c.recovered.low for c in cs]))
            high = np.nan_to_num(np.array([c.recovered.high for c in cs]) - values)
            axis.errorbar(xs, values, yerr=[low, high], fmt="o", capsize=3, label=label)
            for x, cell, value in zip(xs, cs, values, strict=True):
                top = Counter(str(r.get("best_attack") or "") for r in cell.rows if int(float(r["recovered"])) > 0)
                if top and value > 0:
                    axis.annotate(
                        top.most_common(1)[0][0],
                        (x, value),
                        fontsize=6,
                        rotation=90,
                        xytext=(3, 4),
                        textcoords="offset points",
                    )
        axis.axhline(spec.claims.meaningful_effect, color="grey", linewidth=0.8, linestyle=":")
        axis.set_xticks(range(len(stages)))
        axis.set_xticklabels(stages, fontsize=8)
        axis.set_title(f"{arm}, batch {size}", fontsize=9)
        axis.set_ylim(-0.03, 1.1)
        axis.legend(fontsize=6, loc="lower left")
    for index in range(len(arms), rows_n * columns):
        axes[index // columns][index % columns].axis("off")
    for row in axes:
        row[0].set_ylabel("recovered (95% CI over seeds)", fontsize=8)
    figure.tight_layout()
    path = folder / "summary.png"
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def budgets_table(spec: StudySpec) -> list[str]:
    """The attack budgets as a short table: per arm its rounds, attacks and their parameters."""
    lines = ["| arm | rounds | attacks | budgets | audited batch sizes |", "|---|---|---|---|---|"]
    for arm in spec.arms:
        params = "; ".join(
            f"{name}: " + ", ".join(f"{k} {v}" for k, v in values.items()) for name, values in arm.attack_params.items()
        )
        sizes = arm.audit_batch_sizes if arm.audit_batch_sizes is not None else spec.audit.batch_sizes
        lines.append(
            f"| {arm.label} | {arm.rounds} | {arm.portfolio_label} | {params or 'defaults'} | "
            f"{', '.join(map(str, sizes))} |"
        )
    return lines
