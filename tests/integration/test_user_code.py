"""A user's own model trained through the whole stack: a BatchNorm net from the user's file, and ResNet-18."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from mlflow.tracking import MlflowClient

from testbed.config.load import load_experiment
from testbed.engine import run_experiment
from tests.conftest import REPO
from tests.support.cli import run_topology
from tests.support.user_code import BATCHNORM_NET, FOCAL_LOSS, write_module

pytestmark = pytest.mark.ray


def test_a_batchnorm_model_from_the_users_file_trains_by_fedavg_on_two_workers(tmp_path: Path) -> None:
    """``testbed run`` in a fresh process: the model's file sits beside the topology, Ray workers import it."""
    module = write_module(tmp_path, BATCHNORM_NET, stem="mynet")
    topology = {
        "name": "user-bn",
        "seed": 0,
        "rounds": 3,
        "dataset": {"name": "mnist-5k", "max_train": 1600, "max_test": 400, "partition": {"scheme": "iid"}},
        "model": {"name": f"{module}:small_bn_net", "params": {"width": 8}},
        "algorithm": {"name": "fedavg", "lr": 0.1, "local_steps": 8},
        "clients": [{"group": "a", "count": 16, "batch_size": 16}],
        "resources": {"num_cpus": 2, "workers": 2, "chunk_size": 4},
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlruns.db'}", "artifact_location": str(tmp_path / "art")},
    }
    result = run_topology(tmp_path, topology, elsewhere=True, timeout=600)
    assert result["final_test_accuracy"] > 0.5, result  # ten classes: chance is 0.1
    client = MlflowClient(tracking_uri=topology["tracking"]["uri"])
    run = client.get_run(result["run_id"])
    assert run.data.params["model.path"] == str(tmp_path.resolve())
    state = torch.load(Path(client.download_artifacts(result["run_id"], "model_state_dict.pt")), weights_only=True)
    assert int(state["1.num_batches_tracked"]) == 3 * 8  # each round: the most local steps of a client
    assert 0.0 < float(state["1.running_var"].min())  # aggregated running statistics, not the initial ones


def test_a_focal_loss_from_the_users_file_trains_through_testbed_run(tmp_path: Path) -> None:
    """A client group's loss from a file beside the topology, with neither the working directory nor PYTHONPATH
    holding it: ``testbed run`` records its folder, and both Ray workers import it."""
    module = write_module(tmp_path, FOCAL_LOSS, stem="focal")
    topology = {
        "name": "user-focal",
        "seed": 0,
        "rounds": 3,
        "dataset": {"name": "mnist-5k", "max_train": 1600, "max_test": 400, "partition": {"scheme": "iid"}},
        "model": {"name": "softmax"},
        "algorithm": {"name": "fedavg", "lr": 0.5, "local_steps": 8},
        "clients": [
            {"group": "focal", "count": 16, "batch_size": 16, "defence": {"loss": {f"{module}:Focal": {"gamma": 2}}}}
        ],
        "resources": {"num_cpus": 2, "workers": 2, "chunk_size": 4},
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlruns.db'}", "artifact_location": str(tmp_path / "art")},
    }
    result = run_topology(tmp_path, topology, elsewhere=True, timeout=600)
    assert result["final_test_accuracy"] > 0.5, result  # ten classes: chance is 0.1
    params = MlflowClient(tracking_uri=topology["tracking"]["uri"]).get_run(result["run_id"]).data.params
    assert params["clients.focal.defence.path"] == str(tmp_path.resolve())
    assert params[f"clients.focal.defence.loss.{module}:Focal.gamma"] == "2"


@pytest.mark.slow
def test_a_users_focal_loss_and_label_smoothing_are_attacked_as_cross_entropy_is(tmp_path: Path) -> None:
    """The attacks re-create each group's loss from the loss object it trained with: a focal loss from the user's
    file (no PYTHONPATH) and label smoothing at epsilon 0.3 leak to Inverting Gradients alone (sigmoid LeNet,
    batch 1, labels inferred) as cross-entropy does. Before, the focal group got no leakage at all and label
    smoothing was simulated at epsilon 0.1."""
    module = write_module(tmp_path, FOCAL_LOSS, stem="focal")
    group = {"count": 12, "batch_size": 1}
    topology = {
        "name": "user-losses-attacked",
        "seed": 0,
        "rounds": 2,
        "dataset": {"name": "mnist-5k", "max_train": 600, "max_test": 200, "partition": {"scheme": "iid"}},
        "model": {"name": "lenet"},
        "algorithm": {"name": "fedsgd", "lr": 0.1},
        "clients": [
            {"group": "ce", **group, "defence": {"loss": "cross-entropy"}},
            {"group": "focal", **group, "defence": {"loss": {f"{module}:Focal": {"gamma": 2}}}},
            {"group": "smooth", **group, "defence": {"loss": {"label-smoothing": 0.3}}},
        ],
        "attack": {
            "name": "inverting-gradients",
            "params": {"iterations": 1000},
            "audit": {"clients_per_round": 9},
        },
        "resources": {"num_cpus": 2, "workers": 1, "chunk_size": 12},
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlruns.db'}", "artifact_location": str(tmp_path / "art")},
    }
    leakage = run_topology(tmp_path, topology)["leakage"]
    assert set(leakage) == {"ce", "focal", "smooth"}, leakage  # every group attacked, none not applicable
    assert all(row["audited_samples"] >= 3 for row in leakage.values()), leakage
    reference = leakage["ce"]["recovered_fraction"]
    assert reference >= 0.8, leakage  # one image through a sigmoid LeNet: Inverting Gradients recovers it
    for name in ("focal", "smooth"):
        assert abs(leakage[name]["recovered_fraction"] - reference) <= 0.1, leakage


def test_resnet18_smoke_on_synthetic_rgb(local_ray: None, tracking: dict[str, Any]) -> None:
    """topologies/cifar10-resnet.yaml's model, one FedAvg round on small synthetic 3x32x32 data, two workers."""
    overrides = [
        "rounds=1",
        "dataset.name=synthetic",
        "dataset.root=null",
        "dataset.synthetic_shape=[3,32,32]",
        "dataset.synthetic_samples=40",
        "dataset.max_test=20",
        "dataset.partition.scheme=iid",
        "dataset.partition.min_samples=1",
        "clients.all.count=4",
        "clients.all.batch_size=4",
        "sampling.clients_per_round=4",
        "algorithm.local_epochs=null",
        "algorithm.local_steps=2",
        "resources.workers=2",
        "resources.chunk_size=2",
        "evaluation.batch_size=20",
        *(f"tracking.{key}={value}" for key, value in tracking.items()),
    ]
    experiment = load_experiment(REPO / "topologies" / "cifar10-resnet.yaml", overrides)
    assert experiment.model.name == "torchvision.models:resnet18" and experiment.model.path is None
    result = run_experiment(experiment, show_progress=False)
    assert result.history[-1]["accepted"] == 4
    assert 0.0 <= result.final_accuracy <= 1.0
    assert int(result.params["bn1.num_batches_tracked"]) == 2
    assert result.params["fc.weight"].shape == (10, 512)


def test_joining_a_cluster_ships_the_users_module_to_the_workers(tmp_path: Path) -> None:
    """With an address, the module travels as a py_module: a worker imports it without the user's folder."""
    import ray
    from ray.cluster_utils import Cluster

    from testbed.config.topology import validate
    from testbed.runtime.cluster import ray_session

    if ray.is_initialized():
        ray.shutdown()
    module = write_module(tmp_path, BATCHNORM_NET, stem="shipped")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        experiment = validate(
            {
                "name": "t",
                "rounds": 1,
                "model": {"name": f"{module}:Net", "path": str(tmp_path)},
                "clients": [{"group": "a", "count": 2, "batch_size": 1}],
                "resources": {"address": cluster.address},
            }
        )
        with ray_session(experiment.resources, experiment):

            @ray.remote(num_cpus=0)
            def origin() -> str:
                import importlib

                return str(importlib.import_module(module).__file__)

            where = ray.get(origin.remote())
    finally:
        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()
    assert where.endswith(f"{module}.py") and not where.startswith(str(tmp_path)), where


def test_a_users_attack_from_the_users_file_runs_through_testbed_run_and_its_leakage_is_logged(
    tmp_path: Path,
) -> None:
    """docs/attacks.md's example attack, saved beside the topology (no PYTHONPATH, run from another folder),
    reaches the attack actor and recovers FedSGD's one-sample updates through the softmax model."""
    from tests.unit.test_attacks_user import documented_attack

    module = write_module(tmp_path, documented_attack(), stem="my_attacks")
    topology = {
        "name": "user-attack",
        "seed": 0,
        "rounds": 2,
        "dataset": {"name": "mnist-5k", "max_train": 400, "max_test": 100, "partition": {"scheme": "iid"}},
        "model": {"name": "softmax"},
        "algorithm": {"name": "fedsgd", "lr": 0.1},
        "clients": [{"group": "a", "count": 8, "batch_size": 1}],
        "attack": {"name": f"{module}:RowLeastSquares", "params": {"floor": 1e-12}, "audit": {"clients_per_round": 3}},
        "resources": {"num_cpus": 2, "workers": 1, "chunk_size": 8},
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlruns.db'}", "artifact_location": str(tmp_path / "art")},
    }
    result = run_topology(tmp_path, topology, elsewhere=True, timeout=600)
    assert result["leakage"]["a"]["audited_samples"] == 6, result  # 3 clients a round, 2 rounds
    assert result["leakage"]["a"]["recovered_fraction"] == 1.0, result  # one image per update: recovered exactly
    run = MlflowClient(tracking_uri=topology["tracking"]["uri"]).get_run(result["run_id"])
    assert run.data.params["attack.path"] == str(tmp_path.resolve())
    assert run.data.metrics["leakage/a/recovered_fraction"] == 1.0
