"""The attack actor: runs the configured attack on the attacker views of audited updates.

The aggregator turns each audited ``ClientUpdate`` into an ``AttackerView`` (testbed.audit.outcome) and
hands it to an ``AttackWorker``. The worker answers with ``AuditOutcome`` records that the scorer later
joins with the simulator's ground truth.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from attacks import Attack, AttackerView, AttackNotApplicable, build_attack
from defenses import build_policy
from testbed.audit.outcome import AuditOutcome, attacker_view, one_pass_groups
from testbed.config.schema import Experiment
from testbed.runtime.models import model_for
from testbed.runtime.records import ClientUpdate, Params
from testbed.runtime.scheduling import optimisation_clients, optimisation_pool


def attack_model(experiment: Experiment, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """The architecture the attacks re-create clients' training with.

    Clients train in train mode, where BatchNorm normalises with each batch's statistics. The attacks' copy
    keeps no running statistics (``torch.func.replace_all_batch_norm_modules_``): it normalises the same way
    and mutates nothing, so an attack can differentiate it and vectorise it over victims.
    """
    model = model_for(experiment.model, input_shape, num_classes)
    torch.func.replace_all_batch_norm_modules_(model)
    return model


class AttackWorker:
    """An actor that runs the configured attacks on batches of attacker views (on its GPU when it has one).

    With a portfolio (``attack.name`` a list), every attack that applies runs on every view, each batched
    over the views; each (update, attack) pair gives one ``AuditOutcome``.
    """

    def __init__(self, experiment: Experiment, input_shape: tuple[int, ...], num_classes: int) -> None:
        assert experiment.attack is not None
        from testbed.audit.priority import lower_priority

        lower_priority(experiment.resources.attack.nice)
        torch.set_num_threads(max(1, int(experiment.resources.attack.num_cpus)))
        device = "cuda" if experiment.resources.attack.num_gpus > 0 and torch.cuda.is_available() else "cpu"
        self.experiment = experiment
        self.input_shape = tuple(input_shape)
        self.num_classes = num_classes
        self.model = attack_model(experiment, input_shape, num_classes)
        self.attacks = [
            build_attack(name, experiment.attack.params_of(name), device=device) for name in experiment.attack.names
        ]
        self.losses = {group.group: build_policy(group.defence).loss for group in experiment.clients}
        self.cap = experiment.attack.optimisation_cap
        self.one_pass = one_pass_groups(experiment)
        for edge in experiment.aggregators:
            self.losses[f"{edge.name}-aggregate"] = self.losses[edge.groups[0]]

    def audit(
        self,
        global_params: Params,
        updates: Sequence[ClientUpdate],
        aggregator: str,
        references: Sequence[Any] = (),
    ) -> list[AuditOutcome]:
        """Run every attack on every update ``aggregator`` received; where one does not apply, a one-line reason.

        ``references`` are object references to lists of further updates (a chunk's audited clients each).
        """
        if references:
            import ray

            updates = [*updates, *(update for batch in ray.get(list(references)) for update in batch)]
        views = [
            attacker_view(
                update,
                global_params,
                self.model,
                self.experiment,
                self.input_shape,
                self.num_classes,
                self.losses[update.group],
                keep_factors=all(attack.reads_factors for attack in self.attacks),
                one_pass=update.group in self.one_pass,
            )
            for update in updates
        ]
        outcomes: list[AuditOutcome] = []
        left_out = self._beyond_cap(updates)
        for attack in self.attacks:
            if attack.cost == "optimisation" and left_out:
                reason = (
                    f"{attack.name}: not run on this update: the round's optimisation attacks ran on "
                    f"{self.cap} audited updates (attack.audit.optimisation_per_round)"
                )
                outcomes += [
                    AuditOutcome(update.client, update.group, update.round, aggregator, None, reason, 0.0, attack.name)
                    for index, update in enumerate(updates)
                    if index in left_out
                ]
                kept = [index for index in range(len(updates)) if index not in left_out]
                outcomes += self._run(attack, [updates[i] for i in kept], [views[i] for i in kept], aggregator)
            else:
                outcomes += self._run(attack, updates, views, aggregator)
        return outcomes

    def _beyond_cap(self, updates: Sequence[ClientUpdate]) -> set[int]:
        """Positions of the updates the optimisation attacks skip: a round's audited clients beyond the cap (the
        kept ones drawn from the round's seed alone, the same whichever task or actor holds them). An update that
        is no audited client's own (an edge's aggregate) is never skipped."""
        if self.cap is None:
            return set()
        skipped: dict[int, set[int]] = {}
        for update in updates:
            if update.round not in skipped:
                pool = {int(client) for client in optimisation_pool(self.experiment, update.round)}
                skipped[update.round] = pool - optimisation_clients(self.experiment, update.round, self.cap)
        return {index for index, update in enumerate(updates) if update.client in skipped[update.round]}

    @staticmethod
    def _run(
        attack: Attack, updates: Sequence[ClientUpdate], views: Sequence[AttackerView], aggregator: str
    ) -> list[AuditOutcome]:
        """One attack on the views it applies to, batched; a not-applicable outcome for the others."""
        outcomes: list[AuditOutcome] = []
        runnable: list[tuple[ClientUpdate, AttackerView]] = []
        for update, view in zip(updates, views, strict=True):
            try:
                attack.check(view)
            except AttackNotApplicable as exc:
                who = (update.client, update.group, update.round, aggregator)
                outcomes.append(AuditOutcome(*who, None, str(exc), 0.0, attack.name))
                continue
            runnable.append((update, view))
        if runnable:
            started = time.perf_counter()
            results = attack.reconstruct_many([view for _, view in runnable])
            seconds = (time.perf_counter() - started) / len(runnable)
            for (update, _), result in zip(runnable, results, strict=True):
                outcomes.append(
                    AuditOutcome(
                        update.client, update.group, update.round, aggregator, result, None, seconds, attack.name
                    )
                )
        return outcomes
