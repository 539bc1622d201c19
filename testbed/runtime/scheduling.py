"""Which clients take part in a round, which of them are audited, and how they are cut into chunks.

All of it is a pure function of (experiment, round): the same seed gives the same plan whatever the
number of workers, which is what makes runs with 1 and N workers bit-identical.
"""

from __future__ import annotations

import numpy as np

from testbed.config.schema import Experiment
from testbed.runtime.records import ChunkTask

STREAM_SAMPLING = 101
STREAM_AUDIT = 102
STREAM_OPTIMISATION = 103


def group_bounds(experiment: Experiment) -> np.ndarray:
    """First global client id of each group, plus the total (groups own contiguous id ranges)."""
    return np.concatenate([[0], np.cumsum([group.count for group in experiment.clients])]).astype(np.int64)


def sample_clients(experiment: Experiment, round_index: int) -> np.ndarray:
    """Sorted global ids of the clients sampled in a round."""
    total = experiment.total_clients
    per_round = experiment.sampling.clients_per_round
    if per_round is None or per_round >= total:
        return np.arange(total, dtype=np.int64)
    rng = np.random.default_rng([experiment.seed, round_index, STREAM_SAMPLING])
    return np.sort(rng.choice(total, size=per_round, replace=False)).astype(np.int64)


def audited_clients(experiment: Experiment, round_index: int, sampled: np.ndarray) -> np.ndarray:
    """Sorted ids of the sampled clients whose raw updates the attack sees this round."""
    attack = experiment.attack
    if attack is None or round_index % attack.audit.every != 0:
        return np.empty(0, dtype=np.int64)
    bounds = group_bounds(experiment)
    eligible = sampled
    if attack.audit.groups is not None:
        names = [group.group for group in experiment.clients]
        keep = np.zeros(len(sampled), dtype=bool)
        for name in attack.audit.groups:
            g = names.index(name)
            keep |= (sampled >= bounds[g]) & (sampled < bounds[g + 1])
        eligible = sampled[keep]
    count = min(attack.audit.clients_per_round, len(eligible))
    rng = np.random.default_rng([experiment.seed, round_index, STREAM_AUDIT])
    return np.sort(rng.choice(eligible, size=count, replace=False)).astype(np.int64)


def optimisation_clients(experiment: Experiment, round_index: int, cap: int) -> set[int]:
    """The audited clients of a round that the optimisation attacks run on: all of them up to ``cap``, else
    ``cap`` drawn from the round's own stream (a pure function of the experiment and the round)."""
    audited = audited_clients(experiment, round_index, sample_clients(experiment, round_index))
    if len(audited) <= cap:
        return {int(client) for client in audited}
    rng = np.random.default_rng([experiment.seed, round_index, STREAM_OPTIMISATION])
    return {int(client) for client in rng.choice(audited, size=cap, replace=False)}


def make_tasks(experiment: Experiment, round_index: int, sampled: np.ndarray, audited: np.ndarray) -> list[ChunkTask]:
    """Cut each group's sampled clients into chunks of ``resources.chunk_size``, in a fixed order."""
    bounds = group_bounds(experiment)
    size = experiment.resources.chunk_size
    tasks: list[ChunkTask] = []
    for g in range(len(experiment.clients)):
        members = sampled[(sampled >= bounds[g]) & (sampled < bounds[g + 1])]
        for start in range(0, len(members), size):
            clients = members[start : start + size]
            tasks.append(
                ChunkTask(
                    index=len(tasks),
                    round=round_index,
                    group=g,
                    clients=clients,
                    audited=np.intersect1d(clients, audited),
                )
            )
    return tasks
