"""The leakage meter: joins attack outcomes with the ground truth the simulator kept, and logs them.

Per audited round and group it logs ``leakage/<group>/<metric>`` (AVD, MSE, PSNR, SSIM means and
medians, recovered fraction, label accuracy) and, per aggregator, ``leakage/<aggregator>/...``; a PNG
grid of originals above matched reconstructions; and at the end a CSV of every audited sample.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np

from metrics import METRIC_NAMES, MatchResult, label_accuracy, match_many, recovered, summarize
from testbed.audit import AuditOutcome
from testbed.datasets import Dataset
from testbed.tracking import Tracker

log = logging.getLogger(__name__)

GRID_MAX_CLIENTS = 6
MATCH_BLOCK = 4  # clients matched per vectorised pass: small blocks keep the image maps in cache
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


@dataclasses.dataclass
class ScoredClient:
    """One audited client's originals, matched reconstructions and scores."""

    outcome: AuditOutcome
    sample_indices: np.ndarray
    result: MatchResult
    label_accuracy: float | None


def _pool(results: Sequence[MatchResult]) -> MatchResult:
    """One MatchResult over the samples of several clients (assignments stay per client)."""
    return MatchResult(
        assignment=np.concatenate([r.assignment for r in results]),
        scores={name: np.concatenate([r.scores[name] for r in results]) for name in METRIC_NAMES},
    )


class LeakageMeter:
    """Collects audit outcomes as they arrive and logs leakage for each audited round."""

    def __init__(self, dataset: Dataset, tracker: Tracker, run_id: str) -> None:
        self.dataset = dataset
        self.tracker = tracker
        self.run_id = run_id
        self.ground_truth: dict[tuple[int, int], np.ndarray] = {}
        self.pending: list[Any] = []
        self.rows: list[dict[str, Any]] = []
        self.not_applicable: dict[str, int] = defaultdict(int)
        self.failed = 0

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps of the audits: the scored rows so far and the not-applicable counts.

        Audits still running when a run is interrupted are not kept; their rounds have no leakage rows.
        """
        return {"rows": list(self.rows), "not_applicable": dict(self.not_applicable)}

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint's audit state."""
        self.rows = list(state.get("rows", []))
        self.not_applicable.update(state.get("not_applicable", {}))

    def expect(self, round_index: int, ground_truth: dict[int, np.ndarray], outcome_refs: Sequence[Any]) -> None:
        """Register a round's ground truth (client -> sample indices) and its pending outcome references."""
        for client, indices in ground_truth.items():
            self.ground_truth[(round_index, client)] = indices
        self.pending.extend(outcome_refs)

    def collect(self, *, wait: bool) -> None:
        """Score every finished audit (all of them when ``wait``), logging per audited round."""
        import ray

        if not self.pending:
            return
        ready, self.pending = ray.wait(self.pending, num_returns=len(self.pending), timeout=None if wait else 0)
        by_round: dict[int, list[AuditOutcome]] = defaultdict(list)
        for ref in ready:
            try:
                outcomes = ray.get(ref)
            except ray.exceptions.RayError as exc:
                self.failed += 1
                log.warning("an audit failed and is skipped: %s", str(exc).strip().splitlines()[0])
                continue
            for outcome in outcomes:
                by_round[outcome.round].append(outcome)
        for round_index in sorted(by_round):
            self._score_round(round_index, by_round[round_index])

    def _score_all(self, outcomes: list[AuditOutcome]) -> list[ScoredClient]:
        """Match every outcome's reconstructions with its client's originals (one vectorised pass)."""
        found: list[tuple[AuditOutcome, np.ndarray]] = []
        for outcome in outcomes:
            indices = self.ground_truth.pop((outcome.round, outcome.client), None)
            if indices is None or outcome.reconstruction is None:
                if outcome.not_applicable:
                    self.not_applicable[outcome.not_applicable] += 1
                continue
            found.append((outcome, indices))
        image_shape = self.dataset.train_x.shape[1:]
        batches = [
            (
                self.dataset.train_x[indices],
                outcome.reconstruction.images.detach().cpu().numpy().reshape(-1, *image_shape),
            )
            for outcome, indices in found
            if outcome.reconstruction is not None
        ]
        results = [
            result
            for start in range(0, len(batches), MATCH_BLOCK)
            for result in match_many(batches[start : start + MATCH_BLOCK])
        ]
        scored = []
        for (outcome, indices), result in zip(found, results, strict=True):
            assert outcome.reconstruction is not None
            labels = None
            if outcome.reconstruction.labels is not None:
                labels = label_accuracy(self.dataset.train_y[indices], outcome.reconstruction.labels.cpu().numpy())
            scored.append(ScoredClient(outcome, indices, result, labels))
        return scored

    def _score_round(self, round_index: int, outcomes: list[AuditOutcome]) -> None:
        scored = self._score_all(outcomes)
        metrics: dict[str, float] = {
            "attack_seconds": float(sum(o.seconds for o in outcomes)),
            "audit/not_applicable": float(sum(o.reconstruction is None for o in outcomes)),
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
        self.tracker.log_metrics(self.run_id, metrics, step=round_index + 1)
        for item in scored:
            self._add_rows(item)
        if scored:
            self._log_grid(round_index, scored)

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

    def _log_grid(self, round_index: int, scored: list[ScoredClient]) -> None:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot as plt

        shown = scored[:GRID_MAX_CLIENTS]
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
