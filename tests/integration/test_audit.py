"""The curious aggregator on a real local Ray: audits, leakage metrics, grids and CSV in MLflow."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from testbed.config.load import load_experiment
from testbed.engine import run_experiment
from tests.conftest import REPO
from tests.support.cli import run_topology

pytestmark = pytest.mark.ray


def test_attack_demo_logs_leakage(local_ray: None, tracking: dict[str, Any]) -> None:
    # two attack actors and two scorers: each round's audits come back in parts, from either scorer, and
    # must be logged once, complete
    overrides = [f"tracking.{key}={value}" for key, value in tracking.items()] + [
        "rounds=2",
        "resources.attack.workers=2",
        "resources.attack.scorers=2",
        "resources.attack.num_cpus=0",
    ]
    experiment = load_experiment(REPO / "topologies" / "attack-demo.yaml", overrides)
    result = run_experiment(experiment, show_progress=False)
    client = MlflowClient(tracking_uri=tracking["uri"])
    metrics = client.get_run(result.run_id).data.metrics
    # the logit-space solve separates distinct-label batches, and identical-label ones too (each sample's
    # prediction differs, so P - Y keeps full rank): the floor is half of batches of 4
    assert metrics["leakage/distinct/recovered_fraction"] >= 0.9, metrics
    assert metrics["leakage/identical/recovered_fraction"] >= 0.5, metrics
    assert metrics["leakage/distinct/label_accuracy"] == 1.0
    # the run's answer in its result, its MLflow description and (through the CLI) its JSON line
    assert set(result.leakage) == {"distinct", "identical"}
    assert sum(row["audited_samples"] for row in result.leakage.values()) == 2 * 8 * 4  # rounds x clients x batch
    assert all(0.5 <= row["recovered_fraction"] <= 1.0 for row in result.leakage.values()), result.leakage
    note = client.get_run(result.run_id).data.tags["mlflow.note.content"]
    assert f"final test accuracy {result.final_accuracy:.4f}" in note
    distinct = result.leakage["distinct"]
    assert f"| distinct | {int(distinct['audited_samples'])} | {distinct['recovered_fraction']:.3f} |" in note
    assert "`audits/round_0001.png` ... `audits/round_0002.png` (2 rounds)" in note
    assert metrics["audit/skipped_clients"] == 0.0  # the default backlog policy waits, so nothing is skipped
    history = client.get_metric_history(result.run_id, "leakage/root/avd_mean")
    assert sorted(point.step for point in history) == [1, 2]
    artifacts = {item.path for item in client.list_artifacts(result.run_id, "audits")}
    assert {"audits/round_0001.png", "audits/round_0002.png", "audits/samples.csv"} <= artifacts
    text = open(client.download_artifacts(result.run_id, "audits/samples.csv"), encoding="utf-8").read()
    rows = list(csv.DictReader(io.StringIO(text)))
    assert len(rows) == 2 * 8 * 4  # rounds x audited clients x batch size
    assert {row["group"] for row in rows} == {"distinct", "identical"}
    for group, row in result.leakage.items():  # the run's SSIM ladder over every audited sample, as the CSV says
        mine = [r for r in rows if r["group"] == group]
        best = np.array([float(r["best_ssim"]) for r in mine])
        assert np.array_equal(best, [float(r["ssim"]) for r in mine])  # one attack: its own SSIM
        above = best > np.array([float(r["ssim_baseline"]) for r in mine])
        assert row["ssim_ge_0.7"] == pytest.approx(np.mean((best >= 0.7) & above)), group
        assert row["ssim_ge_0.5"] == pytest.approx(np.mean((best >= 0.5) & above)), group
        assert row["ssim_ge_0.5"] >= row["ssim_ge_0.7"] >= 0.5  # the logit-space solve gives near copies
    assert (
        f"| {distinct['recovered_fraction']:.3f} | {distinct['ssim_ge_0.7']:.3f} | {distinct['ssim_ge_0.5']:.3f} |"
        in note
    )


def test_a_portfolio_logs_each_attack_and_the_worst_case(local_ray: None, tracking: dict[str, Any]) -> None:
    overrides = [f"tracking.{key}={value}" for key, value in tracking.items()] + [
        "rounds=1",
        "attack.name=[dense-ratio, ce-demix, inverting-gradients]",
        "attack.params={inverting-gradients: {iterations: 10}}",
    ]
    experiment = load_experiment(REPO / "topologies" / "attack-demo.yaml", overrides)
    result = run_experiment(experiment, show_progress=False)
    client = MlflowClient(tracking_uri=tracking["uri"])
    run = client.get_run(result.run_id)
    metrics = run.data.metrics
    for group in ("distinct", "identical"):
        per_attack = [metrics[f"leakage/{group}/{name}/recovered_fraction"] for name in experiment.attack.names]
        worst = metrics[f"leakage/{group}/recovered_fraction"]
        # per sample the worst case is recovered when any attack recovered it, so its share is at least each
        # attack's (mean SSIM carries no such guarantee: the choice is by recovery first)
        assert worst >= max(per_attack), (group, worst, per_attack)
        assert 0.2 < metrics[f"leakage/{group}/avd_baseline"] < 0.5  # blank / class mean / class image
        assert metrics[f"leakage/{group}/label_histogram_exact"] == 1.0
    assert metrics["audit/inverting-gradients/not_applicable"] == 0.0
    text = open(client.download_artifacts(result.run_id, "audits/samples_by_attack.csv"), encoding="utf-8").read()
    by_attack = list(csv.DictReader(io.StringIO(text)))
    assert len(by_attack) == 3 * 8 * 4 and {row["attack"] for row in by_attack} == set(experiment.attack.names)
    text = open(client.download_artifacts(result.run_id, "audits/samples.csv"), encoding="utf-8").read()
    worst_rows = list(csv.DictReader(io.StringIO(text)))
    assert len(worst_rows) == 8 * 4 and all(row["ssim_baseline"] for row in worst_rows)
    assert "worst case of dense-ratio, ce-demix, inverting-gradients" in run.data.tags["mlflow.note.content"]
    _check_the_ssim_ladder(metrics, worst_rows, by_attack, experiment.attack.names)


def _check_the_ssim_ladder(
    metrics: dict[str, float], worst_rows: list[dict[str, str]], by_attack: list[dict[str, str]], attacks: list[str]
) -> None:
    """The logged SSIM ladder of a one-round portfolio run against its two sample CSVs."""
    best_of: dict[tuple[str, str], float] = {}  # (client, sample) -> highest SSIM of any attack
    for row in by_attack:
        key = (row["client"], row["sample"])
        best_of[key] = max(best_of.get(key, -1.0), float(row["ssim"]))
    for group in ("distinct", "identical"):
        rows = [row for row in worst_rows if row["group"] == group]
        best = np.array([float(row["best_ssim"]) for row in rows])
        kept = np.array([float(row["ssim"]) for row in rows])
        floor = np.array([float(row["ssim_baseline"]) for row in rows])
        recovered = np.array([row["recovered"] == "True" for row in rows])
        # the worst case's best SSIM is the highest over the attacks' rows, at least the kept reconstruction's
        assert np.allclose(best, [best_of[(row["client"], row["sample"])] for row in rows])
        assert np.all(best >= kept - 1e-12)
        at = {level: metrics[f"leakage/{group}/ssim_ge_{level}"] for level in ("0.5", "0.7")}
        for level, value in at.items():  # the logged fraction is the CSV's: best SSIM >= level and above every baseline
            assert value == pytest.approx(np.mean((best >= float(level)) & (best > floor))), (group, level)
        assert 1.0 >= at["0.5"] >= at["0.7"] >= 0.0
        # a sample recovered by SSIM (>= 0.9 and above every baseline) is counted at 0.7; one recovered by AVD
        # alone need not be, so the ladder bounds only the SSIM-recovered share
        by_ssim = recovered & (kept >= 0.9) & (kept > floor)
        assert at["0.7"] >= by_ssim.mean() > 0.5, (group, at, by_ssim.mean())
        q1, median, q3 = (metrics[f"leakage/{group}/best_ssim_{name}"] for name in ("q1", "median", "q3"))
        assert q1 <= median <= q3 and median == pytest.approx(np.median(best))
        for attack in attacks:
            own = [row for row in by_attack if row["group"] == group and row["attack"] == attack]
            ssim = np.array([float(row["ssim"]) for row in own])
            assert all(row["best_ssim"] == row["ssim"] for row in own)  # one attack's row: its own SSIM
            above = ssim > np.array([float(row["ssim_baseline"]) for row in own])
            for level in ("0.5", "0.7"):
                mine = metrics[f"leakage/{group}/{attack}/ssim_ge_{level}"]
                assert mine == pytest.approx(np.mean((ssim >= float(level)) & above)) and mine <= at[level]


@pytest.mark.slow
def test_attack_auto_through_testbed_run_on_fedsgd_and_fedavg(tmp_path: Path) -> None:
    """attack: auto runs every image attack where it applies: all five on FedSGD; on FedAvg deltas of two local
    steps ce-demix says why it cannot, while Inverting Gradients simulates the steps; the optimisation attacks stop
    at the round's cap and the updates they skip are counted."""
    group = {"count": 10, "batch_size": 2}
    topology = {
        "name": "auto",
        "seed": 0,
        "rounds": 1,
        "dataset": {"name": "mnist-5k", "max_train": 400, "max_test": 200, "partition": {"scheme": "iid"}},
        "model": {"name": "softmax"},
        "algorithm": {"name": "fedsgd", "lr": 0.1},
        "clients": [
            {"group": "random", **group},
            {"group": "identical", **group, "defence": {"batching": "identical-labels"}},
        ],
        "attack": {
            "params": {"inverting-gradients": {"iterations": 200}, "dlg": {"iterations": 5}},
            "audit": {"clients_per_round": 6, "optimisation_per_round": 2},
        },
        "sweep": [{"algorithm.name": "fedsgd"}, {"algorithm.name": "fedavg", "algorithm.local_steps": 2}],
        "resources": {"num_cpus": 2, "workers": 1, "chunk_size": 10},
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlruns.db'}", "artifact_location": str(tmp_path / "art")},
    }
    run_topology(tmp_path, topology)
    client = MlflowClient(tracking_uri=topology["tracking"]["uri"])
    runs = client.search_runs(client.get_experiment_by_name("auto").experiment_id)
    children = {run.data.params.get("algorithm.name"): run for run in runs if "mlflow.parentRunId" in run.data.tags}
    assert set(children) == {"fedsgd", "fedavg"}
    attacks = ["dense-ratio", "ce-demix", "dlg", "inverting-gradients", "cocktail-party"]
    for algorithm, run in children.items():
        metrics = run.data.metrics
        for name in attacks:
            assert f"audit/{name}/not_applicable" in metrics, (algorithm, name)
        # six audited updates a round, the optimisation attacks on two of them
        assert metrics["audit/dlg/not_applicable"] == 4.0 and metrics["audit/inverting-gradients/not_applicable"] == 4.0
        assert metrics["audit/dense-ratio/not_applicable"] == 0.0
        assert metrics["audit/cocktail-party/not_applicable"] == 0.0
        # the two updates Inverting Gradients attacked (drawn from the round's six) were scored
        assert any(f"leakage/{g}/inverting-gradients/recovered_fraction" in metrics for g in ("random", "identical"))
        for group_name in ("random", "identical"):
            assert f"leakage/{group_name}/cocktail-party/recovered_fraction" in metrics, (algorithm, group_name)
            assert f"leakage/{group_name}/ssim_ge_0.5" in metrics
    assert children["fedsgd"].data.metrics["audit/ce-demix/not_applicable"] == 0.0
    assert children["fedavg"].data.metrics["audit/ce-demix/not_applicable"] == 6.0  # a delta of two local steps
    assert "auto: worst case of dense-ratio" in children["fedavg"].data.tags["mlflow.note.content"]


def test_a_precision_target_sizes_the_audits_and_its_interval_holds_the_known_fraction(
    local_ray: None, tracking: dict[str, Any]
) -> None:
    # ce-demix on a softmax model recovers every sample of a FedSGD batch of 4 distinct labels: the distinct
    # group's recovered fraction is 1.0 (the first test above). With up to 40 audits a round (20 per group), the
    # 95% confidence sequence reaches half-width 0.05 at 47 all-recovered updates, so after round 3's 60; round 4
    # decides from rounds 1-2 (backlog 2) and still audits the group, round 5 from rounds 1-3 and does not.
    overrides = [f"tracking.{key}={value}" for key, value in tracking.items()] + [
        "rounds=5",
        "attack.audit.target_half_width=0.05",
        "attack.audit.window=5",
        "attack.audit.max_clients_per_round=40",
    ]
    experiment = load_experiment(REPO / "topologies" / "attack-demo.yaml", overrides)
    result = run_experiment(experiment, show_progress=False)
    client = MlflowClient(tracking_uri=tracking["uri"])

    def history(name: str) -> dict[int, float]:
        return {point.step: point.value for point in client.get_metric_history(result.run_id, name)}

    assert history("audit/distinct/audited_in_window") == {1: 20.0, 2: 40.0, 3: 60.0, 4: 80.0}
    low, high = history("leakage/distinct/recovered_ci_low"), history("leakage/distinct/recovered_ci_high")
    half = history("leakage/distinct/recovered_ci_half_width")
    assert half[2] > 0.05 >= half[3] and half[4] <= half[3]  # narrows, and meets the target with round 3
    assert all(high[step] - low[step] == pytest.approx(2 * half[step]) for step in half)
    known = result.leakage["distinct"]["recovered_fraction"]
    assert known == 1.0 and low[4] <= known <= high[4] and low[4] >= 0.9, (low, high)
    assert result.leakage["distinct"]["audited_samples"] == 80 * 4  # nothing of the group audited in round 5
    note = client.get_run(result.run_id).data.tags["mlflow.note.content"]
    assert f"| distinct | 1 of 1 | 1-5 | 80 | [{low[4]:.3f}, {high[4]:.3f}] | {half[4]:.3f} |" in note, note
