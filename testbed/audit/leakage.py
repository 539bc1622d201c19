"""The leakage meter: sends attack outcomes to be scored against the ground truth, and logs the scores.

Per audited round and group it logs ``leakage/<group>/<metric>`` (AVD, MSE, PSNR, SSIM means and
medians, recovered fraction beyond the no-information baselines, the baselines' best scores as
``<metric>_baseline``, label accuracy and exact label histograms) and, per aggregator,
``leakage/<aggregator>/...``. With a portfolio of attacks these are the worst case over the attacks
(testbed.audit.worst_case) and each attack also logs ``leakage/<key>/<attack>/...``. A PNG grid of
originals above matched reconstructions per audited round, and at the end a CSV of every audited sample
(``samples.csv``, the worst case; ``samples_by_attack.csv`` with a portfolio). The scoring itself runs
in a ``LeakageScorer`` actor (testbed.audit.scoring); a round is logged once every attack task of it
has been scored, so each step gets its metrics once.
"""

from __future__ import annotations

import csv
import io
import logging
import time
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np

from metrics import METRIC_NAMES, best_baseline
from testbed.audit.grid import GRID_MAX_CLIENTS, render_grid
from testbed.audit.scoring import ScoredAudit, ScoredClient
from testbed.audit.worst_case import summarise, worst_cases
from testbed.config.schema import AuditConfig
from testbed.data.datasets import Dataset
from testbed.tracking.store import Tracker

log = logging.getLogger(__name__)

CSV_FIELDS = (
    "round",
    "aggregator",
    "group",
    "client",
    "sample",
    "label",
    "attack",
    "matched",
    *METRIC_NAMES,
    *(f"{name}_baseline" for name in METRIC_NAMES),
    "recovered",
)


def _at(items: Sequence[ScoredClient], key: str) -> list[ScoredClient]:
    """The scored clients of group ``key``, or received by aggregator ``key``."""
    return [item for item in items if key in (item.outcome.group, item.outcome.aggregator)]


class LeakageMeter:
    """Collects audit outcomes as they arrive and logs leakage for each audited round."""

    def __init__(
        self, dataset: Dataset, tracker: Tracker, run_id: str, scorer: Any, attacks: Sequence[str] = ()
    ) -> None:
        self.dataset = dataset
        self.attacks = list(attacks)
        self.said: set[tuple[str, str]] = set()  # (group, attack) pairs whose not-applicable reason was logged
        self.attack_rows: list[dict[str, Any]] = []  # with a portfolio: one row per sample per attack
        self.tracker = tracker
        self.run_id = run_id
        self.scorer = scorer
        self.pending: dict[Any, int] = {}  # scoring task -> its round
        self.outstanding: dict[int, int] = defaultdict(int)  # round -> scoring tasks not yet back
        self.arrived: dict[int, list[ScoredAudit]] = defaultdict(list)
        self.rows: list[dict[str, Any]] = []
        self.not_applicable: dict[str, int] = defaultdict(int)
        self.failed = 0  # audit tasks that raised (their clients are not scored; logged as audit/failed_tasks)
        self.failed_in: dict[int, int] = defaultdict(int)
        self.fresh: dict[str, float] = {}  # group -> recovered fraction of the rounds logged since take_fresh()
        self.grids: list[str] = []  # artifact paths of the audit grids logged so far

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps of the audits: the scored rows so far and the not-applicable counts.

        Audits still running when a run is interrupted are not kept; their rounds have no leakage rows.
        """
        return {
            "rows": list(self.rows),
            "attack_rows": list(self.attack_rows),
            "not_applicable": dict(self.not_applicable),
            "grids": list(self.grids),
        }

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint's audit state."""
        self.rows = list(state.get("rows", []))
        self.not_applicable.update(state.get("not_applicable", {}))
        self.grids = list(state.get("grids", []))
        self.attack_rows = list(state.get("attack_rows", []))

    def expect(self, round_index: int, ground_truth: dict[int, np.ndarray], outcome_refs: Sequence[Any]) -> None:
        """Send a round's pending attack outcomes to the scorer with the ground truth (client -> sample indices)."""
        if not outcome_refs:
            return
        import ray

        truth_ref = ray.put(ground_truth)
        for ref in outcome_refs:
            self.pending[self.scorer.score.remote(ref, truth_ref, round_index)] = round_index
            self.outstanding[round_index] += 1

    def collect(self, *, wait: bool) -> None:
        """Take the scored audits that are back (all of them when ``wait``); log every completed round."""
        import ray

        if not self.pending:
            return
        ready, _ = ray.wait(list(self.pending), num_returns=len(self.pending), timeout=None if wait else 0)
        for ref in ready:
            round_index = self.pending.pop(ref)
            self.outstanding[round_index] -= 1
            try:
                self.arrived[round_index].append(ray.get(ref))
            except ray.exceptions.RayError as exc:
                self.failed += 1
                self.failed_in[round_index] += 1
                lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
                cause = lines[-1] if lines else type(exc).__name__  # Ray puts the task's own error last
                log.warning("round %d: an audit task failed and its clients are not scored: %s", round_index + 1, cause)
        for round_index in sorted(r for r, count in self.outstanding.items() if count == 0):
            del self.outstanding[round_index]
            audits = self.arrived.pop(round_index, [])
            failed = self.failed_in.pop(round_index, 0)
            if audits:
                self._log_round(round_index, audits, failed)
            elif failed:
                self.tracker.log_metrics(self.run_id, {"audit/failed_tasks": float(failed)}, step=round_index + 1)

    def busy_rounds(self) -> int:
        """Audited rounds whose scores are not all back yet."""
        return sum(1 for count in self.outstanding.values() if count > 0)

    def wait_below(self, limit: int) -> None:
        """Wait for the oldest audited rounds until fewer than ``limit`` are still busy."""
        import ray

        while self.busy_rounds() >= limit:
            oldest = min(r for r, count in self.outstanding.items() if count > 0)
            ray.wait([ref for ref, r in self.pending.items() if r == oldest], num_returns=self.outstanding[oldest])
            self.collect(wait=False)

    def _log_round(self, round_index: int, audits: list[ScoredAudit], failed: int = 0) -> None:
        scored = [item for audit in audits for item in audit.scored]
        reasons = [reason for audit in audits for reason in audit.not_applicable]
        for group, attack, reason in reasons:
            self.not_applicable[reason] += 1
            if (group, attack) not in self.said:
                self.said.add((group, attack))
                log.warning("group %s: %s (counted in audit/not_applicable)", group, reason)
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
            self.rows += self._rows(case.client, case.chosen)
            if len(self.attacks) > 1:
                for item in case.by_attack.values():
                    self.attack_rows += self._rows(item, [item.outcome.attack] * item.result.n)
        shown = [c for c in cases if any(i.outcome.reconstruction is not None for i in c.by_attack.values())]
        if shown:
            several = len(self.attacks) > 1
            png = render_grid(round_index, shown[:GRID_MAX_CLIENTS], self.dataset.train_x, name_attacks=several)
            with self.tracker.staging() as folder:
                path = folder / f"round_{round_index + 1:04d}.png"
                path.write_bytes(png)
                self.tracker.log_file(self.run_id, path, "audits")
            self.grids.append(f"audits/{path.name}")

    def _rows(self, item: ScoredClient, attacks: list[str]) -> list[dict[str, Any]]:
        """One CSV row per sample of a scored client: scores, the best baseline's scores, the attack behind it."""
        best = best_baseline(item.baselines) if item.baselines else {}
        rows = []
        for position, sample in enumerate(item.sample_indices):
            row: dict[str, Any] = {
                "round": item.outcome.round + 1,
                "aggregator": item.outcome.aggregator,
                "group": item.outcome.group,
                "client": item.outcome.client,
                "sample": int(sample),
                "label": int(self.dataset.train_y[sample]),
                "attack": attacks[position],
                "matched": int(item.result.assignment[position]),
                "recovered": bool(item.flags[position]),
            }
            row.update({name: float(item.result.scores[name][position]) for name in METRIC_NAMES})
            row.update({f"{name}_baseline": float(best[name][position]) if best else "" for name in METRIC_NAMES})
            rows.append(row)
        return rows

    def take_fresh(self) -> dict[str, float]:
        """The recovered fraction per group of the rounds logged since the last call (for the progress line)."""
        fresh, self.fresh = self.fresh, {}
        return fresh

    def summary_by_group(self) -> dict[str, dict[str, float]]:
        """Leakage over every audited sample of the run, per client group: samples, recovered, mean SSIM and AVD."""
        result: dict[str, dict[str, float]] = {}
        for group in sorted({str(row["group"]) for row in self.rows}):
            rows = [row for row in self.rows if row["group"] == group]
            ssim = [row["ssim"] for row in rows if np.isfinite(row["ssim"])]
            avd = [row["avd"] for row in rows if np.isfinite(row["avd"])]
            result[group] = {
                "audited_samples": float(len(rows)),
                "recovered_fraction": float(np.mean([bool(row["recovered"]) for row in rows])),
                "ssim_mean": float(np.mean(ssim)) if ssim else float("nan"),
                "avd_mean": float(np.mean(avd)) if avd else float("nan"),
            }
        return result

    def finish(self) -> None:
        """Wait for every outstanding audit and store the per-sample CSV."""
        self.collect(wait=True)
        if not self.rows and not self.not_applicable:
            return
        self.tracker.log_text(self.run_id, _csv(self.rows), "audits/samples.csv")
        if self.attack_rows:
            self.tracker.log_text(self.run_id, _csv(self.attack_rows), "audits/samples_by_attack.csv")
        if self.not_applicable:
            self.tracker.log_json(self.run_id, dict(self.not_applicable), "audits/not_applicable.json")


def _csv(rows: Sequence[dict[str, Any]]) -> str:
    """Per-sample rows as CSV text with the CSV_FIELDS header."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=CSV_FIELDS)
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue()


def make_room(meter: Any, audit: AuditConfig, clients: int) -> tuple[float, int]:
    """Keep the audit backlog bounded before an audited round: (seconds waited, clients not audited).

    ``meter`` is a LeakageMeter (or anything with ``busy_rounds`` and ``wait_below``).
    """
    if meter.busy_rounds() < audit.backlog:
        return 0.0, 0
    if audit.when_busy == "skip":
        return 0.0, clients
    started = time.perf_counter()
    meter.wait_below(audit.backlog)
    return time.perf_counter() - started, 0
