"""The curious aggregator's audits: attacker views of received updates, and the attack actor pool.

The aggregator turns each audited ``ClientUpdate`` into an ``AttackerView`` (model, global parameters,
update, public hyper-parameters; never the client's data) and hands it to an ``AttackWorker``. The
worker answers with ``AuditOutcome`` records that the driver later joins with its ground truth.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from attacks import AttackerView, AttackNotApplicable, Reconstruction, build_attack
from defenses import build_policy
from testbed.config import Experiment
from testbed.models import model_for
from testbed.records import ClientUpdate, Params


@dataclass
class AuditOutcome:
    """One attacked update: who it came from and what the attack made of it (or why it could not)."""

    client: int
    group: str
    round: int
    aggregator: str
    reconstruction: Reconstruction | None
    not_applicable: str | None = None
    seconds: float = 0.0


def attacker_view(
    update: ClientUpdate,
    global_params: Params,
    model: nn.Module,
    experiment: Experiment,
    input_shape: tuple[int, ...],
    num_classes: int,
    loss_name: str,
) -> AttackerView:
    """What the threat model lets the server know about one client's update (``loss_name``: its declared loss)."""
    labels = torch.as_tensor(update.labels) if update.labels is not None else None
    algorithm = experiment.algorithm
    return AttackerView(
        model=model,
        global_params=global_params,
        update={key: value.clone() for key, value in update.update.items()},  # received tensors are read-only
        kind="gradient" if algorithm.name == "fedsgd" else "delta",
        batch_size=update.batch_size,
        num_samples=update.num_samples,
        local_steps=update.local_steps,
        lr=algorithm.lr,
        loss=loss_name,
        input_shape=input_shape,
        num_classes=num_classes,
        labels=labels,
    )


class AttackWorker:
    """An actor that runs the configured attack on batches of attacker views (on its GPU when it has one)."""

    def __init__(self, experiment: Experiment, input_shape: tuple[int, ...], num_classes: int) -> None:
        assert experiment.attack is not None
        from testbed.scoring import lower_priority

        lower_priority(experiment.resources.attack.nice)
        torch.set_num_threads(max(1, int(experiment.resources.attack.num_cpus)))
        device = "cuda" if experiment.resources.attack.num_gpus > 0 and torch.cuda.is_available() else "cpu"
        self.experiment = experiment
        self.input_shape = tuple(input_shape)
        self.num_classes = num_classes
        self.model = model_for(experiment.model, input_shape, num_classes)
        self.attack = build_attack(experiment.attack.name, experiment.attack.params, device=device)
        self.losses = {group.group: build_policy(group.defence).loss.name for group in experiment.clients}
        for edge in experiment.aggregators:
            self.losses[f"{edge.name}-aggregate"] = self.losses[edge.groups[0]]

    def audit(
        self,
        global_params: Params,
        updates: Sequence[ClientUpdate],
        aggregator: str,
        references: Sequence[Any] = (),
    ) -> list[AuditOutcome]:
        """Attack every update ``aggregator`` received; where the attack does not apply, a one-line reason.

        ``references`` are object references to lists of further updates (a chunk's audited clients each).
        """
        if references:
            import ray

            updates = [*updates, *(update for batch in ray.get(list(references)) for update in batch)]
        outcomes: list[AuditOutcome] = []
        views: list[AttackerView] = []
        kept: list[ClientUpdate] = []
        for update in updates:
            view = attacker_view(
                update,
                global_params,
                self.model,
                self.experiment,
                self.input_shape,
                self.num_classes,
                self.losses[update.group],
            )
            try:
                self.attack.check(view)
            except AttackNotApplicable as exc:
                outcomes.append(AuditOutcome(update.client, update.group, update.round, aggregator, None, str(exc)))
                continue
            views.append(view)
            kept.append(update)
        if views:
            started = time.perf_counter()
            results = self.attack.reconstruct_many(views)
            seconds = (time.perf_counter() - started) / len(views)
            for update, result in zip(kept, results, strict=True):
                outcomes.append(
                    AuditOutcome(update.client, update.group, update.round, aggregator, result, seconds=seconds)
                )
        return outcomes
