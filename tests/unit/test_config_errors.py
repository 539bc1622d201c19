"""Bad topology input: one line naming the file and field, exit status 2, no traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from testbed.cli import main

GOOD: dict[str, Any] = {
    "name": "ok",
    "rounds": 2,
    "dataset": {"name": "synthetic"},
    "model": {"name": "softmax"},
    "clients": [{"group": "a", "count": 4, "batch_size": 2}],
}


def _write(tmp_path: Path, data: Any, text: str | None = None) -> Path:
    path = tmp_path / "topology.yaml"
    path.write_text(text if text is not None else yaml.safe_dump(data), encoding="utf-8")
    return path


def _with(path_value: list[tuple[str, Any]]) -> dict[str, Any]:
    data = yaml.safe_load(yaml.safe_dump(GOOD))
    for dotted, value in path_value:
        target = data
        parts = dotted.split(".")
        for part in parts[:-1]:
            target = target[int(part)] if part.isdigit() else target.setdefault(part, {})
        if value is DELETE:
            del target[parts[-1]]
        else:
            target[parts[-1]] = value
    return data


DELETE = object()

CASES = [
    ("negative rounds", _with([("rounds", -1)]), "rounds: Input should be greater than or equal to 1"),
    ("zero count", _with([("clients.0.count", 0)]), "clients[0].count"),
    ("unknown dataset", _with([("dataset.name", "imagenet")]), "allowed: mnist-5k"),
    ("unknown model", _with([("model.name", "resnet")]), "model.name"),
    ("unknown activation", _with([("model.activation", "gelu")]), "model.activation"),
    ("unknown algorithm", _with([("algorithm.name", "fedprox")]), "algorithm.name"),
    ("typo field", _with([("roundz", 3)]), "roundz: unknown field"),
    ("missing rounds", _with([("rounds", DELETE)]), "rounds: required field is missing"),
    ("wrong type", _with([("seed", "abc")]), "seed: Input should be a valid integer"),
    (
        "duplicate groups",
        _with([("clients", [GOOD["clients"][0], GOOD["clients"][0]])]),
        "duplicate group names",
    ),
    ("too many per round", _with([("sampling", {"clients_per_round": 10})]), "sampling.clients_per_round"),
    ("unknown partition", _with([("dataset.partition", {"scheme": "zipf"})]), "allowed: iid"),
    ("bad alpha", _with([("dataset.partition", {"scheme": "dirichlet", "alpha": 0})]), "alpha"),
    ("fedsgd with epochs", _with([("algorithm", {"name": "fedsgd", "local_epochs": 2})]), "fedsgd takes no"),
    (
        "unknown audit group",
        _with([("attack", {"name": "dense-ratio", "audit": {"groups": ["zz"]}})]),
        "unknown groups",
    ),
    ("negative lr", _with([("algorithm", {"name": "fedsgd", "lr": -1})]), "algorithm.lr"),
    (
        "half-width of a whole interval",
        _with([("attack", {"name": "dense-ratio", "audit": {"target_half_width": 0.5}})]),
        "attack.audit.target_half_width: Input should be less than 0.5",
    ),
    (
        "precision target that skips",
        _with([("attack", {"name": "dense-ratio", "audit": {"target_half_width": 0.05, "when_busy": "skip"}})]),
        "target_half_width needs when_busy: wait",
    ),
    ("empty window", _with([("attack", {"name": "dense-ratio", "audit": {"window": 0}})]), "attack.audit.window"),
    (
        "no clients under the cap",
        _with([("attack", {"name": "dense-ratio", "audit": {"max_clients_per_round": 0}})]),
        "attack.audit.max_clients_per_round",
    ),
]


@pytest.mark.parametrize(("label", "data", "expected"), CASES, ids=[case[0] for case in CASES])
def test_bad_topology_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], label: str, data: Any, expected: str
) -> None:
    path = _write(tmp_path, data)
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert str(path) in err
    assert expected in err, err
    assert "Traceback" not in err


def test_line_number_is_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = "name: x\nrounds: 2\nclients:\n  - group: a\n    count: 4\n    batch_size: zero\n"
    path = _write(tmp_path, None, text)
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}:6: clients[0].batch_size" in err
    assert "[group 'a']" in err


def test_malformed_yaml(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(tmp_path, None, "name: x\nrounds: [1, 2\n")
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "malformed YAML (line" in err and len(err.splitlines()) == 1


def test_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(tmp_path / "nope.yaml")]) == 2
    assert "no such topology file" in capsys.readouterr().err


def test_set_overrides_and_conflicts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(tmp_path, GOOD)
    assert main(["validate", str(path), "--set", "clients.a.batch_size=3", "--set", "rounds=7"]) == 0
    assert main(["validate", str(path), "--set", "rounds=2", "--set", "rounds=3"]) == 2
    assert "given twice" in capsys.readouterr().err
    assert main(["validate", str(path), "--set", "clients.zz.batch_size=3"]) == 2
    assert "no client group 'zz'" in capsys.readouterr().err
    assert main(["validate", str(path), "--set", "clients.a.count=0"]) == 2
    assert "clients[0].count" in capsys.readouterr().err


def test_schema_lists_the_fields(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["schema"]) == 0
    out = capsys.readouterr().out
    assert '"clients"' in out and '"ClientGroupConfig"' in out


def test_subprocess_exit_status_and_no_traceback(tmp_path: Path) -> None:
    path = _write(tmp_path, _with([("rounds", 0)]))
    done = subprocess.run(
        [sys.executable, "-m", "testbed", "run", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().count("\n") == 0, done.stderr
    assert not (tmp_path / "mlruns.db").exists()
