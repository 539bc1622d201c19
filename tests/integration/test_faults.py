"""Faults during a run on a real local Ray: dead workers, a dead aggregator, dropouts, stragglers, bad updates.

Processes are killed with SIGKILL while the run goes on in a background thread of the test process
(``run_experiment`` reuses the test's Ray). The Ray processes of this test are found in the test
process's own process tree, by the title Ray gives them (``ray::ClientWorker.run`` while a worker
executes a chunk), so a concurrently running Ray elsewhere on the machine is never touched.
"""

from __future__ import annotations

import math
import os
import signal
import threading
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
import torch
from mlflow.tracking import MlflowClient

from testbed.config.topology import validate
from testbed.engine import RunAborted, RunResult, run_experiment
from testbed.runtime.preparation import initial_params, prepare_data
from testbed.runtime.records import ChunkTask
from testbed.runtime.scheduling import group_bounds, sample_clients
from testbed.runtime.simulation import STREAM_BEHAVIOUR, SimulationContext, client_rng, simulate_chunk
from testbed.tracking.checkpoint import load_checkpoint
from tests.conftest import small_experiment, wait_for

pytestmark = pytest.mark.ray

KINDS = ("nan", "inf", "norm", "shape", "dtype")
REASON = {"nan": "non_finite", "inf": "non_finite", "norm": "norm", "shape": "shape", "dtype": "dtype"}
DEADLINE_S = 180.0


def _long_rounds(tracking: dict[str, Any]) -> dict[str, Any]:
    """FedAvg with two local epochs in chunks of two clients: rounds of many short tasks, long enough to hit."""
    data = small_experiment(tracking, rounds=6, algorithm={"name": "fedavg", "lr": 0.1, "local_epochs": 2})
    data["resources"] = {"chunk_size": 2}
    return data


def _tracking_in(folder: Path) -> dict[str, Any]:
    return {
        "uri": f"sqlite:///{folder / 'mlruns.db'}",
        "artifact_location": str(folder / "mlartifacts"),
        "checkpoints": str(folder / "checkpoints"),
    }


def _ray_processes(title: str) -> list[psutil.Process]:
    """Live processes of this test process's Ray whose title starts with ``title``."""
    found = []
    for process in psutil.Process().children(recursive=True):
        try:
            cmdline = process.cmdline()
            if cmdline and cmdline[0].startswith(title) and process.status() != psutil.STATUS_ZOMBIE:
                found.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


class BackgroundRun:
    """``run_experiment`` in a thread, so the test can inject faults while it runs."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.checkpoints = Path(data["tracking"]["checkpoints"])
        self.result: RunResult | None = None
        self.error: BaseException | None = None
        experiment = validate(data)
        self.thread = threading.Thread(target=self._target, args=(experiment,), daemon=True)
        self.thread.start()

    def _target(self, experiment: Any) -> None:
        try:
            self.result = run_experiment(experiment, show_progress=False)
        except BaseException as exc:  # handed to the test thread in finish()
            self.error = exc

    def checkpointed_round(self) -> int:
        """The last round checkpointed so far (0 before the first)."""
        files = list(self.checkpoints.glob("*/state.pt"))
        return int(load_checkpoint(files[0])["round"]) if files else 0

    @property
    def running(self) -> bool:
        return self.thread.is_alive()

    def finish(self) -> RunResult:
        self.thread.join(timeout=DEADLINE_S)
        assert not self.thread.is_alive(), "the run did not finish in time"
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result


def _assert_identical(left: dict[str, torch.Tensor], right: dict[str, torch.Tensor]) -> None:
    assert left.keys() == right.keys()
    for key in left:
        assert torch.equal(left[key], right[key]), key


@pytest.fixture(scope="module")
def unfaulted(local_ray: None, tmp_path_factory: pytest.TempPathFactory) -> RunResult:
    """The reference: the long-round experiment run without any fault."""
    return run_experiment(validate(_long_rounds(_tracking_in(tmp_path_factory.mktemp("ref")))), show_progress=False)


def test_killed_client_worker_is_replaced_and_parameters_are_unchanged(
    unfaulted: RunResult, tracking: dict[str, Any]
) -> None:
    run = BackgroundRun(_long_rounds(tracking))

    def busy_worker() -> psutil.Process | None:
        if not run.running:
            pytest.fail("the run ended before a worker could be killed mid-round")
        if run.checkpointed_round() < 1:
            return None
        busy = _ray_processes("ray::ClientWorker.run")
        return busy[0] if busy else None

    victim = wait_for(busy_worker, "a client worker executing a chunk after round 1", timeout=DEADLINE_S, every=0.01)
    os.kill(victim.pid, signal.SIGKILL)
    killed_in_round = run.checkpointed_round() + 1
    result = run.finish()

    assert killed_in_round < 6, "the kill must land before the last round"
    # is_running compares the process's start time too: a Ray process started since may hold the same pid
    # (pid_max is 32768 on many machines), where pid_exists would say the killed worker still lives
    assert not victim.is_running() or victim.status() == psutil.STATUS_ZOMBIE
    assert result.history[-1]["workers_replaced"] >= 1
    assert [row["workers_replaced"] for row in result.history[: killed_in_round - 1]] == [0] * (killed_in_round - 1)
    assert all(row["accepted"] == 40 for row in result.history)
    logged = MlflowClient(tracking_uri=tracking["uri"]).get_metric_history(result.run_id, "workers_replaced")
    assert max(metric.value for metric in logged) >= 1
    _assert_identical(result.params, unfaulted.params)


def test_killed_aggregator_is_restarted_and_parameters_are_unchanged(
    unfaulted: RunResult, tracking: dict[str, Any]
) -> None:
    run = BackgroundRun(_long_rounds(tracking))

    def aggregator_after_round_one() -> psutil.Process | None:
        if not run.running:
            pytest.fail("the run ended before the aggregator could be killed")
        found = _ray_processes("ray::Aggregator") if run.checkpointed_round() >= 1 else []
        return found[0] if found else None

    victim = wait_for(aggregator_after_round_one, "the aggregator after round 1", timeout=DEADLINE_S, every=0.01)
    os.kill(victim.pid, signal.SIGKILL)
    killed_after = run.checkpointed_round()

    def restarted() -> bool:
        return any(process.pid != victim.pid for process in _ray_processes("ray::Aggregator")) or not run.running

    wait_for(restarted, "a restarted aggregator", timeout=DEADLINE_S, every=0.01)
    result = run.finish()

    assert killed_after < 6, "the kill must land before the last round"
    assert [row["round"] for row in result.history] == [1, 2, 3, 4, 5, 6]
    assert all(row["accepted"] == 40 for row in result.history)
    assert result.history[-1]["workers_replaced"] == 0
    _assert_identical(result.params, unfaulted.params)


def _expected_behaviour(data: dict[str, Any], rounds: int) -> list[dict[str, dict[str, int]]]:
    """Per round and group, the dropped / late / faulty-and-active counts the seed implies.

    Each sampled client draws three uniforms from its own behaviour stream: dropout, the straggler
    delay (exponential, by inversion) and whether it sends a faulty update.
    """
    experiment = validate(data)
    bounds = group_bounds(experiment)
    timeout = experiment.sampling.round_timeout_s
    expected = []
    for round_index in range(rounds):
        sampled = sample_clients(experiment, round_index)
        per_group = {}
        for g, group in enumerate(experiment.clients):
            members = sampled[(sampled >= bounds[g]) & (sampled < bounds[g + 1])]
            counts = {"sampled": len(members), "dropped": 0, "late": 0, "faulty": 0}
            for client in members:
                u = client_rng(experiment.seed, round_index, int(client), STREAM_BEHAVIOUR).random(3)
                if u[0] < group.dropout:
                    counts["dropped"] += 1
                    continue
                delay = -group.straggler_delay_s * math.log1p(-u[1])
                if timeout is not None and delay > timeout:
                    counts["late"] += 1
                elif u[2] < group.faults.fraction:
                    counts["faulty"] += 1
            per_group[group.group] = counts
        expected.append(per_group)
    return expected


def test_dropouts_and_stragglers_are_counted_as_the_seed_implies(local_ray: None, tracking: dict[str, Any]) -> None:
    data = small_experiment(tracking, rounds=4)
    data["clients"] = [
        {"group": "a", "count": 30, "batch_size": 8, "dropout": 0.2, "straggler_delay_s": 1.0},
        {
            "group": "b",
            "count": 30,
            "batch_size": 8,
            "dropout": 0.2,
            "straggler_delay_s": 1.0,
            "faults": {"fraction": 0.2, "kind": "nan"},
        },
    ]
    data["sampling"] = {"clients_per_round": 50, "round_timeout_s": 1.5}
    result = run_experiment(validate(data), show_progress=False)
    expected = _expected_behaviour(data, 4)

    totals = {"dropped": 0, "late": 0, "rejected": 0}
    for row, wanted in zip(result.history, expected, strict=True):
        assert row["sampled"] == 50
        assert row["sampled"] == row["accepted"] + row["dropped"] + row["late"] + row["rejected"], row
        for name, counts in wanted.items():
            prefix = f"clients/{name}/"
            assert row[prefix + "sampled"] == counts["sampled"]
            assert row[prefix + "dropped"] == counts["dropped"]
            assert row[prefix + "late"] == counts["late"]
            assert row[prefix + "rejected_non_finite"] == counts["faulty"]
            assert row[prefix + "accepted"] == counts["sampled"] - counts["dropped"] - counts["late"] - counts["faulty"]
        for key in totals:
            totals[key] += int(row[key])
    assert totals["dropped"] > 0 and totals["late"] > 0 and totals["rejected"] > 0, totals
    assert all(torch.isfinite(value).all() for value in result.params.values())

    client = MlflowClient(tracking_uri=tracking["uri"])
    # MLflow orders a metric's history by the wall-clock time it was queued: compare it by step
    logged = sorted((metric.step, metric.value) for metric in client.get_metric_history(result.run_id, "late"))
    assert logged == [(row["round"], row["late"]) for row in result.history]
    assert result.final_accuracy > 0.3  # chance is 0.1: the accepted updates still train the model


def _faulty_groups(tracking: dict[str, Any]) -> dict[str, Any]:
    """A clean group and one group per fault kind; updates above max_update_norm are rejected."""
    data = small_experiment(tracking, rounds=2)
    data["clients"] = [{"group": "clean", "count": 12, "batch_size": 8}] + [
        {"group": kind, "count": 12, "batch_size": 8, "faults": {"fraction": 0.4, "kind": kind}} for kind in KINDS
    ]
    data["algorithm"] = {"name": "fedsgd", "lr": 0.5, "max_update_norm": 1000.0}
    return data


def test_invalid_updates_of_every_kind_are_rejected_and_counted(local_ray: None, tracking: dict[str, Any]) -> None:
    data = _faulty_groups(tracking)
    result = run_experiment(validate(data), show_progress=False)
    expected = _expected_behaviour(data, 2)

    injected = 0
    for row, wanted in zip(result.history, expected, strict=True):
        assert row["sampled"] == 72
        for name, counts in wanted.items():
            prefix = f"clients/{name}/"
            reasons = {reason: row[f"{prefix}rejected_{reason}"] for reason in ("non_finite", "shape", "dtype", "norm")}
            if name == "clean":
                assert reasons == dict.fromkeys(reasons, 0)
                assert row[prefix + "accepted"] == 12
                continue
            assert reasons[REASON[name]] == counts["faulty"], (name, reasons)
            assert sum(reasons.values()) == counts["faulty"], (name, reasons)
            assert row[prefix + "accepted"] == 12 - counts["faulty"]
            injected += counts["faulty"]
        assert row["rejected"] == sum(counts["faulty"] for counts in wanted.values())
        assert row["accepted"] == 72 - row["rejected"]
    assert injected >= 10, "the seed must inject a fair number of faults for the test to mean something"
    for key, value in result.params.items():
        assert torch.isfinite(value).all(), key
        assert value.abs().max() < 10, key  # one 1e6-scaled update in the mean would show here
    assert result.final_accuracy > 0.2  # chance is 0.1 after two FedSGD rounds of the accepted updates


def _chunk_sum(data: dict[str, Any], group: int, clients: np.ndarray) -> tuple[Any, Any]:
    experiment = validate(data)
    prepared = prepare_data(experiment)
    dataset = prepared.dataset
    context = SimulationContext.build(
        experiment, dataset.train_x, dataset.train_y, prepared.partition, dataset.num_classes
    )
    params = initial_params(experiment, dataset)
    task = ChunkTask(index=0, round=0, group=group, clients=clients, audited=np.empty(0, dtype=np.int64))
    return simulate_chunk(context, params, task)


def test_rejected_updates_never_reach_the_sum(tracking: dict[str, Any]) -> None:
    """Without Ray: a chunk's weighted sum is the same whatever the faulty clients sent, and equals the clean sum."""
    data = _faulty_groups(tracking)
    experiment = validate(data)
    group = 1 + KINDS.index("nan")
    first = int(group_bounds(experiment)[group])
    clients = np.arange(first, first + 12, dtype=np.int64)
    faulty = np.array(
        [client_rng(experiment.seed, 0, int(c), STREAM_BEHAVIOUR).random(3)[2] < 0.4 for c in clients], dtype=bool
    )
    assert 0 < faulty.sum() < 12
    sums = {}
    for kind in KINDS:
        data["clients"][group]["faults"]["kind"] = kind
        summary, payload = _chunk_sum(data, group, clients)
        assert summary.accepted == 12 - faulty.sum()
        assert payload.weighted_sum is not None
        sums[kind] = (payload.weighted_sum, payload.weight)
    for kind in KINDS[1:]:
        _assert_identical(sums[kind][0], sums["nan"][0])
        assert sums[kind][1] == sums["nan"][1]

    data["clients"][group]["faults"] = {"fraction": 0.0, "kind": "nan"}
    summary, clean = _chunk_sum(data, group, clients[~faulty])
    assert summary.accepted == 12 - faulty.sum()
    assert clean.weight == sums["nan"][1]
    assert clean.weighted_sum is not None
    for key, value in clean.weighted_sum.items():
        torch.testing.assert_close(sums["nan"][0][key], value, rtol=1e-5, atol=1e-6)


def test_too_few_accepted_updates_abort_the_run(local_ray: None, tracking: dict[str, Any]) -> None:
    data = small_experiment(tracking, rounds=3)
    for group in data["clients"]:
        group["dropout"] = 0.5
    data["sampling"] = {"min_clients": 35}
    expected = _expected_behaviour(data, 1)[0]
    accepted = sum(counts["sampled"] - counts["dropped"] for counts in expected.values())
    assert accepted < 35
    with pytest.raises(RunAborted, match=rf"round 1: only {accepted} updates accepted.*min_clients=35"):
        run_experiment(validate(data), show_progress=False)
    client = MlflowClient(tracking_uri=tracking["uri"])
    experiment = client.get_experiment_by_name("test")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    assert [run.info.status for run in runs] == ["FAILED"]
    assert not list(Path(tracking["checkpoints"]).glob("*/state.pt"))
