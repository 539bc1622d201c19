"""The worst case over a portfolio of attacks, and the leakage summary of a set of scored clients.

Each audited client is scored once per attack that applied. Its worst case (for the client; the best
for the attacker) takes, sample by sample, the attack whose reconstruction fared best against the
ground truth: recovered beyond the baselines first, then the higher SSIM, then the lower AVD. This is
chosen after the fact with the ground truth, which no real attacker has: it bounds what the portfolio
leaks, and the per-attack numbers show which attack achieved it.

Short of a near copy, ``ladder`` grades what leaks (``metrics.graded_leakage``): per sample its best SSIM
over the attacks, counted at each SSIM level when it beats every baseline's SSIM.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Sequence

import numpy as np

from metrics import METRIC_NAMES, LeakageSummary, MatchResult, best_baseline, graded_leakage, summarize
from metrics.graded import level_name
from testbed.audit.scoring import ScoredClient


@dataclasses.dataclass
class WorstCase:
    """One client's worst case: per sample the chosen attack, its scores, and the attacks' scored clients."""

    client: ScoredClient  # scores, flags and baselines per sample are those of the chosen attack
    chosen: list[str]  # per sample, the attack whose reconstruction is kept
    by_attack: dict[str, ScoredClient]


def _rank(item: ScoredClient, position: int) -> tuple[bool, float, float]:
    ssim = float(item.result.scores["ssim"][position])
    avd = float(item.result.scores["avd"][position])
    return (bool(item.flags[position]), ssim if np.isfinite(ssim) else -np.inf, -avd if np.isfinite(avd) else -np.inf)


def _best(items: Sequence[ScoredClient], position: int) -> ScoredClient:
    return max(items, key=lambda item: _rank(item, position))


def worst_cases(scored: Sequence[ScoredClient]) -> list[WorstCase]:
    """One WorstCase per (aggregator, client), in first-seen order, from every attack's scored client."""
    by_client: dict[tuple[str, int], dict[str, ScoredClient]] = defaultdict(dict)
    for item in scored:
        by_client[(item.outcome.aggregator, item.outcome.client)][item.outcome.attack] = item
    cases = []
    for attacks in by_client.values():
        items = list(attacks.values())
        first = items[0]
        if len(items) == 1:  # one attack applied: its own scores are the worst case
            cases.append(WorstCase(first, [first.outcome.attack] * first.result.n, attacks))
            continue
        winners = [_best(items, position) for position in range(first.result.n)]
        scores = {
            name: np.array([w.result.scores[name][i] for i, w in enumerate(winners)], dtype=np.float64)
            for name in METRIC_NAMES
        }
        assignment = np.array([w.result.assignment[i] for i, w in enumerate(winners)], dtype=np.int64)
        accuracies = [item.label_accuracy for item in items if item.label_accuracy is not None]
        exact = [item.labels_exact for item in items if item.labels_exact is not None]
        combined = ScoredClient(
            outcome=first.outcome,
            sample_indices=first.sample_indices,
            result=MatchResult(assignment=assignment, scores=scores, metric=first.result.metric),
            label_accuracy=max(accuracies) if accuracies else None,
            baselines=first.baselines,
            flags=np.array([bool(w.flags[i]) for i, w in enumerate(winners)], dtype=bool),
            labels_exact=any(exact) if exact else None,
            best_ssim=np.fmax.reduce(np.stack([item.result.scores["ssim"] for item in items]), axis=0),
        )
        cases.append(WorstCase(combined, [w.outcome.attack for w in winners], attacks))
    return cases


def summarise(members: Sequence[ScoredClient]) -> dict[str, float]:
    """Leakage of the samples of ``members``: metric means and medians, recovered fraction (beyond the
    baselines), the baselines' best scores, label accuracy and the share of exact label histograms.

    Names as in ``LeakageSummary.as_metrics`` plus ``<metric>_baseline`` (mean over samples of the best
    baseline score), ``label_histogram_exact`` and the SSIM ladder (``ladder``); the caller adds the
    ``leakage/<key>/`` prefix.
    """
    pooled = MatchResult(
        assignment=np.concatenate([m.result.assignment for m in members]),
        scores={name: np.concatenate([m.result.scores[name] for m in members]) for name in METRIC_NAMES},
    )
    summary: LeakageSummary = summarize(pooled)
    flags = np.concatenate([m.flags for m in members])
    summary = dataclasses.replace(summary, recovered_fraction=float(np.mean(flags)) if len(flags) else float("nan"))
    labels = [(m.label_accuracy, m.result.n) for m in members if m.label_accuracy is not None]
    if labels:
        weighted = sum(a * n for a, n in labels) / max(sum(n for _, n in labels), 1)
        summary = dataclasses.replace(summary, label_accuracy=weighted)
    metrics = summary.as_metrics()
    with_baselines = [m for m in members if m.baselines]
    if with_baselines:
        best = [best_baseline(m.baselines) for m in with_baselines]
        for name in METRIC_NAMES:
            values = np.concatenate([b[name] for b in best])
            metrics[f"{name}_baseline"] = float(np.mean(values[np.isfinite(values)])) if len(values) else float("nan")
    exact = [m.labels_exact for m in members if m.labels_exact is not None]
    if exact:
        metrics["label_histogram_exact"] = float(np.mean(exact))
    metrics.update(ladder(members))
    return metrics


LADDER_QUARTILES = ("best_ssim_q1", "best_ssim_median", "best_ssim_q3")
"""Names of the quartiles of the samples' best SSIM (``ssim_median`` is the kept reconstructions' median)."""


def ladder(members: Sequence[ScoredClient]) -> dict[str, float]:
    """The SSIM ladder of the samples of ``members``, from ``metrics.graded_leakage``.

    ``ssim_ge_0.5`` and ``ssim_ge_0.7``: the fraction of samples whose best SSIM over the attacks is at
    least that level and above the best baseline's SSIM (no baselines drawn: above nothing);
    ``best_ssim_q1``, ``best_ssim_median``, ``best_ssim_q3``: quartiles of that best SSIM. Non-finite
    values are left out, as ``LeakageSummary.as_metrics`` does.
    """
    if not members:
        return {}
    ssim = np.concatenate([m.ssim_best() for m in members])
    flags = np.concatenate([m.flags for m in members])
    floor = (
        np.concatenate(
            [best_baseline(m.baselines)["ssim"] if m.baselines else np.full(m.result.n, np.nan) for m in members]
        )
        if any(m.baselines for m in members)
        else None
    )
    graded = graded_leakage(ssim, flags, floor)
    values = {level_name(level): fraction for level, fraction in graded.at_least.items()}
    values.update(zip(LADDER_QUARTILES, graded.ssim_quartiles, strict=True))
    return {name: float(value) for name, value in values.items() if np.isfinite(value)}
