"""The leakage meter: sends attack outcomes to be scored against the ground truth, and logs the scores.

Per audited round and group it logs ``leakage/<group>/<metric>`` (AVD, MSE, PSNR, SSIM means and
medians, recovered fraction, label accuracy) and, per aggregator, ``leakage/<aggregator>/...``; a PNG
grid of originals above matched reconstructions; and at the end a CSV of every audited sample. The
scoring itself runs in a ``LeakageScorer`` actor (testbed.audit.scoring); a round is logged once every
attack task of it has been scored, so each step gets its metrics once.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import time
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np

from metrics import METRIC_NAMES, MatchResult, recovered, summarize
from testbed.audit.scoring import ScoredAudit, ScoredClient
from testbed.config.schema import AuditConfig
from testbed.data.datasets import Dataset
from testbed.tracking.store import Tracker

log = logging.getLogger(__name__)

GRID_MAX_CLIENTS = 6
GRID_MAX_IMAGES = 8
CSV_FIELDS = (
    "round",
    "aggregator",
    "group",
    "client",
    "sample",
    "label",
    "matched",
    *METRIC_NAMES,
    "recovered",
)


def _pool(results: Sequence[MatchResult]) -> MatchResult:
    """One MatchResult over the samples of several clients (assignments stay per client)."""
    return MatchResult(
        assignment=np.concatenate([r.assignment for r in results]),
        scores={name: np.concatenate([r.scores[name] for r in results]) for name in METRIC_NAMES},
    )


class LeakageMeter:
    """Collects audit outcomes as they arrive and logs leakage for each audited round."""

    def __init__(self, dataset: Dataset, tracker: Tracker, run_id: str, scorer: Any) -> None:
        self.dataset = dataset
        self.tracker = tracker
        self.run_id = run_id
        self.scorer = scorer
        self.pending: dict[Any, int] = {}  # scoring task -> its round
        self.outstanding: dict[int, int] = defaultdict(int)  # round -> scoring tasks not yet back
        self.arrived: dict[int, list[ScoredAudit]] = defaultdict(list)
        self.rows: list[dict[str, Any]] = []
        self.not_applicable: dict[str, int] = defaultdict(int)
        self.failed = 0
        self.fresh: dict[str, float] = {}  # group -> recovered fraction of the rounds logged since take_fresh()
        self.grids: list[str] = []  # artifact paths of the audit grids logged so far

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps of the audits: the scored rows so far and the not-applicable counts.

        Audits still running when a run is interrupted are not kept; their rounds have no leakage rows.
        """
        return {"rows": list(self.rows), "not_applicable": dict(self.not_applicable), "grids": list(self.grids)}

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint's audit state."""
        self.rows = list(state.get("rows", []))
        self.not_applicable.update(state.get("not_applicable", {}))
        self.grids = list(state.get("grids", []))

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
                log.warning("an audit failed and is skipped: %s", str(exc).strip().splitlines()[0])
        for round_index in sorted(r for r, count in self.outstanding.items() if count == 0):
            del self.outstanding[round_index]
            audits = self.arrived.pop(round_index, [])
            if audits:
                self._log_round(round_index, audits)

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

    def _log_round(self, round_index: int, audits: list[ScoredAudit]) -> None:
        scored = [item for audit in audits for item in audit.scored]
        reasons = [reason for audit in audits for reason in audit.not_applicable]
        for reason in reasons:
            self.not_applicable[reason] += 1
        metrics: dict[str, float] = {
            "attack_seconds": float(sum(audit.attack_seconds for audit in audits)),
            "audit/not_applicable": float(len(reasons)),
        }
        for key in sorted({s.outcome.group for s in scored} | {s.outcome.aggregator for s in scored}):
            members = [s for s in scored if key in (s.outcome.group, s.outcome.aggregator)]
            pooled = _pool([s.result for s in members])
            summary = summarize(pooled)
            labels = [(s.label_accuracy, s.result.n) for s in members if s.label_accuracy is not None]
            if labels:
                weighted = sum(a * n for a, n in labels) / max(sum(n for _, n in labels), 1)
                summary = dataclasses.replace(summary, label_accuracy=weighted)
            metrics.update(summary.as_metrics(prefix=f"leakage/{key}/"))
            if any(s.outcome.group == key for s in members):
                self.fresh[key] = summary.recovered_fraction
        self.tracker.log_metrics(self.run_id, metrics, step=round_index + 1)
        for item in scored:
            self._add_rows(item)
        shown = [item for item in scored if item.outcome.reconstruction is not None][:GRID_MAX_CLIENTS]
        if shown:
            self._log_grid(round_index, shown)

    def _add_rows(self, item: ScoredClient) -> None:
        flags = recovered(item.result.scores)
        for position, sample in enumerate(item.sample_indices):
            row: dict[str, Any] = {
                "round": item.outcome.round + 1,
                "aggregator": item.outcome.aggregator,
                "group": item.outcome.group,
                "client": item.outcome.client,
                "sample": int(sample),
                "label": int(self.dataset.train_y[sample]),
                "matched": int(item.result.assignment[position]),
                "recovered": bool(flags[position]),
            }
            row.update({name: float(item.result.scores[name][position]) for name in METRIC_NAMES})
            self.rows.append(row)

    def _log_grid(self, round_index: int, shown: list[ScoredClient]) -> None:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot as plt

        columns = max(min(len(s.sample_indices), GRID_MAX_IMAGES) for s in shown)
        figure, axes = plt.subplots(
            2 * len(shown), columns, figsize=(1.3 * columns + 1, 2.7 * len(shown)), squeeze=False
        )
        for block, item in enumerate(shown):
            images = item.outcome.reconstruction.images.detach().cpu().numpy() if item.outcome.reconstruction else None
            for column in range(columns):
                top, bottom = axes[2 * block, column], axes[2 * block + 1, column]
                top.axis("off")
                bottom.axis("off")
                if column >= min(len(item.sample_indices), GRID_MAX_IMAGES):
                    continue
                top.imshow(_display(self.dataset.train_x[item.sample_indices[column]]), cmap="gray", vmin=0, vmax=1)
                matched = int(item.result.assignment[column])
                if images is not None and matched >= 0:
                    bottom.imshow(_display(images[matched]), cmap="gray", vmin=0, vmax=1)
                bottom.set_title(f"AVD {item.result.scores['avd'][column]:.3f}", fontsize=7, y=-0.28)
            axes[2 * block, 0].set_title(f"client {item.outcome.client} ({item.outcome.group})", fontsize=8, loc="left")
        figure.suptitle(f"Round {round_index + 1}: originals (upper) and matched reconstructions (lower)", fontsize=9)
        figure.tight_layout()
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=90)
        plt.close(figure)
        with self.tracker.staging() as folder:
            path = folder / f"round_{round_index + 1:04d}.png"
            path.write_bytes(buffer.getvalue())
            self.tracker.log_file(self.run_id, path, "audits")
        self.grids.append(f"audits/{path.name}")

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
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(self.rows)
        self.tracker.log_text(self.run_id, text.getvalue(), "audits/samples.csv")
        if self.not_applicable:
            self.tracker.log_json(self.run_id, dict(self.not_applicable), "audits/not_applicable.json")


def _display(image: np.ndarray) -> np.ndarray:
    """An image as matplotlib shows it: H x W for one channel, H x W x C otherwise, clipped to [0, 1]."""
    array = np.nan_to_num(np.asarray(image, dtype=np.float32), nan=0.0)
    array = np.clip(np.abs(array), 0.0, 1.0)
    if array.ndim == 3:
        array = array[0] if array.shape[0] == 1 else np.transpose(array, (1, 2, 0))
    return array


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
