"""``AuditedStrategy``: a Flower strategy (Message API) whose training replies are audited before aggregation.

It wraps any ``flwr.serverapp.strategy.Strategy``: ``configure_train`` remembers the global arrays each round
sends, and ``aggregate_train`` hands the sampled replies to ``FlowerAuditor`` (the engine's attacks, scoring and
MLflow logging) before the wrapped strategy aggregates them. The audits run in the ServerApp's process, between
Flower's rounds; Flower's simulation runs the ClientApps in its own Ray session, which the audit never joins.

What the server must be given (the threat model's public facts): the model, the clients' loss, learning rate and
batch size (the topology), and per reply its ``num-examples`` (Flower's weighting key) and, for several local
steps, ``local-steps`` in the reply's MetricRecord. A reply that is not an update of the global model's arrays
is not attacked, counted with its reason, and left out of the aggregation (``reject_malformed``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from testbed.config.schema import Experiment
from testbed.integrations.flower.auditor import FlowerAuditor, Reply, RoundAudit
from testbed.integrations.flower.mod import GROUND_TRUTH_KEY

METRIC_KEYS = {"num_samples": "num-examples", "local_steps": "local-steps", "batch_size": "batch-size"}
"""Reply MetricRecord keys the audit reads: Flower's weighting key, the local steps and the batch size."""


class AuditedStrategy(Strategy):
    """``strategy`` with the testbed's audit of its training replies (see the module docstring).

    ``topology``: the testbed topology of the federation (a file, a mapping or an Experiment; its ``attack`` block
    chooses the portfolio, ``attack.audit.every`` and ``clients_per_round`` how many replies are attacked);
    ``sent``: what the clients' ArrayRecord holds (``weights`` after local training, Flower's convention, or
    ``delta`` / ``gradient``). ``audits`` keeps each audited round's ``RoundAudit``.
    """

    def __init__(
        self,
        strategy: Strategy,
        topology: Experiment | Mapping[str, Any] | str | Path,
        *,
        sent: str = "weights",
        run_name: str | None = None,
        reject_malformed: bool = True,
    ) -> None:
        self.strategy = strategy
        self.auditor = FlowerAuditor(topology, run_name=run_name)
        self.sent = sent
        self.reject_malformed = reject_malformed
        self.audits: list[RoundAudit] = []
        self._global: dict[int, dict[str, np.ndarray]] = {}

    @property
    def run_id(self) -> str:
        """The MLflow run the audits log to."""
        return self.auditor.run_id

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The wrapped strategy's messages; the global arrays are kept for this round's audit."""
        self._global[server_round] = {name: array.numpy() for name, array in arrays.items()}
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Audit the round's sampled replies, then let the wrapped strategy aggregate the well-formed ones."""
        received = list(replies)
        truth = {id(message): _pop_truth(message) for message in received}
        start = self._global.pop(server_round, None)
        audit = self.auditor.experiment.attack.audit if self.auditor.experiment.attack is not None else None
        if start is None or audit is None or (server_round - 1) % audit.every:
            return self.strategy.aggregate_train(server_round, received)
        good = [message for message in received if not message.has_error()]
        rejected: dict[int, tuple[int, str]] = {}  # position in good -> (client, reason)
        formed: list[tuple[int, Reply]] = []
        for index, message in enumerate(good):
            reply, reason = self._reply(message, truth[id(message)], index)
            if reply is not None:
                reason = self.auditor.why_not(reply, start)
            if reason is not None:
                rejected[index] = (reply.client if reply is not None else index, reason)
            elif reply is not None:
                formed.append((index, reply))
        chosen = self._sample(server_round, formed, audit.clients_per_round)
        found = self.auditor.audit_round(
            server_round, start, [reply for _, reply in chosen], rejected=list(rejected.values())
        )
        self.audits.append(found)
        if self.reject_malformed and rejected:
            kept = [message for index, message in enumerate(good) if index not in rejected]
            received = kept + [message for message in received if message.has_error()]
        return self.strategy.aggregate_train(server_round, received)

    def _reply(self, message: Message, truth: ConfigRecord | None, index: int) -> tuple[Reply | None, str | None]:
        """The message as a Reply, or (None, why it cannot be one)."""
        content = message.content
        arrays = list(content.array_records.values())
        metrics = list(content.metric_records.values())
        if len(arrays) != 1 or len(metrics) != 1:
            return None, f"a reply holds {len(arrays)} ArrayRecords and {len(metrics)} MetricRecords, not one of each"
        values = dict(metrics[0])
        if METRIC_KEYS["num_samples"] not in values:
            return None, f"the reply's MetricRecord lacks {METRIC_KEYS['num_samples']!r}"
        experiment = self.auditor.experiment
        try:
            node = int(message.metadata.src_node_id)
            client = int(truth["partition-id"]) if truth is not None and "partition-id" in truth else node  # type: ignore[arg-type]
            indices = np.asarray(truth["sample-indices"], dtype=np.int64) if truth is not None else None
            counts = {
                key: _count(values.get(METRIC_KEYS[key], default))
                for key, default in (
                    ("num_samples", None),
                    ("batch_size", experiment.clients[0].batch_size),
                    ("local_steps", 1),
                )
            }
            arrays_sent = {name: array.numpy() for name, array in arrays[0].items()}
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            return None, f"the reply's records cannot be read: {type(exc).__name__}: {exc}"
        del index
        return (
            Reply(
                client=client,
                arrays=arrays_sent,
                num_samples=counts["num_samples"],
                batch_size=counts["batch_size"],
                local_steps=counts["local_steps"],
                sent=self.sent,  # type: ignore[arg-type]
                sample_indices=indices,
            ),
            None,
        )

    def _sample(self, server_round: int, formed: list[tuple[int, Reply]], count: int) -> list[tuple[int, Reply]]:
        """``count`` of the round's replies, drawn from the topology's seed and the round (all when fewer)."""
        if len(formed) <= count:
            return formed
        rng = np.random.default_rng([self.auditor.experiment.seed, server_round])
        picked = sorted(rng.choice(len(formed), size=count, replace=False).tolist())
        return [formed[i] for i in picked]

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The wrapped strategy's evaluation messages."""
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """The wrapped strategy's evaluation aggregate."""
        return self.strategy.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        """The wrapped strategy's summary."""
        self.strategy.summary()

    def start(self, grid: Grid, initial_arrays: ArrayRecord, *args: Any, **kwargs: Any) -> Any:
        """Flower's round loop over this strategy; the audit run is closed when it ends (FAILED if it raised)."""
        status = "FAILED"
        try:
            result = super().start(grid, initial_arrays, *args, **kwargs)
            status = "FINISHED"
            return result
        finally:
            self.auditor.close(status)


def _count(value: Any) -> int:
    """A whole, finite count from a MetricRecord value (ValueError for anything else)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        raise ValueError(f"{value!r} is not a whole number")
    return int(value)


def _pop_truth(message: Message) -> ConfigRecord | None:
    """Remove the simulation's ground truth from a reply (the wrapped strategy and the attacks never see it)."""
    if message.has_error():
        return None
    records = message.content.config_records
    if GROUND_TRUTH_KEY not in records:
        return None
    record = records[GROUND_TRUTH_KEY]
    del message.content[GROUND_TRUTH_KEY]
    return record
