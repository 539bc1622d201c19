"""Defence parts by import path follow the model's search rule: the topology's folder, the working directory,
then PYTHONPATH; the folder is recorded as ``defence.path`` and travels to the Ray workers."""

from __future__ import annotations

import contextlib
import io
import math
from pathlib import Path

import pytest
import torch

from defenses import build_policy
from testbed.cli import main
from testbed.config.load import load_experiment
from testbed.runtime.user_models import code_folders, runtime_env
from tests.support.user_code import BATCHNORM_NET, FOCAL_LOSS, write_module


@pytest.fixture
def folders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """(the topology's folder, the working directory): two folders apart, and no PYTHONPATH."""
    topology, code = tmp_path / "topologies", tmp_path / "code"
    topology.mkdir()
    code.mkdir()
    monkeypatch.chdir(code)
    monkeypatch.delenv("PYTHONPATH", raising=False)
    return topology, code


def _topology(folder: Path, defence: str, model: str = "{name: softmax}") -> Path:
    path = folder / "t.yaml"
    path.write_text(
        f"name: t\nrounds: 1\nmodel: {model}\nclients: [{{group: a, count: 2, batch_size: 1, defence: {defence}}}]\n",
        encoding="utf-8",
    )
    return path


def _validate(path: Path) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        status = main(["validate", str(path)])
    return status, err.getvalue()


def test_a_loss_beside_the_topology_is_found_recorded_and_shipped(folders: tuple[Path, Path]) -> None:
    topology, _ = folders
    module = write_module(topology, FOCAL_LOSS, stem="focal")
    path = _topology(topology, f"{{loss: {{name: '{module}:Focal', gamma: 3}}}}")
    assert _validate(path) == (0, "")  # testbed validate imports it from the topology's folder
    experiment = load_experiment(path)
    defence = experiment.clients[0].defence
    assert defence["path"] == str(topology.resolve())
    loss = build_policy(defence).loss
    assert type(loss).__name__ == "Focal" and loss.describe() == {"name": f"{module}:Focal", "gamma": 3.0}
    # p = 1/2 for two equal logits: (1 - 1/2)^3 * log 2
    value = loss.per_sample(torch.zeros(1, 2), torch.tensor([0]))
    torch.testing.assert_close(value, torch.tensor([0.125 * math.log(2.0)]))
    folder = str(topology.resolve())
    assert runtime_env(experiment, joined=False) == {"env_vars": {"PYTHONPATH": folder}}
    assert runtime_env(experiment, joined=True) == {"py_modules": [str(topology.resolve() / f"{module}.py")]}


def test_the_working_directory_and_a_given_path_are_searched_as_for_a_model(folders: tuple[Path, Path]) -> None:
    topology, code = folders
    here = write_module(code, FOCAL_LOSS, stem="focal")
    assert load_experiment(_topology(topology, f"{{loss: '{here}:Focal'}}")).clients[0].defence["path"] == str(
        code.resolve()
    )
    # a path relative to the topology file; a model's folder and the defence's both reach the workers
    net = write_module(topology, BATCHNORM_NET)
    experiment = load_experiment(
        _topology(topology, f"{{loss: '{here}:Focal', path: ../code}}", model=f"{{name: '{net}:Net'}}")
    )
    assert experiment.clients[0].defence["path"] == str(code.resolve())
    assert code_folders(experiment) == [str(topology.resolve()), str(code.resolve())]
    # the dotted spelling names the same class
    dotted = load_experiment(_topology(topology, f"{{loss: '{here}.Focal', path: ../code}}"))
    assert type(build_policy(dotted.clients[0].defence).loss).__name__ == "Focal"


def test_a_module_in_no_searched_folder_is_one_line_naming_the_field(folders: tuple[Path, Path]) -> None:
    topology, _ = folders
    status, err = _validate(_topology(topology, "{loss: 'focal_nowhere_to_be_found:Focal'}"))
    assert status == 2
    assert err.count("\n") == 1 and "defence.loss: cannot import 'focal_nowhere_to_be_found'" in err, err
