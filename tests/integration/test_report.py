"""``testbed report`` on a real sqlite MLflow store holding a sweep laid out as the engine logs it."""

from __future__ import annotations

import csv
import io
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from testbed.audit.sample_table import CSV_FIELDS
from testbed.config.load import load_experiment
from testbed.config.topology import validate
from testbed.errors import UserError
from testbed.report.command import report_command
from testbed.tracking.store import flatten
from tests.conftest import REPO, small_experiment

INF = math.inf
MIXED = "identical-labels / cross-entropy"
PLAIN = "random / cross-entropy / clip-l2(1.0)"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@dataclass
class Child:
    """One child run to create: its combination, accuracy per round and audited samples per group."""

    model: str
    batch_size: int
    accuracy: list[float]
    samples: dict[str, list[tuple[float, float, bool]]]  # group -> (avd, ssim, recovered) per sample
    status: str = "FINISHED"
    label_accuracy: tuple[tuple[float, int], ...] = ()  # (value, n) of the mixed group per audited round
    label_exact: tuple[float, ...] = ()  # the mixed group's share of exact label histograms per audited round
    not_applicable: dict[str, int] | None = None


CHILDREN = [
    Child("softmax", 1, [0.55, 0.62], {"mixed": [(0.0, 1.0, True)] * 2, "plain": [(0.01, 0.99, True)] * 2}),
    Child(
        "softmax",
        4,
        [0.90, 0.83],
        {
            "mixed": [(0.2, 0.9, True), (0.4, 0.5, False), (0.6, 0.3, False), (INF, -1.0, False)],
            "plain": [(0.05, 0.97, True)] * 4,
        },
        label_accuracy=((0.5, 1), (1.0, 3)),
        label_exact=(0.0, 1.0),
    ),
    Child(
        "softmax",
        8,
        [0.70, 0.81],
        {"mixed": [(0.9, 0.1, False), (1.1, 0.0, False)]},
        not_applicable={"transform hides the gradient": 3},
    ),
    Child("mlp", 4, [0.40, 0.91], {"mixed": [(0.3, 0.8, True)] * 3, "plain": [(0.1, 0.9, True)] * 3}),
    Child("softmax", 16, [0.2], {}, status="FAILED"),
]


def _experiment(tracking: dict[str, Any], model: str, batch_size: int, attack: bool = True) -> dict[str, Any]:
    data = small_experiment(
        tracking,
        model={"name": model, "hidden": [32]},
        clients=[
            {"group": "mixed", "count": 20, "batch_size": batch_size, "defence": {"batching": "identical-labels"}},
            {
                "group": "plain",
                "count": 20,
                "batch_size": batch_size,
                "defence": {"batching": "random", "update": [{"clip-l2": {"norm": 1.0}}]},
            },
        ],
    )
    if attack:
        data["attack"] = {"name": "ce-demix", "audit": {"clients_per_round": 2}}
    return data


def _start(client: MlflowClient, experiment_id: str, name: str, params: dict[str, str], tags: dict[str, str]) -> str:
    run_id = str(client.create_run(experiment_id, run_name=name, tags=tags).info.run_id)
    client.log_batch(run_id, params=[Param(key, value) for key, value in params.items()])
    return run_id


def _log_child(client: MlflowClient, run_id: str, child: Child) -> None:
    now = int(time.time() * 1000)
    metrics = [Metric("test_accuracy", value, now, step) for step, value in enumerate(child.accuracy, start=1)]
    for step, (value, n) in enumerate(child.label_accuracy, start=1):
        metrics += [Metric("leakage/mixed/label_accuracy", value, now, step), Metric("leakage/mixed/n", n, now, step)]
    for step, value in enumerate(child.label_exact, start=1):
        metrics.append(Metric("leakage/mixed/label_histogram_exact", value, now, step))
    client.log_batch(run_id, metrics=metrics)
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=CSV_FIELDS)
    writer.writeheader()
    for group, samples in child.samples.items():
        for index, (avd, ssim, recovered) in enumerate(samples):
            writer.writerow(
                {"round": 1 + index % 2, "aggregator": "root", "group": group, "client": index, "sample": index,
                 "label": 3, "matched": index, "avd": avd, "mse": 0.01, "psnr": 20.0, "ssim": ssim,
                 "recovered": recovered}
            )  # fmt: skip
    client.log_text(run_id, text.getvalue(), "audits/samples.csv")
    if child.not_applicable:
        client.log_text(run_id, json.dumps(child.not_applicable), "audits/not_applicable.json")
    client.set_terminated(run_id, status=child.status)


@dataclass
class Store:
    """The tracking URI, the sweep parent and its children's ids (in CHILDREN order)."""

    uri: str
    client: MlflowClient
    parent: str
    children: list[str]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Store:
    folder = tmp_path_factory.mktemp("report")
    tracking = {"uri": f"sqlite:///{folder / 'mlruns.db'}", "experiment": "policies"}
    client = MlflowClient(tracking_uri=tracking["uri"])
    experiment_id = client.create_experiment("policies", artifact_location=(folder / "mlartifacts").as_uri())
    base = flatten(validate(_experiment(tracking, "softmax", 4)).model_dump(mode="json"))
    parent = _start(client, experiment_id, "policies", base, {"testbed.sweep": "parent"})
    children = []
    for child in CHILDREN:
        combination = {"clients.mixed.batch_size": child.batch_size, "clients.plain.batch_size": child.batch_size,
                       "model.name": child.model}  # fmt: skip
        params = flatten(validate(_experiment(tracking, child.model, child.batch_size)).model_dump(mode="json"))
        tags = {"mlflow.parentRunId": parent, "testbed.combination": json.dumps(combination)}
        run_id = _start(client, experiment_id, f"B={child.batch_size} {child.model}", params, tags)
        _log_child(client, run_id, child)
        children.append(run_id)
    client.set_terminated(parent)
    return Store(tracking["uri"], client, parent, children)


def _rows(path: Path) -> dict[tuple[str, str, int], dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return {(row["model"], row["defence"], int(row["batch_size"])): row for row in csv.DictReader(handle)}


def test_sweep_report_holds_the_logged_numbers(store: Store, tmp_path: Path) -> None:
    summary = report_command(store.parent, uri=store.uri, out=tmp_path / "out")
    assert summary == tmp_path / "out" / "report.md"
    rows = _rows(tmp_path / "out" / "leakage.csv")
    # 4 finished children x 2 groups; the failed child is left out
    assert len(rows) == 8
    mixed4 = rows[("softmax", MIXED, 4)]
    assert mixed4["run_ids"] == store.children[1]
    assert int(mixed4["samples"]) == 4
    assert float(mixed4["avd_mean"]) == pytest.approx(0.4)  # the infinite AVD is counted as unrecoverable
    assert float(mixed4["avd_std"]) == pytest.approx(math.sqrt(0.08 / 3))
    assert float(mixed4["avd_median"]) == pytest.approx(0.4)
    assert float(mixed4["ssim_mean"]) == pytest.approx((0.9 + 0.5 + 0.3) / 3)
    assert float(mixed4["recovered_fraction"]) == 0.25
    assert float(mixed4["unrecoverable"]) == 0.25
    assert float(mixed4["label_accuracy"]) == pytest.approx((0.5 * 1 + 1.0 * 3) / 4)  # weighted by n
    assert float(mixed4["label_histogram_exact"]) == pytest.approx((0.0 * 1 + 1.0 * 3) / 4)
    assert float(mixed4["final_test_accuracy"]) == pytest.approx(0.83)  # the last round, not the best
    plain4 = rows[("softmax", PLAIN, 4)]
    assert float(plain4["avd_mean"]) == pytest.approx(0.05) and float(plain4["recovered_fraction"]) == 1.0
    assert plain4["label_accuracy"] == ""
    plain8 = rows[("softmax", PLAIN, 8)]  # no audited samples: accuracy only
    assert plain8["samples"] == "0" and plain8["avd_mean"] == "" and plain8["recovered_fraction"] == ""
    assert float(plain8["final_test_accuracy"]) == pytest.approx(0.81)
    assert float(rows[("mlp relu [32]", MIXED, 4)]["final_test_accuracy"]) == pytest.approx(0.91)

    text = summary.read_text(encoding="utf-8")
    assert "4 finished; skipped: 1 FAILED" in text
    assert (
        f"| softmax | ce-demix | {MIXED} | 4 | 0.400 ± 0.163 | 0.400 [0.300, 0.500] | 0.567 ± 0.249 | 0.250 |" in text
    )
    assert f"| softmax | ce-demix | {PLAIN} | 8 | - | - | - | - | - | - | - | 0 | 0.810 |" in text
    # identical-label batching with labels inferred: the report says the label leak is certain
    assert f"softmax / ce-demix / {MIXED}, batch 4: identical-label batching gives every audited update" in text
    assert "exact label histogram of 0.750 of the updates (label accuracy 0.875)" in text
    assert "attack not applicable to 3 audited updates (transform hides the gradient)" in text
    figures = ["leakage_vs_batch_softmax_ce-demix.png", "leakage_vs_batch_mlp-relu-32_ce-demix.png",
               "privacy_utility.png"]  # fmt: skip
    for name in figures:
        assert f"]({name})" in text
        content = (tmp_path / "out" / name).read_bytes()
        assert content.startswith(PNG_MAGIC) and len(content) > 10_000
    logged = {item.path for item in store.client.list_artifacts(store.parent, "report")}
    assert logged == {f"report/{name}" for name in ["report.md", "leakage.csv", *figures]}


def test_experiment_name_reads_the_same_runs(store: Store, tmp_path: Path) -> None:
    by_name = report_command("policies", uri=store.uri, out=tmp_path / "name")
    report_command(store.parent, uri=store.uri, out=tmp_path / "parent")
    assert _rows(tmp_path / "name" / "leakage.csv") == _rows(tmp_path / "parent" / "leakage.csv")
    text = by_name.read_text(encoding="utf-8")
    assert "experiment `policies` (sweeps: 1, single runs: 0)" in text
    assert f"also logged to run `{store.parent}`" in text


def test_run_without_audits_reports_accuracy_only(tmp_path: Path) -> None:
    tracking = {"uri": f"sqlite:///{tmp_path / 'mlruns.db'}"}
    client = MlflowClient(tracking_uri=tracking["uri"])
    experiment_id = client.create_experiment("plain", artifact_location=(tmp_path / "mlartifacts").as_uri())
    params = flatten(validate(_experiment(tracking, "mlp", 8, attack=False)).model_dump(mode="json"))
    run_id = _start(client, experiment_id, "plain", params, {})
    client.log_metric(run_id, "test_accuracy", 0.77, step=1)
    client.set_terminated(run_id)
    summary = report_command(run_id, uri=tracking["uri"], out=tmp_path / "out")
    rows = _rows(tmp_path / "out" / "leakage.csv")
    assert set(rows) == {("mlp relu [32]", MIXED, 8), ("mlp relu [32]", PLAIN, 8)}
    assert all(row["attack"] == "none" and row["avd_mean"] == "" for row in rows.values())
    assert all(float(row["final_test_accuracy"]) == pytest.approx(0.77) for row in rows.values())
    text = summary.read_text(encoding="utf-8")
    assert "no leakage to plot" in text and ".png" not in text
    assert not list((tmp_path / "out").glob("*.png"))
    assert {item.path for item in client.list_artifacts(run_id, "report")} == {"report/report.md", "report/leakage.csv"}


def test_unknown_target_and_missing_store_are_user_errors(store: Store, tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"no experiment or run 'nosuch' .*experiments there: .*policies.*testbed ui"):
        report_command("nosuch", uri=store.uri, out=tmp_path / "a")
    missing = tmp_path / "absent.db"
    with pytest.raises(UserError, match="no MLflow store at"):
        report_command("policies", uri=f"sqlite:///{missing}", out=tmp_path / "b")
    assert not missing.exists() and not (tmp_path / "a").exists()


@pytest.mark.ray
@pytest.mark.slow
def test_report_on_a_real_sweep(local_ray: None, tracking: dict[str, Any], tmp_path: Path) -> None:
    from testbed.sweep import run_sweep

    overrides = [f"tracking.{key}={value}" for key, value in tracking.items()] + ["rounds=1"]
    data = load_experiment(REPO / "topologies" / "attack-demo.yaml", overrides).model_dump(mode="json")
    data["sweep"] = {"clients.distinct.batch_size": [2, 4]}
    result = run_sweep(validate(data), show_progress=False)
    report_command("attack-demo", uri=tracking["uri"], out=tmp_path / "out")
    rows = _rows(tmp_path / "out" / "leakage.csv")
    distinct, identical = "distinct-labels / cross-entropy", "identical-labels / cross-entropy"
    assert set(rows) == {("softmax", distinct, 2), ("softmax", distinct, 4), ("softmax", identical, 4)}
    client = MlflowClient(tracking_uri=tracking["uri"])
    metrics = {run_id: client.get_run(run_id).data.metrics for _, run_id in result.runs}
    for combination, run_id in result.runs:
        row = rows[("softmax", distinct, combination.values["clients.distinct.batch_size"])]
        assert row["run_ids"] == run_id
        # one audited round: the table summarises the same samples as the round's metrics
        assert float(row["recovered_fraction"]) == pytest.approx(metrics[run_id]["leakage/distinct/recovered_fraction"])
        assert float(row["avd_mean"]) == pytest.approx(metrics[run_id]["leakage/distinct/avd_mean"])
        assert int(row["samples"]) == metrics[run_id]["leakage/distinct/n"]
        assert float(row["final_test_accuracy"]) == pytest.approx(metrics[run_id]["test_accuracy"])
        assert float(row["recovered_fraction"]) >= 0.9
    # the identical-labels group is the same policy in both runs: one row pooling both
    pooled = rows[("softmax", identical, 4)]
    assert sorted(pooled["run_ids"].split()) == sorted(metrics)
    assert int(pooled["samples"]) == sum(m["leakage/identical/n"] for m in metrics.values())
    assert float(pooled["final_test_accuracy"]) == pytest.approx(sum(m["test_accuracy"] for m in metrics.values()) / 2)
    # the logit-space ce-demix separates identical-label batches of 4 too; the report says the labels leak
    assert float(pooled["recovered_fraction"]) >= 0.5
    assert float(pooled["label_histogram_exact"]) == 1.0
    report = (tmp_path / "out" / "report.md").read_text(encoding="utf-8")
    assert f"softmax / ce-demix / {identical}, batch 4: identical-label batching gives every audited update" in report
    logged = {item.path for item in client.list_artifacts(result.parent_run_id, "report")}
    assert {"report/report.md", "report/leakage.csv", "report/privacy_utility.png"} <= logged
