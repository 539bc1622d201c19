"""The aggregation tree of a run: a root aggregator, optionally fed by edge aggregators.

In a flat topology every chunk payload goes to the root. With edges, each edge combines the payloads
of the groups it serves and forwards one payload to the root, so an attacker at an edge sees single
clients' updates while an attacker at the root sees only edge aggregates.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from testbed.config.schema import Experiment
from testbed.runtime.aggregation import Aggregator
from testbed.runtime.records import ChunkSummary, Params


@dataclass
class AggregationTree:
    """The root and edge aggregator actors of a run, and which edge serves which group."""

    root: Any
    edges: dict[str, Any]
    edge_ids: dict[str, int]
    edge_of_group: dict[str, str]
    root_sees_edges: bool

    def aggregate(
        self,
        params_ref: Any,
        summaries: Sequence[ChunkSummary],
        payload_refs: Sequence[Any],
        audited_refs: Sequence[Any] = (),
    ) -> tuple[Params, list[Any]]:
        """One round's aggregation through the tree: new global parameters and pending audit references.

        ``audited_refs`` (one per chunk with audited clients, in chunk order) travel inside a list, so
        Ray passes them on as references: the aggregator hands them to its attack actors unread.
        """
        import ray

        if not self.edges:
            new_params, _, refs = ray.get(self.root.aggregate.remote(params_ref, list(audited_refs), *payload_refs))
            return new_params, list(refs)
        by_edge: dict[str, list[Any]] = defaultdict(list)
        audited_by_edge: dict[str, list[Any]] = defaultdict(list)
        pending = iter(audited_refs)
        for summary, ref in zip(summaries, payload_refs, strict=True):
            by_edge[self.edge_of_group[summary.group]].append(ref)
            if summary.ground_truth:
                audited_by_edge[self.edge_of_group[summary.group]].append(next(pending))
        forwarded, edge_refs = [], []
        for name, actor in self.edges.items():
            if by_edge[name]:
                payload_ref, audit_ref = actor.forward.options(num_returns=2).remote(
                    params_ref, audited_by_edge[name], *by_edge[name]
                )
                forwarded.append(payload_ref)
                edge_refs.append(audit_ref)
        new_params, _, refs = ray.get(self.root.aggregate.remote(params_ref, [], *forwarded))
        audits = list(refs)
        for pending in ray.get(edge_refs):
            audits.extend(pending)
        return new_params, audits

    def shutdown(self) -> None:
        """Stop the aggregator actors (a sweep's later runs must not share them)."""
        import ray

        for actor in [self.root, *self.edges.values()]:
            ray.kill(actor)

    def ground_truth(self, summaries: Sequence[ChunkSummary]) -> dict[int, np.ndarray]:
        """Sample indices behind every audited update: clients by id, edge aggregates by -(edge id + 1)."""
        truth: dict[int, np.ndarray] = {}
        behind_edge: dict[str, list[np.ndarray]] = defaultdict(list)
        for summary in summaries:
            for client, indices in summary.ground_truth.items():
                truth[client] = indices
                behind_edge[self.edge_of_group.get(summary.group, "root")].append(indices)
        if self.root_sees_edges:
            for name, parts in behind_edge.items():
                if name in self.edge_ids and parts:
                    truth[-(self.edge_ids[name] + 1)] = np.concatenate(parts)
        return truth


def build_tree(experiment: Experiment, attack_workers: Sequence[str]) -> AggregationTree:
    """Start the aggregator actors the experiment describes; the named attack actors serve the attacking ones."""
    import ray

    positions = experiment.attack.positions if experiment.attack is not None else []
    resources = experiment.resources.aggregator
    actor = ray.remote(num_cpus=resources.num_cpus, num_gpus=resources.num_gpus, max_restarts=-1, max_task_retries=-1)(
        Aggregator
    )
    root_attacks = "root" in positions
    edges, edge_ids, edge_of_group = {}, {}, {}
    for index, edge in enumerate(experiment.aggregators):
        workers = list(attack_workers) if edge.name in positions else []
        edges[edge.name] = actor.remote(
            experiment.algorithm, workers, edge.name, edge_id=index, expose_mean=root_attacks
        )
        edge_ids[edge.name] = index
        for group in edge.groups:
            edge_of_group[group] = edge.name
    root = actor.remote(experiment.algorithm, list(attack_workers) if root_attacks else [], "root")
    return AggregationTree(root, edges, edge_ids, edge_of_group, root_sees_edges=root_attacks and bool(edges))
