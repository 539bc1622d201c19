"""The leakage log: the scores of each audited round as metrics, the run's audited samples, its artifacts.

Per audited round and group it logs ``leakage/<group>/<metric>`` (AVD, MSE, PSNR, SSIM means and
medians, recovered fraction beyond the no-information baselines, the baselines' best scores as
``<metric>_baseline``, the SSIM ladder ``ssim_ge_0.5``, ``ssim_ge_0.7`` and ``best_ssim_q1/median/q3``,
label accuracy and exact label histograms) and, per aggregator,
``leakage/<aggregator>/...``. With a portfolio of attacks these are the worst case over the attacks
(testbed.audit.worst_case) and each attack also logs ``leakage/<key>/<attack>/...``. A PNG grid of
originals above matched reconstructions per audited round, and at the end a CSV of every audited sample
(``samples.csv``, the worst case; ``samples_by_attack.csv`` with a portfolio). The scoring itself runs
in ``LeakageScorer`` actors (testbed.audit.scoring), reached through the audit queue
(testbed.audit.queue), which hands a round to ``LeakageLog.record`` once every attack task of it has
been scored, so each step gets its metrics once.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np

from metrics import METRIC_NAMES, best_baseline, graded_leakage
from metrics.graded import level_name
from testbed.audit.grid import GRID_MAX_CLIENTS, render_grid
from testbed.audit.sample_table import BEST_SSIM, SampleTable
from testbed.audit.scoring import ScoredAudit, ScoredClient
from testbed.audit.worst_case import WorstCase, summarise, worst_cases
from testbed.data.datasets import Dataset
from testbed.tracking.store import Tracker

log = logging.getLogger(__name__)


def _at(items: Sequence[ScoredClient], key: str) -> list[ScoredClient]:
    """The scored clients of group ``key``, or received by aggregator ``key``."""
    return [item for item in items if key in (item.outcome.group, item.outcome.aggregator)]


class NotApplicable:
    """Counts of the reasons an attack did not apply, each (group, attack) pair's first one logged as a warning."""

    def __init__(self, counts: dict[str, int] | None = None) -> None:
        self.counts: dict[str, int] = defaultdict(int, counts or {})
        self.said: set[tuple[str, str]] = set()  # (group, attack) pairs whose reason was logged

    def add(self, group: str, attack: str, reason: str) -> None:
        """Count one update an attack did not apply to."""
        self.counts[reason] += 1
        if (group, attack) not in self.said:
            self.said.add((group, attack))
            log.warning("group %s: %s (counted in audit/not_applicable)", group, reason)


class LeakageLog:
    """Logs leakage for each audited round the audit queue releases, and keeps the run's audited samples."""

    def __init__(self, dataset: Dataset, tracker: Tracker, run_id: str, attacks: Sequence[str] = ()) -> None:
        self.dataset = dataset
        self.tracker = tracker
        self.run_id = run_id
        self.attacks = list(attacks)
        self.samples = SampleTable()  # one row per audited sample: the worst case over the attacks
        self.attack_samples = SampleTable()  # with a portfolio: one row per sample per attack
        self.not_applicable = NotApplicable()
        self.fresh: dict[str, float] = {}  # group -> recovered fraction of the rounds logged since take_fresh()
        self.grids: list[str] = []  # artifact paths of the audit grids logged so far

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps of the audits: the scored samples so far and the not-applicable counts.

        Audits still running when a run is interrupted are not kept; their rounds have no leakage rows.
        """
        return {
            "rows": self.samples.state(),
            "attack_rows": self.attack_samples.state(),
            "not_applicable": dict(self.not_applicable.counts),
            "grids": list(self.grids),
        }

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint's audit state."""
        self.samples = SampleTable.from_state(state.get("rows", []))
        self.not_applicable = NotApplicable(dict(state.get("not_applicable", {})))
        self.grids = list(state.get("grids", []))
        self.attack_samples = SampleTable.from_state(state.get("attack_rows", []))

    def record(self, round_index: int, audits: list[ScoredAudit], failed: int = 0) -> list[WorstCase]:
        """Log one audited round whose every scoring task is back (``failed`` of them raised); its worst cases."""
        if audits:
            return self._log_round(round_index, audits, failed)
        if failed:
            self.tracker.log_metrics(self.run_id, {"audit/failed_tasks": float(failed)}, step=round_index + 1)
        return []

    def _log_round(self, round_index: int, audits: list[ScoredAudit], failed: int = 0) -> list[WorstCase]:
        scored = [item for audit in audits for item in audit.scored]
        reasons = [reason for audit in audits for reason in audit.not_applicable]
        for group, attack, reason in reasons:
            self.not_applicable.add(group, attack, reason)
        metrics: dict[str, float] = {
            "attack_seconds": float(sum(audit.attack_seconds for audit in audits)),
            "audit/not_applicable": float(len(reasons)),
            "audit/failed_tasks": float(failed),
        }
        for attack in self.attacks if len(self.attacks) > 1 else ():
            metrics[f"audit/{attack}/not_applicable"] = float(sum(1 for _, name, _ in reasons if name == attack))
        cases = worst_cases(scored)
        for key in sorted({c.client.outcome.group for c in cases} | {c.client.outcome.aggregator for c in cases}):
            members = _at([c.client for c in cases], key)
            summary = summarise(members)
            metrics.update({f"leakage/{key}/{name}": value for name, value in summary.items()})
            if any(c.client.outcome.group == key for c in cases):
                self.fresh[key] = summary["recovered_fraction"]
            for attack in self.attacks if len(self.attacks) > 1 else ():
                mine = [s for s in _at(scored, key) if s.outcome.attack == attack]
                if mine:
                    metrics.update({f"leakage/{key}/{attack}/{name}": value for name, value in summarise(mine).items()})
        self.tracker.log_metrics(self.run_id, metrics, step=round_index + 1)
        for case in cases:
            self._append(self.samples, case.client, case.chosen)
            if len(self.attacks) > 1:
                for item in case.by_attack.values():
                    self._append(self.attack_samples, item, item.outcome.attack)
        shown = [c for c in cases if any(i.outcome.reconstruction is not None for i in c.by_attack.values())]
        if shown:
            several = len(self.attacks) > 1
            try:
                png = render_grid(round_index, shown[:GRID_MAX_CLIENTS], self.dataset.train_x, portfolio=several)
            except (ValueError, TypeError) as exc:  # a picture must not end a run whose scores are logged
                log.warning("round %d: the audit grid could not be drawn: %s", round_index + 1, exc)
                return cases
            with self.tracker.staging() as folder:
                path = folder / f"round_{round_index + 1:04d}.png"
                path.write_bytes(png)
                self.tracker.log_file(self.run_id, path, "audits")
            self.grids.append(f"audits/{path.name}")
        return cases

    def _append(self, table: SampleTable, item: ScoredClient, attacks: str | list[str]) -> None:
        """One row per sample of a scored client: scores, the best baseline's scores, the attack behind it."""
        best = best_baseline(item.baselines) if item.baselines else {}
        samples = np.asarray(item.sample_indices, dtype=np.int64)
        table.append(
            {"aggregator": item.outcome.aggregator, "group": item.outcome.group, "attack": attacks},
            {
                "round": item.outcome.round + 1,
                "client": item.outcome.client,
                "sample": samples,
                "label": self.dataset.train_y[samples],
                "matched": item.result.assignment,
                **{name: item.result.scores[name] for name in METRIC_NAMES},
                BEST_SSIM: item.ssim_best(),
                **{f"{name}_baseline": best[name] if best else np.nan for name in METRIC_NAMES},
            },
            item.flags,
        )

    def take_fresh(self) -> dict[str, float]:
        """The recovered fraction per group of the rounds logged since the last call (for the progress line)."""
        fresh, self.fresh = self.fresh, {}
        return fresh

    def summary_by_group(self) -> dict[str, dict[str, float]]:
        """Leakage over every audited sample of the run, per client group: samples, recovered, the SSIM ladder
        (``ssim_ge_0.5``, ``ssim_ge_0.7``: ``metrics.graded_leakage`` of the samples' best SSIM), mean SSIM
        and AVD."""
        result: dict[str, dict[str, float]] = {}
        codes = self.samples.column("group")
        for code, group in sorted(enumerate(self.samples.vocabulary["group"]), key=lambda pair: pair[1]):
            mine = codes == code
            if not mine.any():
                continue
            ssim = self.samples.column("ssim")[mine]
            avd = self.samples.column("avd")[mine]
            ssim, avd = ssim[np.isfinite(ssim)], avd[np.isfinite(avd)]
            recovered = self.samples.column("recovered")[mine]
            graded = graded_leakage(
                self.samples.column(BEST_SSIM)[mine], recovered, self.samples.column("ssim_baseline")[mine]
            )
            result[group] = {
                "audited_samples": float(mine.sum()),
                "recovered_fraction": float(recovered.mean()),
                **{level_name(level): fraction for level, fraction in graded.at_least.items()},
                "ssim_mean": float(ssim.mean()) if len(ssim) else float("nan"),
                "avd_mean": float(avd.mean()) if len(avd) else float("nan"),
            }
        return result

    def finish(self) -> None:
        """Store the per-sample CSV (after the audit queue has released every round)."""
        if not len(self.samples) and not self.not_applicable.counts:
            return
        self.tracker.log_text(self.run_id, self.samples.to_csv(), "audits/samples.csv")
        if len(self.attack_samples):
            self.tracker.log_text(self.run_id, self.attack_samples.to_csv(), "audits/samples_by_attack.csv")
        if self.not_applicable.counts:
            self.tracker.log_json(self.run_id, dict(self.not_applicable.counts), "audits/not_applicable.json")
