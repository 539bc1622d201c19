"""A reduced mixing-gradients study: a real sweep on a local Ray, then its report from MLflow."""

from __future__ import annotations

import csv
from typing import Any

import pytest

from testbed.config.topology import apply_overrides, read_yaml, validate
from testbed.report.command import report_command
from testbed.sweep import run_sweep
from tests.conftest import REPO

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REDUCED = [
    {"clients.c.defence": {"batching": "distinct-labels", "loss": "cross-entropy"}},
    {"clients.c.defence": {"batching": "identical-labels", "loss": "cross-entropy"}},
    {"clients.c.defence": {"batching": "identical-labels", "loss": "mse"}},
]


def test_reduced_study_and_its_report(local_ray: None, tracking: dict[str, Any], tmp_path: Any) -> None:
    data, _ = read_yaml(REPO / "topologies" / "mixing-study.yaml")
    data = apply_overrides(data, ["rounds=2", "attack.audit.every=1", "attack.audit.clients_per_round=4"])
    data["tracking"] = tracking
    data["sweep"] = REDUCED
    result = run_sweep(validate(data), show_progress=False)
    assert len(result.runs) == 3

    out = tmp_path / "report"
    markdown = report_command(result.parent_run_id, uri=tracking["uri"], out=out)
    assert markdown.is_file() and (out / "privacy_utility.png").stat().st_size > 10_000
    assert list(out.glob("leakage_vs_batch_*.png"))
    with open(out / "leakage.csv", encoding="utf-8") as handle:
        rows = {row["defence"]: row for row in csv.DictReader(handle)}
    distinct = rows["distinct-labels / cross-entropy"]
    identical = rows["identical-labels / cross-entropy"]
    mse = rows["identical-labels / mse"]
    # softmax, FedSGD, batches of 4: the logit-space ce-demix separates distinct-label batches and
    # identical-label ones alike (each sample's prediction differs, so P - Y keeps full rank), and the
    # mse loss is attacked too, not skipped
    assert float(distinct["recovered_fraction"]) >= 0.9, distinct
    assert float(identical["recovered_fraction"]) >= 0.5, identical
    for row in (distinct, identical, mse):
        assert int(row["samples"]) == 2 * 4 * 4, row  # rounds x audited clients x batch size
    assert float(identical["label_histogram_exact"]) == 1.0  # identical labels: the label leak is certain
    text = markdown.read_text(encoding="utf-8")
    assert "identical-labels / mse" in text and result.parent_run_id in text
