"""User mistakes given to ``testbed run``: one line on stderr naming the file or field, exit status 2, no trace.

Every case runs the whole ``run`` command (not only validation), so a mistake that is caught late
(the data set, the partition, the cluster, the tracking store) is covered too. After each one the
tracking store holds no run, no checkpoint or artifact was written and no Ray process is left.

``python tests/integration/test_bad_input.py`` prints the table of cases and their actual messages
as markdown (docs/reliability.md shows it).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import os
import random
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml

from testbed.cli import main
from tests.conftest import REPO

FILE = "topology.yaml"
MARK = "TESTBED_TEST_MARK"

USER_CODE = """
import numpy as np
from torch import nn


def net(num_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, num_classes + 1))


def listed(num_classes):
    return [nn.Linear(28 * 28, num_classes)]


def short_labels():
    x = np.zeros((40, 28, 28), dtype=np.uint8)
    return x, np.arange(39) % 10, x[:10], np.arange(10)


def writers():
    x = np.zeros((40, 28, 28), dtype=np.uint8)
    return {"train_x": x, "train_y": np.arange(40) % 10, "test_x": x, "test_y": np.arange(40) % 10,
            "train_keys": np.arange(40) % 4}


def pixels_0_255():
    x = np.full((40, 28, 28), 255.0, dtype=np.float32)
    return x, np.arange(40) % 10, x[:10], np.arange(10)


def exits(num_classes=10):
    import sys

    sys.exit(3)
"""
"""The user's own modules some cases place beside the topology file."""

GOOD: dict[str, Any] = {
    "name": "bad-input",
    "rounds": 2,
    "dataset": {"name": "mnist-5k", "partition": {"scheme": "iid"}},
    "model": {"name": "softmax"},
    "clients": [{"group": "a", "count": 10, "batch_size": 4}],
}


def _good(**changes: Any) -> dict[str, Any]:
    """A copy of the valid topology with dotted-path changes (``clients.0.count``); None deletes a field."""
    data: dict[str, Any] = yaml.safe_load(yaml.safe_dump(GOOD))
    for dotted, value in changes.items():
        parts = dotted.split("__")
        target: Any = data
        for part in parts[:-1]:
            target = target[int(part)] if part.isdigit() else target.setdefault(part, {})
        last: Any = int(parts[-1]) if parts[-1].isdigit() else parts[-1]
        if value is None:
            del target[last]
        else:
            target[last] = value
    return data


@dataclass(frozen=True)
class Case:
    """One user mistake: what the file holds, the extra command-line arguments, and what the message must say."""

    label: str
    expected: str
    data: dict[str, Any] | None = None
    text: str | None = None
    raw: bytes | None = None
    args: tuple[str, ...] = ()
    with_file: bool = True
    starts_ray: bool = False
    files: tuple[tuple[str, str], ...] = ()  # the user's own modules beside the topology file: (name, source)

    def argv(self) -> list[str]:
        return ["run", *([FILE] if self.with_file else []), *self.args, "--quiet"]


CASES = [
    Case("malformed YAML", f"{FILE}: malformed YAML (line 3", text="name: x\nrounds: 2\nseed: 0: 1\n"),
    Case("top level is a list", f"{FILE}: the top level must be a mapping", text="- name: x\n- rounds: 2\n"),
    Case("missing file", "nope.yaml: no such topology file", args=("nope.yaml",), with_file=False),
    Case("random bytes", f"{FILE}: not UTF-8 text (byte ", raw=bytes(random.Random(7).randbytes(400))),
    Case(
        "UTF-16 file",
        f"{FILE}: the file is UTF-16 (or binary), not UTF-8 text; save it as UTF-8",
        raw=yaml.safe_dump(GOOD).encode("utf-16"),
    ),
    Case(
        "sqlite folder that cannot be made",
        "tracking.uri: cannot make the sqlite database under /proc",
        _good(tracking={"uri": "sqlite:////proc/nope/b.db"}),
    ),
    Case("wrong type (rounds)", "rounds: Input should be a valid integer", _good(rounds="many")),
    Case("wrong type (clients)", "clients: Input should be a valid list", _good(clients={"group": "a"})),
    Case("unknown top-level field", "roundz: unknown field", _good(roundz=3)),
    Case("required field missing", "clients: required field is missing", _good(clients=None)),
    Case("unknown dataset", "allowed: mnist-5k, fashion-mnist, mnist, cifar10", _good(dataset__name="imagenet")),
    Case(
        "unknown model",
        "model.name: unknown model 'resnet'; allowed: softmax, mlp, lenet, cnn, or an import path "
        "package.module:callable",
        _good(model__name="resnet"),
    ),
    Case(
        "own model that cannot be imported",
        "model.name: cannot import 'no_such_models': no module 'no_such_models' in the working directory or PYTHONPATH",
        _good(model={"name": "no_such_models:net"}),
    ),
    Case(
        "own model with the wrong output size",
        "model.name: bad_size_models:net gives outputs (2, 11) for a batch of 2 images of shape (1, 28, 28); "
        "expected (2, 10): one logit per class",
        _good(model={"name": "bad_size_models:net"}),
        files=(("bad_size_models.py", USER_CODE),),
    ),
    Case(
        "own model that is not a module",
        "model.name: bad_type_models:listed returned a list, not a torch.nn.Module",
        _good(model={"name": "bad_type_models:listed"}),
        files=(("bad_type_models.py", USER_CODE),),
    ),
    Case(
        "own data set with a label missing",
        "dataset.name: bad_data:short_labels: train_x holds 40 images but train_y 39 labels",
        _good(dataset={"name": "bad_data:short_labels"}),
        files=(("bad_data.py", USER_CODE),),
    ),
    Case(
        "by-key partition without keys",
        "dataset.partition.key: by-key needs a key for every training sample, and data set 'mnist-5k' gives none",
        _good(dataset={"name": "mnist-5k", "partition": {"scheme": "by-key"}}),
    ),
    Case(
        "by-key partition with fewer keys than clients",
        "dataset.partition: by-key gives each client one key's samples, but there are 4 keys for 10 clients; "
        "configure at most 4 clients",
        _good(dataset={"name": "few_writers:writers", "partition": {"scheme": "by-key"}}),
        files=(("few_writers.py", USER_CODE),),
    ),
    Case(
        "unknown activation",
        "model.activation: Input should be 'relu', 'sigmoid' or 'tanh'",
        _good(model__activation="gelu"),
    ),
    Case(
        "unknown attack",
        f"{FILE}:14: attack.name: unknown attack 'deep-leak'; allowed: dense-ratio, ce-demix",
        _good(attack={"name": "deep-leak"}),
    ),
    Case(
        "unknown defence batching",
        "clients[0].defence.batching: unknown batching 'sorted'; known: distinct-labels, identical-labels",
        _good(clients__0__defence={"batching": "sorted"}),
    ),
    Case(
        "unknown defence loss",
        "clients[0].defence.loss: unknown loss 'hinge'; known: cross-entropy",
        _good(clients__0__defence={"loss": "hinge"}),
    ),
    Case(
        "unknown defence transform",
        "clients[0].defence.update[0]: unknown transform 'blur'; known: clip-l2, gaussian-noise",
        _good(clients__0__defence={"update": [{"blur": 1}]}),
    ),
    Case("unknown partition scheme", "allowed: iid, dirichlet, shards", _good(dataset__partition={"scheme": "zipf"})),
    Case("zero rounds", "rounds: Input should be greater than or equal to 1", _good(rounds=0)),
    Case(
        "negative client count",
        "clients[0].count: Input should be greater than or equal to 1",
        _good(clients__0__count=-5),
    ),
    Case(
        "zero batch size",
        "clients[0].batch_size: Input should be greater than or equal to 1",
        _good(clients__0__batch_size=0),
    ),
    Case("dropout of 1", "clients[0].dropout: Input should be less than 1", _good(clients__0__dropout=1.0)),
    Case(
        "unknown fault kind",
        "clients[0].faults.kind: Input should be 'nan', 'inf', 'norm', 'shape' or 'dtype'",
        _good(clients__0__faults={"fraction": 0.1, "kind": "zero"}),
    ),
    Case(
        "negative max_update_norm",
        "algorithm.max_update_norm: Input should be greater than 0",
        _good(algorithm={"max_update_norm": -1}),
    ),
    Case(
        "more sampled than clients",
        f"{FILE}:14: sampling.clients_per_round: 50 exceeds the 10 clients configured",
        _good(sampling={"clients_per_round": 50}),
    ),
    Case(
        "min_clients above the sample",
        f"{FILE}:14: sampling.min_clients: 20 exceeds the 10 clients sampled per round",
        _good(sampling={"min_clients": 20}),
    ),
    Case(
        "more clients than samples",
        "dataset.partition: 100000 clients but only 4000 training samples",
        _good(clients__0__count=100000),
    ),
    Case(
        "batch larger than a shard",
        "clients[0].batch_size: 4000 exceeds the median shard",
        _good(clients__0__batch_size=4000),
    ),
    Case(
        "dataset missing offline",
        "dataset.name: dataset 'mnist' not found under root '/nonexistent/mnist'",
        _good(dataset={"name": "mnist", "root": "/nonexistent/mnist"}),
    ),
    Case("conflicting --set", "--set rounds: given twice", GOOD, args=("--set", "rounds=3", "--set", "rounds=4")),
    Case("--set on an unknown group", "no client group 'zz'; groups: a", GOOD, args=("--set", "clients.zz.count=3")),
    Case("--set without a value", "--set 'rounds': expected KEY=VALUE", GOOD, args=("--set", "rounds")),
    Case("--set of an unknown field", "seeds: unknown field", GOOD, args=("--set", "seeds=1")),
    Case(
        "sweep with an invalid cell",
        "sweep [clients.a.batch_size=0]: clients[0].batch_size: Input should be greater than or equal to 1",
        _good(sweep={"clients.a.batch_size": [2, 0]}),
    ),
    Case("run without FILE or --resume", "run: give a topology FILE, or --resume RUN_ID", with_file=False),
    Case("resume id that does not exist", "--resume: no checkpoint at", GOOD, args=("--resume", "f00df00d")),
    Case(
        "resume id without FILE",
        "--resume: no checkpoint at",
        args=("--resume", "f00df00d", "--checkpoints", "elsewhere"),
        with_file=False,
    ),
    Case(
        "unreachable cluster address",
        "resources.address: cannot reach the Ray cluster at '127.0.0.1:1'",
        GOOD,
        args=("--set", "resources.address=127.0.0.1:1"),
    ),
    Case(
        "GPU requested without one",
        "resources.client.num_gpus: 1 GPU per worker requested, but the cluster has no GPU",
        _good(resources={"num_cpus": 1, "client": {"num_gpus": 1}}),
        starts_ray=True,
    ),
]

GOOD_TEXT = yaml.safe_dump(GOOD, sort_keys=False)
ALIAS_BOMB = (
    GOOD_TEXT.replace("model:\n  name: softmax\n", "")
    + "x0: &x0 [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]\n"
    + "".join(f"x{i}: &x{i} [{', '.join([f'*x{i - 1}'] * 10)}]\n" for i in range(1, 6))
    + "model: {name: 'bomb_models:net', params: {layers: *x5}}\n"
    + "sweep: {rounds: [1, 2]}\n"
)

CASES += [
    Case(
        "duplicate key",
        f"{FILE}:14: duplicate key 'rounds' (first given on line 2)",
        text=GOOD_TEXT.replace("rounds: 2\n", "rounds: 2\nseed: 1\n", 1).rstrip("\n") + "\nrounds: 5\n",
    ),
    Case(
        "duplicate block",
        "duplicate key 'clients' (first given on line",
        text=GOOD_TEXT + "clients:\n- {group: b, count: 10, batch_size: 4}\n",
    ),
    Case(
        "aliases expanding past the cap", f"{FILE}: the YAML cannot be read: with its aliases expanded", text=ALIAS_BOMB
    ),
    Case(
        "recursive alias",
        f"{FILE}: the YAML cannot be read: an alias refers to a block that contains it",
        text=GOOD_TEXT + "sweep: &s {rounds: [1, *s]}\n",
    ),
    Case(
        "sweep past the cell cap",
        "sweep: 8,000 combinations, more than the 1,000 allowed; split the sweep, or raise the limit with "
        "--max-sweep-cells N",
        _good(sweep={"seed": list(range(40)), "rounds": list(range(1, 41)), "algorithm.lr": [0.1, 0.2, 0.3, 0.4, 0.5]}),
    ),
    Case(
        "sweep past a lowered cell cap",
        "sweep: 2 combinations, more than the 1 allowed",
        _good(sweep={"rounds": [1, 2]}),
        args=("--max-sweep-cells", "1"),
    ),
    Case(
        "infinite learning rate",
        "algorithm.lr: Input should be a finite number (got inf)",
        text=GOOD_TEXT + "algorithm: {lr: .inf}\n",
    ),
    Case(
        "nan Dirichlet alpha",
        "dataset.partition.alpha: Input should be a finite number (got nan)",
        _good(dataset__partition={"scheme": "dirichlet", "alpha": float("nan")}),
    ),
    Case(
        "infinite round timeout",
        "sampling.round_timeout_s: Input should be a finite number (got inf)",
        _good(sampling={"round_timeout_s": float("inf")}),
    ),
    Case(
        "infinite actor CPUs",
        "resources.client.num_cpus: Input should be a finite number (got inf)",
        _good(resources={"client": {"num_cpus": float("inf")}}),
    ),
    Case("seed of 2^63", "seed: Input should be less than 9223372036854775808", _good(seed=2**63)),
    Case(
        "group name MLflow refuses",
        "clients[0].group name 'dp (sigma=1)': use letters, digits, _ and -",
        _good(clients__0__group="dp (sigma=1)"),
    ),
    Case(
        "run name with a line break",
        "name: 'x\\n<img src=x onerror=alert(1)>' holds a line break",
        _good(name="x\n<img src=x onerror=alert(1)>"),
    ),
    Case(
        "experiment name past MLflow's length",
        "tracking.experiment: 300 characters, more than the 256 MLflow keeps",
        _good(tracking={"experiment": "e" * 300}),
    ),
    Case(
        "model parameter key MLflow refuses",
        "model.params: MLflow would refuse the parameter key 'model.params.a(b)'",
        _good(model={"name": "some_models:net", "params": {"a(b)": 1}}),
    ),
    Case(
        "checkpoints folder under a regular file",
        "tracking.checkpoints: cannot make the folder blocker/ck for checkpoints",
        _good(tracking={"checkpoints": "blocker/ck"}),
        files=(("blocker", "a regular file\n"),),
    ),
    Case(
        "artifact folder under a regular file",
        "tracking.artifact_location: cannot make the folder blocker/art for artifacts",
        _good(tracking={"artifact_location": "blocker/art"}),
        files=(("blocker", "a regular file\n"),),
    ),
    Case(
        "own images in [0, 255] as floats",
        "dataset.name: pixel_data:pixels_0_255: floating-point train_x must lie in [0, 1], found values from 255 "
        "to 255",
        _good(dataset={"name": "pixel_data:pixels_0_255"}),
        files=(("pixel_data.py", USER_CODE),),
    ),
    Case(
        "own model factory calling sys.exit",
        "model.name: exit_models:exits(num_classes=10) failed: it called sys.exit(3)",
        _good(model={"name": "exit_models:exits"}),
        files=(("exit_models.py", USER_CODE),),
    ),
    Case(
        "own data set calling sys.exit",
        "dataset.name: exit_data:exits() failed: it called sys.exit(3)",
        _good(dataset={"name": "exit_data:exits"}),
        files=(("exit_data.py", USER_CODE),),
    ),
    Case(
        "--trust-checkpoint with FILE",
        "run: --trust-checkpoint applies to --resume without FILE",
        GOOD,
        args=("--resume", "f00df00d", "--trust-checkpoint"),
    ),
]

if importlib.util.find_spec("psycopg") is None:  # with the [postgres] extra installed the driver is there
    CASES.append(
        Case(
            "database store without its driver",
            "tracking.uri: the postgresql store needs the database driver 'psycopg', which is not installed; "
            'pip install -e ".[postgres]"',
            _good(tracking={"uri": "postgresql://user:secret@127.0.0.1:5432/mlflow"}),
        )
    )

SUBPROCESS = (
    "random bytes",
    "UTF-16 file",
    "malformed YAML",
    "more clients than samples",
    "unreachable cluster address",
    "own model with the wrong output size",
)


def _prepare(case: Case, folder: Path) -> None:
    for name, source in case.files:
        (folder / name).write_text(source, encoding="utf-8")
        sys.modules.pop(Path(name).stem, None)  # another case may have imported a module of that name elsewhere
    if case.raw is not None:
        (folder / FILE).write_bytes(case.raw)
    elif case.text is not None:
        (folder / FILE).write_text(case.text, encoding="utf-8")
    elif case.data is not None:
        (folder / FILE).write_text(yaml.safe_dump(case.data, sort_keys=False), encoding="utf-8")


def _run_in_process(case: Case, folder: Path) -> tuple[int, str, str]:
    """The command's exit status, stdout and stderr, run in this process with ``folder`` as working directory."""
    out, err = io.StringIO(), io.StringIO()
    previous = Path.cwd()
    os.chdir(folder)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            status = main(case.argv())
    finally:
        os.chdir(previous)
    return status, out.getvalue(), err.getvalue()


def _ray_children() -> set[int]:
    """Ray's own processes (raylet, GCS) under this test process."""
    found = set()
    for process in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            if any(name in process.name() for name in ("raylet", "gcs_server")):
                found.add(process.pid)
    return found


def _marked(mark: str) -> list[int]:
    found = []
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            if process.environ().get(MARK) == mark and process.status() != psutil.STATUS_ZOMBIE:
                found.append(process.pid)
    return found


def _assert_nothing_written(folder: Path, case: Case) -> None:
    """No MLflow run, no artifact and no checkpoint in the run's working directory."""
    store = folder / "mlruns.db"
    if store.exists():
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=f"sqlite:///{store}")
        experiments = [experiment.experiment_id for experiment in client.search_experiments()]
        assert client.search_runs(experiments) == []
    ours = {FILE, "mlruns.db", "__pycache__", *(name for name, _ in case.files)}  # Python caches imported modules
    leftovers = sorted(path.name for path in folder.iterdir() if path.name not in ours)
    assert leftovers == []


def _assert_one_line(case: Case, status: int, out: str, err: str) -> str:
    assert status == 2, (status, err)
    assert "Traceback" not in err and "Traceback" not in out
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("testbed: error: "), lines[0]
    assert case.expected in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def no_ray() -> Iterator[None]:
    import ray

    if ray.is_initialized():
        ray.shutdown()
    yield
    assert not ray.is_initialized()


@pytest.mark.parametrize("case", CASES, ids=[case.label for case in CASES])
def test_mistake_is_one_line_exit_2_and_leaves_nothing(case: Case, tmp_path: Path, no_ray: None) -> None:
    _prepare(case, tmp_path)
    before = _ray_children()
    started = time.monotonic()
    status, out, err = _run_in_process(case, tmp_path)
    seconds = time.monotonic() - started
    _assert_one_line(case, status, out, err)
    if case.label == "unreachable cluster address":
        assert seconds < 10, f"{seconds:.1f} s to report an unreachable cluster address"
    elif not case.starts_ray:
        assert seconds < 30, f"a mistake caught before Ray starts took {seconds:.1f} s"
    _assert_nothing_written(tmp_path, case)
    assert _ray_children() <= before


@pytest.mark.parametrize("label", SUBPROCESS)
def test_mistake_in_a_real_process(label: str, tmp_path: Path) -> None:
    case = next(case for case in CASES if case.label == label)
    _prepare(case, tmp_path)
    mark = uuid.uuid4().hex
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "testbed", *case.argv()],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=tmp_path,
        env=dict(os.environ, **{MARK: mark}),
    )
    seconds = time.monotonic() - started
    _assert_one_line(case, done.returncode, done.stdout, done.stderr)
    assert done.stdout == ""
    if label == "unreachable cluster address":
        assert seconds < 60, f"{seconds:.1f} s to report an unreachable address (interpreter start included)"
    _assert_nothing_written(tmp_path, case)
    assert _marked(mark) == [], "the command left processes behind"


def markdown_table() -> str:
    """The cases and the messages they actually produce, as a markdown table."""
    rows = ["| mistake | command | message (stderr, exit status 2) |", "| --- | --- | --- |"]
    for case in CASES:
        with tempfile.TemporaryDirectory() as folder:
            _prepare(case, Path(folder))
            status, _out, err = _run_in_process(case, Path(folder))
        assert status == 2, (case.label, err)
        command = " ".join(["testbed", *case.argv()[:-1]])
        message = err.strip().replace("|", "\\|")
        rows.append(f"| {case.label} | `{command}` | `` {message} `` |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table())


# --- Data never runs code: checkpoints and tracking stores name code only as text -------------------------------

MARKER_CODE = """
from pathlib import Path

Path(__file__).with_name("IMPORTED").write_text("user code ran")


def make(**kwargs):
    Path(__file__).with_name("CALLED").write_text("user code ran")
    raise RuntimeError("not a data set")


class Evil:
    pass
"""
"""A module that leaves IMPORTED beside itself when imported and CALLED when its function runs."""


def _ran(folder: Path) -> list[str]:
    return sorted(name for name in ("IMPORTED", "CALLED", "PWNED") if (folder / name).exists())


def _main_in(folder: Path, argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    previous = Path.cwd()
    os.chdir(folder)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            status = main(argv)
    finally:
        os.chdir(previous)
    return status, out.getvalue(), err.getvalue()


def _one_error_line(status: int, err: str, expected: str) -> None:
    assert status == 2, (status, err)
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("testbed: error: "), err
    assert expected in lines[0], lines[0]


def _checkpoint_state(config: dict[str, Any]) -> dict[str, Any]:
    """What a run's checkpoint holds after round 1, for ``config`` (built-in parts only are validated)."""
    import torch

    return {
        "round": 1,
        "params": {"weight": torch.zeros(10, 784), "bias": torch.zeros(10)},
        "history": [{"round": 1, "test_accuracy": 0.5}],
        "config": config,
        "pending_metrics": [],
        "audits": {"rows": [], "attack_rows": [], "not_applicable": {}, "grids": []},
    }


def _write_checkpoint(folder: Path, run_id: str, config: dict[str, Any]) -> Path:
    from testbed.tracking.checkpoint import checkpoint_path, save_checkpoint

    path = checkpoint_path(folder / "checkpoints", run_id)
    save_checkpoint(path, _checkpoint_state(config))
    return path


def _code_naming_configs() -> dict[str, dict[str, Any]]:
    shell = _good(dataset={"name": "os:system", "params": {"command": "touch PWNED"}})
    data = _good(dataset={"name": "marker_code:make"})
    model = _good(model={"name": "marker_code:make"})
    defence = _good(clients__0__defence={"batching": "marker_code:Evil"})
    return {"shell command": shell, "data set": data, "model": model, "defence": defence}


@pytest.mark.parametrize("named", sorted(_code_naming_configs()))
def test_resume_from_a_checkpoint_naming_code_runs_none_of_it(named: str, tmp_path: Path, no_ray: None) -> None:
    (tmp_path / "marker_code.py").write_text(MARKER_CODE, encoding="utf-8")
    sys.modules.pop("marker_code", None)
    path = _write_checkpoint(tmp_path, "evil", _code_naming_configs()[named])
    status, _, err = _main_in(tmp_path, ["run", "--resume", "evil", "--checkpoints", "checkpoints", "--quiet"])
    _one_error_line(status, err, "--resume: the configuration stored in checkpoints/evil/state.pt names code")
    assert "pass the topology file" in err and "--trust-checkpoint" in err
    assert _ran(tmp_path) == []
    assert not (tmp_path / "mlruns.db").exists()
    # with FILE, the checkpoint's configuration is only compared with the file's, never loaded
    (tmp_path / FILE).write_text(yaml.safe_dump(GOOD), encoding="utf-8")
    status, _, err = _main_in(tmp_path, ["run", FILE, "--resume", "evil", "--checkpoints", "checkpoints", "--quiet"])
    _one_error_line(status, err, "--resume: the checkpoint was written with a different configuration")
    assert _ran(tmp_path) == [] and path.is_file()


def test_trusted_checkpoint_does_import_what_it_names(tmp_path: Path, no_ray: None) -> None:
    """The control for the marker: with --trust-checkpoint the stored configuration is used, code and all."""
    (tmp_path / "marker_code.py").write_text(MARKER_CODE, encoding="utf-8")
    sys.modules.pop("marker_code", None)
    _write_checkpoint(tmp_path, "trusted", _code_naming_configs()["data set"])
    argv = ["run", "--resume", "trusted", "--checkpoints", "checkpoints", "--trust-checkpoint", "--quiet"]
    status, _, err = _main_in(tmp_path, argv)
    _one_error_line(status, err, "marker_code:make() failed: RuntimeError: not a data set")
    assert _ran(tmp_path) == ["CALLED", "IMPORTED"]
    sys.modules.pop("marker_code", None)


def _real_checkpoint_bytes(tmp_path: Path) -> bytes:
    return _write_checkpoint(tmp_path / "source", "good", _good()).read_bytes()


CORRUPT: dict[str, Any] = {
    "random bytes": lambda good: random.Random(3).randbytes(600),
    "empty file": lambda good: b"",
    "truncated": lambda good: good[: len(good) // 2],
    "not a mapping": [1, 2, 3],
    "no config": {"round": 1, "params": {}},
    "config not a mapping": "config",
    "negative round": -1,
    "params not tensors": {"weight": [0.0, 1.0]},
    "history of text": ["round one"],
    "pending metrics malformed": [("run", "step")],
    "audit rows malformed": {"rows": {"columns": {"avd": "not a tensor"}}, "attack_rows": []},
}


def _corrupt(kind: str, good: bytes, folder: Path) -> bytes:
    import torch

    how = CORRUPT[kind]
    if callable(how):
        data: bytes = how(good)
        return data
    if kind in ("not a mapping", "no config"):
        state: Any = how
    else:
        key = {
            "config not a mapping": "config",
            "negative round": "round",
            "params not tensors": "params",
            "history of text": "history",
            "pending metrics malformed": "pending_metrics",
            "audit rows malformed": "audits",
        }[kind]
        state = {**_checkpoint_state(_good()), key: how}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("kind", sorted(CORRUPT))
def test_corrupt_checkpoint_is_a_user_error_naming_the_file(kind: str, tmp_path: Path, no_ray: None) -> None:
    path = tmp_path / "checkpoints" / "broken" / "state.pt"
    path.parent.mkdir(parents=True)
    path.write_bytes(_corrupt(kind, _real_checkpoint_bytes(tmp_path), tmp_path))
    for argv in (
        ["run", "--resume", "broken", "--checkpoints", "checkpoints", "--quiet"],
        ["run", FILE, "--resume", "broken", "--checkpoints", "checkpoints", "--quiet"],
    ):
        (tmp_path / FILE).write_text(yaml.safe_dump(_good(tracking={"checkpoints": "checkpoints"})), encoding="utf-8")
        status, out, err = _main_in(tmp_path, argv)
        _one_error_line(status, err, "checkpoints/broken/state.pt")
        assert out == ""
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name not in {FILE, "checkpoints", "source", "mlruns.db"})
    assert leftovers == []


def _mutate_state(rng: random.Random, state: Any, depth: int = 0) -> Any:
    """One random structural change somewhere in a checkpoint's nested data."""
    import torch

    junk = [None, "text", -7, 2**70, 1.5, float("nan"), [], {}, torch.zeros(2), ["a"], {"k": "v"}, True]
    if isinstance(state, dict) and state and depth < 4:
        key = rng.choice(sorted(state, key=str))
        action = rng.random()
        copy = dict(state)
        if action < 0.2:
            del copy[key]
        elif action < 0.45:
            copy[key] = rng.choice(junk)
        elif action < 0.5:
            copy[rng.choice(["x", 3, ("t",)])] = rng.choice(junk)
        else:
            copy[key] = _mutate_state(rng, state[key], depth + 1)
        return copy
    if isinstance(state, list) and state and depth < 4:
        copy_list = list(state)
        index = rng.randrange(len(copy_list))
        copy_list[index] = _mutate_state(rng, copy_list[index], depth + 1) if rng.random() < 0.5 else rng.choice(junk)
        return copy_list
    return rng.choice(junk)


@pytest.mark.parametrize("seed", [0, 1])
def test_fuzzed_checkpoints_are_read_or_refused_in_one_line(seed: int, tmp_path: Path) -> None:
    """Seeded mutations of a real checkpoint (bytes and structure): a checkpoint or a UserError naming the file.

    Never another exception, and never any code named in a mutated configuration run (the marker module).
    """
    import torch

    from testbed.config.schema import Experiment
    from testbed.errors import UserError
    from testbed.tracking.checkpoint import checkpoint_path, experiment_from_checkpoint, load_checkpoint

    (tmp_path / "marker_code.py").write_text(MARKER_CODE, encoding="utf-8")
    sys.modules.pop("marker_code", None)
    rng = random.Random(seed)
    good = _real_checkpoint_bytes(tmp_path)
    outcomes = {"read": 0, "refused": 0}
    previous = Path.cwd()
    os.chdir(tmp_path)
    try:
        for case in range(60):
            kind = rng.choice(["bytes", "bytes", "structure", "structure", "code"])
            if kind == "bytes":
                content = bytearray(good)
                for _ in range(rng.randint(1, 30)):
                    content[rng.randrange(len(content))] = rng.randrange(256)
                if rng.random() < 0.3:
                    content = content[: rng.randrange(len(content))]
                data = bytes(content)
            else:
                state = _checkpoint_state(_good())
                if kind == "code":
                    state["config"] = rng.choice(list(_code_naming_configs().values()))
                state = _mutate_state(rng, state)
                buffer = io.BytesIO()
                torch.save(state, buffer)
                data = buffer.getvalue()
            run_id = f"case{case}"
            path = checkpoint_path("checkpoints", run_id)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            try:
                loaded = load_checkpoint(path)
                experiment = experiment_from_checkpoint("checkpoints", run_id)
            except UserError as exc:
                assert str(path) in str(exc), (case, kind, str(exc))
                assert "\n" not in str(exc).strip() or str(path) in str(exc).splitlines()[0]
                outcomes["refused"] += 1
            else:
                assert isinstance(experiment, Experiment) and isinstance(loaded["params"], dict)
                outcomes["read"] += 1
            assert _ran(tmp_path) == [], (case, kind)
    finally:
        os.chdir(previous)
    assert outcomes["refused"] >= 20, outcomes  # the mutations do reach the checks


def _store_with_a_run(folder: Path, experiment: str, run_name: str, extra: dict[str, str]) -> tuple[str, str]:
    """A real sqlite MLflow store holding one FINISHED run with the parameters a run of GOOD logs, plus ``extra``."""
    from mlflow.tracking import MlflowClient

    from testbed.config.topology import validate
    from testbed.tracking.store import flatten

    uri = f"sqlite:///{folder / 'mlruns.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment_id = client.create_experiment(experiment, artifact_location=(folder / "mlartifacts").as_uri())
    run = client.create_run(experiment_id, run_name=run_name)
    params = {**flatten(validate(_good()).model_dump(mode="json")), **extra}
    for key, value in params.items():
        client.log_param(run.info.run_id, key, value)
    client.log_metric(run.info.run_id, "test_accuracy", 0.5, step=1)
    client.set_terminated(run.info.run_id)
    return uri, run.info.run_id


def test_report_shows_stored_names_and_imports_nothing(tmp_path: Path) -> None:
    (tmp_path / "marker_code.py").write_text(MARKER_CODE, encoding="utf-8")
    sys.modules.pop("marker_code", None)
    name = "x\n<img src=x onerror=alert(1)>"
    defence = {"clients.a.defence.batching": "marker_code:Evil", "clients.a.defence.update": '["marker_code.Evil"]'}
    uri, run_id = _store_with_a_run(tmp_path, "shared", name, defence)
    status, out, err = _main_in(tmp_path, ["report", run_id, "--uri", uri])
    assert status == 0, err
    report = tmp_path / "reports" / run_id / "report.md"
    assert out.strip() == str(Path("reports") / run_id / "report.md")
    assert _ran(tmp_path) == []
    text = report.read_text(encoding="utf-8")
    assert "marker\\_code:Evil / cross-entropy / marker\\_code.Evil" in text  # as stored, escaped
    assert "<img" not in text and "x &lt;img src=x onerror=alert(1)&gt;" in text
    assert f"| `{run_id}` | x &lt;img src=x onerror=alert(1)&gt; | - | 0.500 |" in text  # one table row
    assert f"- Target: run x &lt;img src=x onerror=alert(1)&gt; (`{run_id}`)" in text
    with (tmp_path / "reports" / run_id / "leakage.csv").open(encoding="utf-8") as handle:
        assert "marker_code:Evil / cross-entropy / marker_code.Evil" in handle.read()


def test_report_default_folder_stays_under_reports(tmp_path: Path) -> None:
    uri, _ = _store_with_a_run(tmp_path, "../escape", "plain", {})
    status, out, err = _main_in(tmp_path, ["report", "../escape", "--uri", uri])
    assert status == 0, err
    assert out.strip() == str(Path("reports") / "escape" / "report.md")
    assert (tmp_path / "reports" / "escape" / "report.md").is_file()
    assert not (tmp_path / "escape").exists() and not (tmp_path.parent / "escape").exists()


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("sqlite:///absent.db", "--uri: no MLflow store at absent.db"),
        ("ftp://127.0.0.1/store", "--uri: cannot read MLflow at 'ftp://127.0.0.1/store'"),
        ("absent-folder", "--uri: no MLflow store at absent-folder"),
    ],
)
def test_report_on_a_store_that_is_not_there_creates_nothing(uri: str, expected: str, tmp_path: Path) -> None:
    status, out, err = _main_in(tmp_path, ["report", "some-run", "--uri", uri])
    _one_error_line(status, err, expected)
    assert out == "" and list(tmp_path.iterdir()) == []


def test_study_report_reads_the_stored_study_file_as_data(tmp_path: Path) -> None:
    """The study file read back from a store names code everywhere (policies, data set, models): the report
    checks it against the study schema, which compares names and numbers, and imports none of it."""
    from testbed.errors import UserError
    from testbed.study.report import _stored_spec

    (tmp_path / "marker_code.py").write_text(MARKER_CODE, encoding="utf-8")
    sys.modules.pop("marker_code", None)
    study = yaml.safe_load((REPO / "docs" / "results" / "tables" / "study.yaml").read_text(encoding="utf-8"))
    study["dataset"] = {"name": "marker_code:make"}
    study["policies"] = {name: {"batching": "marker_code:Evil"} for name in study["policies"]}
    for arm in study["arms"]:
        arm["model"] = {"name": "marker_code:make"}
    previous = Path.cwd()
    os.chdir(tmp_path)
    try:
        spec = _stored_spec(yaml.safe_dump(study), "study.yaml of run r1")
        assert spec.dataset == {"name": "marker_code:make"} and spec.baseline in spec.policies
        assert _ran(tmp_path) == []
        with pytest.raises(
            UserError, match=r"study\.yaml of run r1: the YAML cannot be read: with its aliases expanded"
        ):
            _stored_spec(ALIAS_BOMB, "study.yaml of run r1")
        with pytest.raises(UserError, match=r"study\.yaml of run r1:3: duplicate key 'baseline'"):
            _stored_spec("name: s\nbaseline: a\nbaseline: b\n", "study.yaml of run r1")
        with pytest.raises(UserError, match=r"report: study\.yaml of run r1: seeds: "):
            _stored_spec(yaml.safe_dump({**study, "seeds": "many"}), "study.yaml of run r1")
    finally:
        os.chdir(previous)


def test_run_whose_parameters_mlflow_refuses_is_closed_failed(tmp_path: Path) -> None:
    """A run is created before its parameters are sent; when MLflow refuses them the run ends FAILED, not RUNNING."""
    from mlflow.exceptions import MlflowException

    from testbed.tracking.store import Tracker

    tracker = Tracker(f"sqlite:///{tmp_path / 'mlruns.db'}", "refused", str(tmp_path / "art"))
    with pytest.raises(MlflowException):
        tracker.start_run("r", {"clients.dp (sigma=1).count": "2"})
    runs = tracker.client.search_runs([tracker.ensure_experiment()])
    assert [run.info.status for run in runs] == ["FAILED"]


@pytest.mark.parametrize(
    ("argv", "warned", "serve"),
    [
        (["ui"], False, "--no-serve-artifacts"),
        (["ui", "--host", "localhost"], False, "--no-serve-artifacts"),
        (["ui", "--host", "::1"], False, "--no-serve-artifacts"),
        (["ui", "--host", "0.0.0.0"], True, "--no-serve-artifacts"),
        (["ui", "--host", "192.168.1.7", "--serve-artifacts"], True, "--serve-artifacts"),
    ],
)
def test_ui_warns_off_loopback_and_serves_no_artifacts_unless_asked(
    argv: list[str], warned: bool, serve: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    started: list[list[str]] = []
    monkeypatch.setattr("testbed.cli.subprocess.call", lambda command, env: started.append(command) or 0)
    status, out, err = _main_in(tmp_path, argv)
    assert status == 0 and out == ""
    [command] = started
    assert command[command.index("--host") + 1] == (argv[2] if len(argv) > 2 else "127.0.0.1")
    assert serve in command and ({"--serve-artifacts", "--no-serve-artifacts"} - {serve}).isdisjoint(command)
    assert ("testbed: warning: --host" in err and "not a loopback address" in err) == warned, err


def _yaml_structure_case(rng: random.Random) -> tuple[str, str, str | None]:
    """A topology text with a random YAML structure: (kind, text, what the one error line must say or None for OK)."""
    from testbed.config.topology import MAX_YAML_NODES

    kind = rng.choice(["aliases", "duplicate", "nested duplicate", "deep", "merge"])
    if kind == "aliases":
        levels, fan = rng.randint(1, 7), rng.randint(1, 12)
        lines = ["x0: &x0 [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]"]
        lines += [f"x{i}: &x{i} [{', '.join([f'*x{i - 1}'] * fan)}]" for i in range(1, levels + 1)]
        size = 11
        for _ in range(levels):
            size = 1 + fan * size
        # every anchor is also a top-level field: the file holds each level once more
        total = sum((11 if level == 0 else 1) for level in range(levels + 1)) + size * 2
        if size > MAX_YAML_NODES:
            expected: str | None = "with its aliases expanded the YAML holds over 100,000 values"
        elif total < MAX_YAML_NODES // 2:
            expected = "x0: unknown field"
        else:
            return _yaml_structure_case(rng)  # too close to the cap to say which line comes first
        return kind, GOOD_TEXT + "\n".join(lines) + "\n", expected
    if kind == "duplicate":
        key = rng.choice(["name", "rounds", "seed", "clients", "model", "dataset"])
        value = {"clients": "[{group: b, count: 5, batch_size: 2}]", "model": "{name: mlp}", "dataset": "{}"}
        extra = f"{key}: {value.get(key, '3')}\n"
        first = 1 + [line.split(":")[0] for line in GOOD_TEXT.splitlines()].index(key) if key in GOOD else None
        lines = GOOD_TEXT.count("\n") + (1 if key == "seed" else 0)
        text = GOOD_TEXT + ("seed: 1\n" if key == "seed" else "") + extra
        where = f"(first given on line {first if first is not None else lines})"
        return kind, text, f"{FILE}:{lines + 1}: duplicate key '{key}' {where}"
    if kind == "nested duplicate":
        inner = rng.choice(["count", "batch_size", "group"])
        text = GOOD_TEXT.replace("- group: a", f"- {inner}: 3\n  group: a", 1) if inner != "group" else GOOD_TEXT
        if inner == "group":
            text = GOOD_TEXT.replace("  count: 10", "  group: z\n  count: 10", 1)
        return kind, text, f"duplicate key '{inner}'"
    if kind == "deep":
        depth = rng.choice([10, 100, 1_000, 20_000])
        text = GOOD_TEXT + "extra: " + "[" * depth + "]" * depth + "\n"
        return kind, text, "nested too deeply" if depth >= 1_000 else "extra: unknown field"
    anchor = "x: &shared {count: 4, batch_size: 2}\n"  # an unknown field, read only after the merge worked
    clients = "clients:\n- {<<: *shared, group: a}\n- {<<: *shared, group: b, count: 6}\n"
    return kind, GOOD_TEXT.split("clients:")[0] + anchor + clients, "x: unknown field"


@pytest.mark.parametrize("seed", [0, 1])
def test_fuzzed_yaml_structure_is_one_line_within_seconds(seed: int, tmp_path: Path) -> None:
    """Seeded aliases (some past the cap), duplicate keys at the top and inside blocks, deep nesting, merge keys."""
    rng = random.Random(seed)
    seen = set()
    for case in range(30):
        kind, text, expected = _yaml_structure_case(rng)
        seen.add(kind)
        (tmp_path / FILE).write_text(text, encoding="utf-8")
        started = time.monotonic()
        status, out, err = _main_in(tmp_path, ["validate", FILE])
        seconds = time.monotonic() - started
        where = f"seed {seed}, case {case} ({kind})"
        assert seconds < 5, f"{where}: {seconds:.1f} s"
        assert "Traceback" not in out + err, where
        if expected is None:
            assert status == 0 and out.strip() == f"{FILE}: OK", (where, err)
        else:
            assert status == 2, (where, status, err)
            assert len(err.strip().splitlines()) == 1 and expected in err, (where, expected, err)
    assert len(seen) >= 4, seen


def test_merge_keys_and_anchors_stay_usable(tmp_path: Path) -> None:
    text = GOOD_TEXT.split("clients:")[0] + (
        "clients:\n- &first {group: a, count: 4, batch_size: 2}\n- {<<: *first, group: b, count: 6}\n"
    )
    (tmp_path / FILE).write_text(text, encoding="utf-8")
    status, out, err = _main_in(tmp_path, ["validate", FILE])
    assert (status, out.strip(), err) == (0, f"{FILE}: OK", "")
    study = Path(__file__).resolve().parents[2] / "topologies" / "studies" / "mixing-study.yaml"
    assert "&fedsgd" in study.read_text(encoding="utf-8")
    status, out, err = _main_in(tmp_path, ["validate", str(study)])
    assert status == 0 and "OK (study:" in out, err


DYING_MODEL = """
import os

from torch import nn


class Dies(nn.Module):
    def __init__(self, num_classes):
        super().__init__()
        self.linear = nn.Linear(28 * 28, num_classes)

    def forward(self, x):
        if str(os.getpid()) != os.environ.get("TESTBED_TEST_DRIVER"):
            os._exit(1)  # the worker process dies in every chunk; the driver's own checks pass
        return self.linear(x.flatten(1))


def net(num_classes):
    return Dies(num_classes)
"""


@pytest.mark.ray
@pytest.mark.slow
def test_chunk_that_kills_every_worker_stops_the_run_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, no_ray: None
) -> None:
    from mlflow.tracking import MlflowClient

    from testbed.runtime.workers import MAX_CHUNK_RETRIES

    (tmp_path / "dying_models.py").write_text(DYING_MODEL, encoding="utf-8")
    sys.modules.pop("dying_models", None)
    monkeypatch.setenv("TESTBED_TEST_DRIVER", str(os.getpid()))
    topology = _good(
        rounds=1,
        model={"name": "dying_models:net"},
        dataset={"name": "mnist-5k", "max_train": 400, "max_test": 100},
        clients=[{"group": "a", "count": 4, "batch_size": 4}],
        resources={"num_cpus": 1, "workers": 1, "chunk_size": 4},
        tracking={"uri": f"sqlite:///{tmp_path / 'mlruns.db'}"},  # absolute: MLflow caches stores by URI
    )
    (tmp_path / FILE).write_text(yaml.safe_dump(topology), encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="testbed.runtime.workers"):
        status, out, err = _main_in(tmp_path, ["run", FILE, "--quiet"])
    assert status == 1, err
    assert not any(line.startswith("{") for line in out.splitlines()), out  # no result line (Ray's own log may show)
    assert "Traceback" not in err
    ours = [line for line in err.splitlines() if line.startswith("testbed:")]
    assert len(ours) == 1, err
    assert ours[0].startswith(
        f"testbed: run stopped: round 1: chunk 0 (4 clients) killed its worker {MAX_CHUNK_RETRIES + 1} times "
        f"(it is retried at most {MAX_CHUNK_RETRIES} times); last error: "
    ), ours[0]
    retried = [record for record in caplog.records if "re-running chunk 0 on a new worker" in record.getMessage()]
    assert len(retried) == MAX_CHUNK_RETRIES
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlruns.db'}")
    runs = client.search_runs([experiment.experiment_id for experiment in client.search_experiments()])
    assert [run.info.status for run in runs] == ["FAILED"]
