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


def audit_candidates(experiment: Experiment, round_index: int, sampled: np.ndarray) -> np.ndarray:
    """The sampled clients an audited round may attack: those of ``attack.audit.groups`` (all by default);
    none on rounds that are not audited."""
    attack = experiment.attack
    if attack is None or round_index % attack.audit.every != 0:
        return np.empty(0, dtype=np.int64)
    if attack.audit.groups is None:
        return sampled
    return sampled[np.isin(client_groups(experiment, sampled), attack.audit.groups)]


def client_groups(experiment: Experiment, clients: np.ndarray) -> np.ndarray:
    """The group name of each global client id."""
    names = np.array([group.group for group in experiment.clients], dtype=object)
    return names[np.searchsorted(group_bounds(experiment), clients, side="right") - 1]


def audited_clients(
    experiment: Experiment, round_index: int, sampled: np.ndarray, settled: frozenset[str] = frozenset()
) -> np.ndarray:
    """Sorted ids of the sampled clients whose raw updates the attack sees this round.

    ``attack.audit.clients_per_round`` of the candidates, drawn with the round's seed. With
    ``target_half_width``: up to ``max_clients_per_round`` of the candidates outside ``settled`` (the groups
    whose interval in this window already meets the target, as decided from the audits logged so far).
    """
    attack = experiment.attack
    eligible = audit_candidates(experiment, round_index, sampled)
    if attack is None or not len(eligible):
        return np.empty(0, dtype=np.int64)
    count = attack.audit.clients_per_round
    if attack.audit.target_half_width is not None:
        eligible = eligible[~np.isin(client_groups(experiment, eligible), sorted(settled))]
        count = attack.audit.max_clients_per_round
    count = min(count, len(eligible))
    rng = np.random.default_rng([experiment.seed, round_index, STREAM_AUDIT])
    return np.sort(rng.choice(eligible, size=count, replace=False)).astype(np.int64)


def optimisation_pool(experiment: Experiment, round_index: int) -> np.ndarray:
    """The clients the optimisation cap draws from: the round's audited clients, or with
    ``target_half_width`` (where which groups are audited depends on earlier audits) its candidates."""
    sampled = sample_clients(experiment, round_index)
    if experiment.attack is not None and experiment.attack.audit.target_half_width is not None:
        return audit_candidates(experiment, round_index, sampled)
    return audited_clients(experiment, round_index, sampled)


def optimisation_clients(experiment: Experiment, round_index: int, cap: int) -> set[int]:
    """The clients of a round that the optimisation attacks may run on: all of ``optimisation_pool`` up to
    ``cap``, else ``cap`` drawn from the round's own stream (a pure function of the experiment and the round).
    With ``target_half_width`` some of them may not be audited, so fewer than ``cap`` can run."""
    pool = optimisation_pool(experiment, round_index)
    if len(pool) <= cap:
        return {int(client) for client in pool}
    rng = np.random.default_rng([experiment.seed, round_index, STREAM_OPTIMISATION])
    return {int(client) for client in rng.choice(pool, size=cap, replace=False)}


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
