"""An example Flower app whose training replies the testbed audits (docs/integrations.md).

ClientApp: each simulated client (``partition-id`` 0..19) trains the topology's model on its shard of the offline
MNIST subset (the testbed's partition of ``flower-mnist.yaml``) with plain SGD: FedSGD is one step on one batch,
FedAvg one epoch of shuffled batches; it replies with its trained weights and ``num-examples``, ``local-steps`` and
``batch-size``. ``ground_truth_mod`` attaches the samples it trained on (simulation only: the scorer reads them,
the attacks never do). ServerApp: Flower's FedAvg wrapped in ``AuditedStrategy``, which attacks the sampled
replies of each round with the topology's ``attack`` block and logs ``leakage/flower/...`` to MLflow.

    python topologies/flower/flower_app.py                               # FedSGD, 3 rounds, 20 clients
    python topologies/flower/flower_app.py --set algorithm.name=fedavg   # one local epoch per round
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from testbed.config.load import load_experiment
from testbed.config.schema import Experiment
from testbed.config.topology import apply_overrides, read_yaml, validate
from testbed.integrations.flower import AuditedStrategy, ground_truth_mod, record_trained
from testbed.runtime.models import model_for
from testbed.runtime.preparation import PreparedData, prepare_data

TOPOLOGY = Path(__file__).with_name("flower-mnist.yaml")


@functools.lru_cache(maxsize=4)
def setup(topology: str, overrides: tuple[str, ...] = ()) -> tuple[Experiment, PreparedData]:
    """The topology (with ``--set`` overrides) and its data set and partition, once per process."""
    if overrides:
        data, node = read_yaml(topology)
        experiment = validate(apply_overrides(data, overrides), source=topology, node=node)
    else:
        experiment = load_experiment(topology)
    return experiment, prepare_data(experiment)


def client_batches(experiment: Experiment, owned: np.ndarray, partition_id: int, server_round: int) -> list[np.ndarray]:
    """The training-set positions of each local step's batch: FedSGD one batch, FedAvg shuffled epochs."""
    rng = np.random.default_rng([experiment.seed, server_round, partition_id])
    size = experiment.clients[0].batch_size
    if experiment.algorithm.name == "fedsgd":
        return [rng.choice(owned, size=min(size, len(owned)), replace=False)]
    batches: list[np.ndarray] = []
    for _ in range(experiment.algorithm.local_epochs or 1):
        order = rng.permutation(owned)
        batches += [order[start : start + size] for start in range(0, len(order), size)]
    return batches


TOPOLOGY_ENV, OVERRIDES_ENV = "TESTBED_FLOWER_TOPOLOGY", "TESTBED_FLOWER_SET"
"""How the ClientApps (in Flower's Ray workers, which inherit the environment) learn the topology and overrides:
``run_simulation`` passes the ClientApps no run config."""


def _config(context: Context) -> tuple[str, tuple[str, ...]]:
    del context
    overrides = os.environ.get(OVERRIDES_ENV, "")
    return os.environ.get(TOPOLOGY_ENV, str(TOPOLOGY)), tuple(item for item in overrides.split("\n") if item)


client_app = ClientApp(mods=[ground_truth_mod])


@client_app.train()
def train(message: Message, context: Context) -> Message:
    """Local SGD from the global weights; the reply holds the trained weights and the public counts."""
    experiment, prepared = setup(*_config(context))
    dataset = prepared.dataset
    model = model_for(experiment.model, dataset.input_shape, dataset.num_classes)
    model.load_state_dict(message.content.array_records["arrays"].to_torch_state_dict())
    partition_id = int(context.node_config["partition-id"])
    server_round = int(cast(int, message.content.config_records["config"]["server-round"]))
    batches = client_batches(experiment, prepared.partition.client(partition_id), partition_id, server_round)
    optimiser = torch.optim.SGD(model.parameters(), lr=experiment.algorithm.lr)
    for batch in batches:
        optimiser.zero_grad()
        logits = model(torch.as_tensor(dataset.train_x[batch]))
        torch.nn.functional.cross_entropy(logits, torch.as_tensor(dataset.train_y[batch]).long()).backward()
        optimiser.step()
    record_trained(context, partition_id, np.concatenate(batches))
    metrics: dict[str, int | float | list[int] | list[float]] = {
        "num-examples": int(sum(len(batch) for batch in batches)),
        "local-steps": len(batches),
        "batch-size": experiment.clients[0].batch_size,
    }
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": MetricRecord(metrics)})
    return Message(content=content, reply_to=message)


def server_app_for(topology: str | Path = TOPOLOGY, overrides: tuple[str, ...] = (), **kwargs: Any) -> ServerApp:
    """A ServerApp running the topology's rounds of FedAvg over every client, audited (``kwargs``: AuditedStrategy's).

    The strategy is kept as ``app.strategy`` once the app has run (its ``audits`` and ``run_id``)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        experiment, prepared = setup(str(topology), overrides)
        dataset = prepared.dataset
        model = model_for(experiment.model, dataset.input_shape, dataset.num_classes)
        clients = experiment.clients[0].count
        inner = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=clients, min_available_nodes=clients)
        strategy = AuditedStrategy(inner, experiment, **kwargs)
        app.strategy = strategy  # type: ignore[attr-defined]
        strategy.start(grid=grid, initial_arrays=ArrayRecord(model.state_dict()), num_rounds=experiment.rounds)

    return app


def simulate(
    topology: str | Path = TOPOLOGY, overrides: tuple[str, ...] = (), client: ClientApp | None = None, **kwargs: Any
) -> AuditedStrategy:
    """Run the app in Flower's simulation (one supernode per client of the topology; ``client``: another
    ClientApp than this module's); the audited strategy."""
    from flwr.simulation import run_simulation

    experiment, _ = setup(str(topology), overrides)
    server = server_app_for(topology, overrides, **kwargs)
    os.environ[TOPOLOGY_ENV], os.environ[OVERRIDES_ENV] = str(topology), "\n".join(overrides)
    backend: Any = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0}}
    run_simulation(server, client or client_app, num_supernodes=experiment.clients[0].count, backend_config=backend)
    strategy: AuditedStrategy = server.strategy  # type: ignore[attr-defined]
    return strategy


def main(argv: list[str] | None = None) -> int:
    """Run the app and print the audit's MLflow run and each round's recovered fraction."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--topology", default=str(TOPOLOGY))
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="KEY=VALUE, as testbed run")
    args = parser.parse_args(argv)
    strategy = simulate(args.topology, tuple(args.overrides))
    print(f"audit run {strategy.run_id}")
    for audit in strategy.audits:
        print(f"round {audit.round}: recovered {audit.recovered_fraction}, not applicable {len(audit.not_applicable)}")
    return 0


if __name__ == "__main__":
    # Flower's Ray workers import the ClientApp by module name: run it from the module flower_app (this file,
    # importable since its folder leads sys.path), never from __main__, which the workers cannot import
    import flower_app

    sys.exit(flower_app.main())
