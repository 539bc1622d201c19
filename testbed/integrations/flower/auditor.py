"""The audit of updates that arrive from outside the engine: one round's client replies, attacked and scored.

``FlowerAuditor`` runs the engine's audit path on replies that a framework such as Flower hands over: the
attacker view is built from each reply and the global model it was trained from (``testbed.audit.outcome``), the
attack portfolio runs in this process (``AttackWorker``, the class the engine's attack actors run), the scorer
joins the reconstructions with the samples the client trained on when a simulation provides them
(``score_outcomes``, with the no-information baselines from the test split), and ``LeakageLog`` logs
``leakage/<group>/...`` per round to MLflow as ``testbed run`` does. It imports nothing from Flower: the Flower
wrapper (``testbed.integrations.flower.strategy``) turns messages into ``Reply`` objects.

A reply that is not an update of the global model (other array names, other shapes, non-finite values) is not
attacked; it is counted, with its reason, in ``audit/not_applicable`` and ``audits/not_applicable.json``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from testbed.audit.outcome import AuditOutcome
from testbed.config.schema import Experiment
from testbed.data.datasets import Dataset
from testbed.errors import UserError
from testbed.runtime.records import ClientUpdate

log = logging.getLogger(__name__)

Sent = Literal["weights", "delta", "gradient"]
SENT_KINDS: tuple[str, ...] = ("weights", "delta", "gradient")


@dataclass(frozen=True)
class Reply:
    """One client's training reply as the server received it.

    ``arrays``: what the client sent, by parameter name: its locally trained weights (``sent="weights"``, what
    Flower's strategies aggregate), the weight change, or the batch gradient. ``num_samples``, ``batch_size`` and
    ``local_steps`` are the public hyper-parameters the threat model gives the server (from the reply's metrics).
    ``sample_indices``: the training-set positions of the samples the client trained on, in the order it used
    them; only a simulation has them, and only the scorer reads them (never the attacks).
    """

    client: int
    arrays: Mapping[str, np.ndarray]
    num_samples: int
    batch_size: int
    local_steps: int = 1
    sent: Sent = "weights"
    sample_indices: np.ndarray | None = None


@dataclass
class RoundAudit:
    """What the audit of one round found: attacked replies, those left out (with reasons) and the leakage."""

    round: int
    attacked: list[int] = field(default_factory=list)
    not_applicable: list[tuple[int, str]] = field(default_factory=list)
    recovered: dict[int, int] = field(default_factory=dict)  # client -> samples recovered (scored rounds only)
    samples: dict[int, int] = field(default_factory=dict)  # client -> samples behind its update
    scored: bool = False
    outcomes: list[AuditOutcome] = field(default_factory=list)
    global_arrays: dict[str, np.ndarray] = field(default_factory=dict)  # the model the replies were trained from
    replies: list[Reply] = field(default_factory=list)  # the attacked replies

    @property
    def recovered_fraction(self) -> float | None:
        """Recovered samples over the attacked replies' samples (None without ground truth or attacked replies)."""
        total = sum(self.samples.values())
        return sum(self.recovered.values()) / total if self.scored and total else None


def load_topology(topology: Experiment | Mapping[str, Any] | str | Path) -> Experiment:
    """The testbed topology describing the audited federation (model, data, algorithm, clients' loss, attack,
    tracking): an Experiment, a mapping validated as one, or a topology file."""
    if isinstance(topology, Experiment):
        return topology
    if isinstance(topology, (str, Path)):
        from testbed.config.load import load_experiment

        return load_experiment(topology)
    from testbed.config.topology import validate

    return validate(dict(topology), source="flower audit topology")


def _mismatch(arrays: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> str | None:
    """Why ``arrays`` is not an update of ``reference``'s arrays (names, shapes, finiteness); None when it is."""
    missing = [name for name in reference if name not in arrays]
    if missing:
        return f"the reply lacks the global model's array {missing[0]!r}"
    extra = [name for name in arrays if name not in reference]
    if extra:
        return f"the reply holds an array the global model does not: {extra[0]!r}"
    for name, value in arrays.items():
        if tuple(np.shape(value)) != tuple(np.shape(reference[name])):
            return (
                f"array {name!r} has shape {tuple(np.shape(value))}, the global model's {tuple(reference[name].shape)}"
            )
        array = np.asarray(value)
        if not np.issubdtype(array.dtype, np.number):
            return f"array {name!r} is not numeric ({array.dtype})"
        if not np.isfinite(array).all():
            return f"array {name!r} holds NaN or Inf"
    return None


class FlowerAuditor:
    """Attacks each round's replies with the topology's portfolio and logs their leakage to an MLflow run.

    ``topology`` names the model (its parameter names must be the global arrays' names), the data set and
    partition the clients train on (for scoring), the algorithm (``fedsgd``: one local step, attacked as the
    batch gradient; ``fedavg``: the weight change over the reply's local steps) with the clients' learning rate,
    one client group (batch size, loss), the ``attack`` block (default ``auto``) and ``tracking``. Audits run in
    this process, one round after the other.
    """

    def __init__(self, topology: Experiment | Mapping[str, Any] | str | Path, *, run_name: str | None = None) -> None:
        from testbed.audit.attack_worker import AttackWorker
        from testbed.audit.leakage import LeakageLog
        from testbed.config.flat import flatten
        from testbed.runtime.preparation import prepare_data
        from testbed.tracking.store import Tracker

        experiment = load_topology(topology).model_copy(deep=True)
        attack = experiment.attack
        if attack is None:
            raise UserError("attack: the audited topology needs an attack block (attack: {name: auto})")
        if len(experiment.clients) != 1:
            raise UserError("clients: the audited topology describes one client group (the Flower clients)")
        # the attacks run in this (the server's) process: never lower its priority
        experiment.resources.attack.nice = 0
        # the strategy chose the audited replies (attack.audit.clients_per_round): every attack runs on each
        attack.audit.optimisation_per_round = experiment.total_clients
        self.experiment = experiment
        self.group = experiment.clients[0].group
        prepared = prepare_data(experiment)
        self.dataset: Dataset = prepared.dataset
        self.partition = prepared.partition
        self.worker = AttackWorker(experiment, self.dataset.input_shape, self.dataset.num_classes)
        self.names = [name for name, _ in self.worker.model.named_parameters()]
        self.tracker = Tracker.for_experiment(experiment)
        self.run_id = self.tracker.start_run(
            run_name or f"{experiment.name}-flower",
            flatten(experiment.model_dump(mode="json")),
            tags={"testbed.integration": "flower"},
        )
        self.leakage = LeakageLog(self.dataset, self.tracker, self.run_id, attack.names)
        self.baselines = self._baselines()
        self.unscored_rounds = 0

    def _baselines(self) -> Any:
        from metrics.baselines import BaselineCache, ClassPrototypes

        held_out = ClassPrototypes(self.dataset.test_x, self.dataset.test_y)
        return BaselineCache(held_out, self.dataset.train_x, self.dataset.train_y, self.experiment.seed)

    def client_indices(self, partition_id: int) -> np.ndarray:
        """The training-set positions of client ``partition_id``'s samples under the topology's partition."""
        if not 0 <= partition_id < self.partition.num_clients:
            raise UserError(f"partition id {partition_id}: the topology has {self.partition.num_clients} clients")
        return self.partition.client(partition_id)

    def _update(self, reply: Reply, global_arrays: Mapping[str, np.ndarray], round_index: int) -> ClientUpdate:
        """The reply as the engine's ClientUpdate: the gradient (fedsgd) or the weight change (fedavg)."""
        lr = self.experiment.algorithm.lr
        fedsgd = self.experiment.algorithm.name == "fedsgd"
        update: dict[str, torch.Tensor] = {}
        for name in self.names:
            sent = torch.as_tensor(np.asarray(reply.arrays[name], dtype=np.float64))
            start = torch.as_tensor(np.asarray(global_arrays[name], dtype=np.float64))
            if reply.sent == "gradient":
                value = sent if fedsgd else -lr * sent
            else:
                delta = sent - start if reply.sent == "weights" else sent
                value = -delta / lr if fedsgd else delta
            update[name] = value.to(torch.float32)
        return ClientUpdate(
            client=reply.client,
            group=self.group,
            round=round_index,
            update=update,
            num_samples=reply.num_samples,
            batch_size=reply.batch_size,
            local_steps=max(1, reply.local_steps),
            labels=None,
        )

    def why_not(self, reply: Reply, global_arrays: Mapping[str, np.ndarray]) -> str | None:
        """Why a reply cannot be attacked as an update of the global model (None when it can)."""
        lacking = [name for name in self.names if name not in global_arrays]
        if lacking:
            return f"the global model lacks the topology model's parameter {lacking[0]!r}"
        reference = {name: np.asarray(value) for name, value in global_arrays.items()}
        if reply.sent not in SENT_KINDS:
            return f"update kind {reply.sent!r} is not one of {', '.join(SENT_KINDS)}"
        if self.experiment.algorithm.name == "fedsgd" and reply.local_steps > 1:
            return f"fedsgd audits one local step; the reply reports {reply.local_steps}"
        if reply.num_samples < 1 or reply.batch_size < 1 or reply.local_steps < 1:
            return (
                f"num_samples {reply.num_samples}, batch_size {reply.batch_size} and local_steps {reply.local_steps} "
                "must be at least 1"
            )
        if reply.num_samples > reply.local_steps * reply.batch_size:
            return (
                f"num_samples {reply.num_samples} exceeds local_steps x batch_size ({reply.local_steps} x "
                f"{reply.batch_size}): report the samples trained on this round, not the data set's size"
            )
        if reply.sample_indices is not None:
            indices = np.asarray(reply.sample_indices)
            if indices.shape != (reply.num_samples,) or indices.min() < 0 or indices.max() >= len(self.dataset.train_y):
                return "the ground-truth sample indices do not match num_samples or the training split"
        return _mismatch(reply.arrays, reference)

    def audit_round(
        self,
        server_round: int,
        global_arrays: Mapping[str, np.ndarray],
        replies: Sequence[Reply],
        rejected: Sequence[tuple[int, str]] = (),
    ) -> RoundAudit:
        """Attack every reply of round ``server_round`` (1-based, as Flower counts) trained from ``global_arrays``;
        score and log the leakage when every attacked reply carries its sample indices. ``rejected``: (client,
        reason) of replies found malformed before (counted with the round's own)."""
        round_index = server_round - 1
        found = RoundAudit(
            server_round, global_arrays={name: np.asarray(value) for name, value in global_arrays.items()}
        )
        updates: list[ClientUpdate] = []
        truth: dict[int, np.ndarray] = {}
        for client, said in rejected:
            found.not_applicable.append((client, said))
            self.leakage.not_applicable.add(self.group, "audit", f"audit: {said}")
        for reply in replies:
            reason = self.why_not(reply, global_arrays)
            if reason is not None:
                found.not_applicable.append((reply.client, reason))
                self.leakage.not_applicable.add(self.group, "audit", f"audit: {reason}")
                continue
            updates.append(self._update(reply, global_arrays, round_index))
            found.attacked.append(reply.client)
            found.replies.append(reply)
            if reply.sample_indices is not None:
                truth[reply.client] = np.asarray(reply.sample_indices, dtype=np.int64)
        metrics = {"audit/rejected_replies": float(len(found.not_applicable))}
        if not updates:
            self.tracker.log_metrics(self.run_id, metrics, step=server_round)
            return found
        params = {
            name: torch.as_tensor(np.asarray(global_arrays[name], dtype=np.float32)).reshape(
                tuple(np.shape(global_arrays[name]))
            )
            for name in self.names
        }
        found.outcomes = self.worker.audit(params, updates, "root")
        if len(truth) == len(updates):
            self._score(found, truth, round_index)
        else:
            self._unscored(found, round_index)
        self.tracker.log_metrics(self.run_id, metrics, step=server_round)
        return found

    def _score(self, found: RoundAudit, truth: dict[int, np.ndarray], round_index: int) -> None:
        from testbed.audit.grid import GRID_MAX_CLIENTS
        from testbed.audit.scoring import score_outcomes

        scored = score_outcomes(
            found.outcomes,
            truth,
            self.dataset.train_x,
            self.dataset.train_y,
            round_index,
            GRID_MAX_CLIENTS,
            self.baselines,
        )
        cases = self.leakage.record(round_index, [scored])
        found.scored = True
        for case in cases:
            found.recovered[case.client.outcome.client] = int(case.client.flags.sum())
            found.samples[case.client.outcome.client] = len(case.client.sample_indices)

    def _unscored(self, found: RoundAudit, round_index: int) -> None:
        """Without ground truth: the reconstructions (an .npz per round) and the attacks' diagnostics, no scores."""
        self.unscored_rounds += 1
        metrics: dict[str, float] = {}
        arrays: dict[str, np.ndarray] = {}
        for outcome in found.outcomes:
            if outcome.reconstruction is None:
                if outcome.not_applicable:
                    self.leakage.not_applicable.add(outcome.group, outcome.attack, outcome.not_applicable)
                continue
            arrays[f"{outcome.attack}__client_{outcome.client}"] = outcome.reconstruction.images.numpy()
            for key, value in outcome.reconstruction.diagnostics.items():
                name = f"audit/{outcome.attack}/{key}"
                metrics[name] = metrics.get(name, 0.0) + float(value) / len(found.attacked)
        metrics["audit/unscored_updates"] = float(len(found.attacked))
        self.tracker.log_metrics(self.run_id, metrics, step=round_index + 1)
        if arrays:
            with self.tracker.staging() as folder:
                path = folder / f"reconstructions_round_{round_index + 1:04d}.npz"
                np.savez_compressed(path, allow_pickle=False, **arrays)
                self.tracker.log_file(self.run_id, path, "audits")

    def close(self, status: str = "FINISHED") -> None:
        """Store the audited samples and the not-applicable counts, say what the run could score, end the run."""
        try:
            self.leakage.finish()
            note = (
                f"Audited Flower replies with {self.experiment.attack.label if self.experiment.attack else '-'}."
                if not self.unscored_rounds
                else f"{self.unscored_rounds} audited rounds had no ground truth (no sample indices in the replies): "
                "their reconstructions and the attacks' diagnostics are logged, not their leakage."
            )
            self.tracker.set_note(self.run_id, note)
        finally:
            self.tracker.end_run(self.run_id, status)
