"""The mixing-gradients study, reduced: a real `testbed study` on a local Ray, then its report from MLflow."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from testbed.cli import main
from testbed.config.topology import validate
from testbed.engine import run_experiment
from testbed.runtime.preparation import prepare_data
from testbed.study.spec import load_study
from testbed.study.training import train
from tests.conftest import REPO, small_experiment
from tests.support.user_code import BATCHNORM_NET, write_module

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def reduced_study(tracking: dict[str, Any], folder: Path) -> Path:
    """The committed study cut to two seeds, one arm, four policies, short training and batch 2."""
    data = yaml.safe_load((REPO / "topologies" / "studies" / "mixing-study.yaml").read_text(encoding="utf-8"))
    data["name"] = "reduced-study"
    data["seeds"] = [0, 1]
    data["tuning_seeds"] = [100, 101]
    data["dataset"]["max_test"] = 300
    data["tracking"] = {"uri": tracking["uri"], "experiment": "reduced-study"}
    data["policies"] = {
        name: data["policies"][name] for name in ("random-ce", "identical-ce", "identical-mse", "dp-sgd")
    }
    arm = next(arm for arm in data["arms"] if arm["model"]["name"] == "softmax" and arm["setting"] == "fedsgd-iid")
    arm = {k: v for k, v in arm.items() if k not in ("accuracy_policies", "audit_policies", "audit_batch_sizes")}
    data["arms"] = [{**arm, "rounds": 30, "evaluate_every": 5, "lr_grid": [0.3, 1.0]}]
    data["audit"] = {"stages": ["initial", "half", "ninety"], "batch_sizes": [2], "clients": 2, "bootstrap": 300}
    data["budget_check"] = {
        "arms": [0],
        "seeds": [1],
        "stages": ["ninety"],
        "policies": ["random-ce", "identical-ce"],
        "attack_params": {"ce-demix": {"restarts": 32}, "inverting-gradients": {"iterations": 9999}},
    }
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path, encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_reduced_study_and_its_report(
    local_ray: None, tracking: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = reduced_study(tracking, tmp_path)
    assert main(["study", str(source), "--out", str(tmp_path / "tables"), "--quiet"]) == 0
    run_id = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["study_run_id"]
    audits = _csv(tmp_path / "tables" / "audits.csv")
    # paired: at each (seed, stage) every policy audited the same clients on the same global model
    units: dict[tuple[str, str], set[str]] = {}
    for row in audits:
        units.setdefault((row["seed"], row["stage"]), set()).add(row["client"])
    for (seed, stage), clients in units.items():
        for policy in ("random-ce", "identical-ce", "identical-mse"):
            mine = {r["client"] for r in audits if (r["seed"], r["stage"], r["policy"]) == (seed, stage, policy)}
            assert mine == clients, (seed, stage, policy)

    out, page = tmp_path / "results", tmp_path / "results.md"
    uri = tracking["uri"]
    assert main(["report", run_id, "--uri", uri, "--out", str(out), "--page", str(page)]) == 0
    cells = _csv(out / "leakage.csv")
    assert {c["stage"] for c in cells} >= {"initial", "ninety"}
    for cell in cells:
        assert int(cell["seeds"]) == 2
        low, value, high = (
            float(cell[k]) for k in ("recovered_fraction_ci_low", "recovered_fraction", "recovered_fraction_ci_high")
        )
        assert low <= value <= high
    by = {(c["stage"], c["policy"]): c for c in cells}
    # softmax, batch 2: the logit-space ce-demix separates identical-label batches as well as random ones
    for stage in ("initial", "ninety"):
        assert float(by[(stage, "identical-ce")]["recovered_fraction"]) >= 0.9
        assert float(by[(stage, "identical-ce")]["label_histogram_exact"]) == 1.0
        assert float(by[(stage, "identical-mse")]["recovered_fraction"]) >= 0.9  # the mse loss is attacked too
        assert float(by[(stage, "dp-sgd")]["recovered_fraction"]) == 0.0  # DP-SGD's noise defeats it
    accuracy = {row["policy"]: row for row in _csv(out / "accuracy.csv")}
    assert float(accuracy["random-ce"]["final_accuracy"]) > 0.7  # the softmax trains well above chance (0.1)
    epsilon = float(accuracy["dp-sgd"]["epsilon"])
    assert 0 < epsilon < float("inf")
    low, high = (
        float(accuracy["identical-ce"]["accuracy_cost_ci_low"]),
        float(accuracy["identical-ce"]["accuracy_cost_ci_high"]),
    )
    assert low <= float(accuracy["identical-ce"]["accuracy_cost"]) <= high
    text = page.read_text(encoding="utf-8")
    assert "## Claims of the paper's abstract" in text and run_id in text
    # softmax: ce-demix recovers identical-label batches as it does random ones; with 2 seeds every interval is
    # wide, so the identical-label claim is refuted (where the cell's interval lies above 0.1) or inconclusive
    assert "drawing identical labels" in text and (out / "claims.csv").is_file()
    assert list(out.glob("leakage_*.png")) and (out / "accuracy.png").stat().st_size > 5_000
    # the budget check re-attacked seed 1's ninety-stage updates of the two policies it names with twice the
    # restarts; same updates, same answer
    check = {row["policy"]: row for row in _csv(out / "budget_check.csv")}
    assert set(check) == {"random-ce", "identical-ce"}
    assert all(int(row["updates"]) >= 1 for row in check.values())
    assert float(check["identical-ce"]["recovered_larger_budget"]) >= float(
        check["identical-ce"]["recovered_study_budget"]
    )
    assert "## Budget check" in text
    claims = {(row["claim"], row["era"], row["level"]): row for row in _csv(out / "claims.csv")}
    assert claims[("identical", "to date", "recovered")]["verdict"] in ("refuted", "inconclusive")
    assert claims[("lenet", "to date", "recovered")]["verdict"] == "not tested"  # no convolutional arm here


def test_bad_study_files_are_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["study", str(tmp_path / "missing.yaml")]) == 2
    data = yaml.safe_load((REPO / "topologies" / "studies" / "mixing-study.yaml").read_text(encoding="utf-8"))
    data["baseline"] = "no-such-policy"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(data), encoding="utf-8")
    capsys.readouterr()
    assert main(["study", str(bad), "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "baseline" in error and "random-ce" in error
    data["baseline"] = "random-ce"
    data["tuning_seeds"] = [100, data["seeds"][0]]
    bad.write_text(yaml.safe_dump(data), encoding="utf-8")
    assert main(["study", str(bad), "--out", str(tmp_path / "out")]) == 2
    assert "tuning_seeds" in capsys.readouterr().err
    data["tuning_seeds"] = [100]
    data["arms"][0]["model"]["name"] = "no-such-model"
    bad.write_text(yaml.safe_dump(data), encoding="utf-8")
    assert main(["study", str(bad), "--out", str(tmp_path / "out")]) == 2
    assert "model" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("batchnorm", [False, True], ids=["mlp", "batchnorm"])
def test_study_training_equals_the_engine(
    local_ray: None, tracking: dict[str, Any], tmp_path: Path, batchnorm: bool
) -> None:
    """The study's one-process trainer runs the engine's client code and server step: same global model,
    BatchNorm statistics included (the study's former loop left them at their initial values)."""
    data = small_experiment(tracking, rounds=3)
    data["algorithm"] = {"name": "fedavg", "lr": 0.1, "local_steps": 2}
    if batchnorm:
        module = write_module(tmp_path, BATCHNORM_NET)
        data["model"] = {"name": f"{module}:small_bn_net", "path": str(tmp_path), "params": {"width": 4}}
    experiment = validate(data)
    engine = run_experiment(experiment, show_progress=False)
    study = train(experiment, prepare_data(experiment), keep=True)
    assert set(study.snapshots) >= {0, 3}
    assert set(study.snapshots[3]) == set(engine.params)
    for key, value in engine.params.items():
        if not value.is_floating_point():  # num_batches_tracked: the largest count among the clients
            assert torch.equal(study.snapshots[3][key], value), key
            continue
        scale = float(value.abs().max())
        # chunk sums add in the same order; the tolerance allows float32 reassociation inside kernels
        assert torch.allclose(study.snapshots[3][key], value, atol=1e-5 * max(scale, 1.0)), key
    assert study.final_accuracy == pytest.approx(engine.final_accuracy, abs=2 / 1000)


def test_the_committed_study_file_is_valid(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(REPO / "topologies" / "studies" / "mixing-study.yaml")]) == 0
    assert "OK (study: 6 arms, 10 seeds)" in capsys.readouterr().out
    spec = load_study(REPO / "topologies" / "studies" / "mixing-study.yaml")
    assert len(spec.seeds) >= 10  # significance reachable after Holm over each claim's comparisons
    assert {arm.model["name"] for arm in spec.arms} >= {"softmax", "mlp", "lenet"}
    assert {spec.settings[arm.setting].algorithm["name"] for arm in spec.arms} == {"fedsgd", "fedavg"}
    assert any("dp" in policy for policy in spec.policies.values())
    # every applicable attack on every arm, the multi-step ones on FedAvg included
    assert all("auto" in arm.attacks for arm in spec.arms)
    assert max(size for arm in spec.arms for size in spec.audited_batch_sizes(arm)) >= 16
    # IID settings: every client holds at least the largest audited batch of every class (4,000 training images
    # of 10 classes), so identical-label batches are as large as random ones
    for arm in spec.arms:
        setting = spec.settings[arm.setting]
        if setting.partition["scheme"] == "iid":
            assert 4000 // setting.clients // 10 >= max(spec.audited_batch_sizes(arm)), arm.label
