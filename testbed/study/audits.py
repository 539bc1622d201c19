"""Paired audits: the same global model and the same clients, every policy and batch size, one portfolio.

At a stage of a trained baseline, each audited client computes the update it would send under every
policy and batch size (``simulate_chunk``: the engine's client code, with the client's own random
streams), the arm's attack portfolio runs on each update's ``AttackerView`` (``AttackWorker``: no ground
truth), and the scorer joins the reconstructions with the samples behind them and the no-information
baselines. Each audited update becomes one row, with its samples' SSIMs for the graded ladder; the
statistics take the seed (the trained model) as their unit.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from metrics import METRIC_NAMES
from metrics.baselines import BaselineCache, ClassPrototypes, best_baseline
from testbed.audit.attack_worker import AttackWorker
from testbed.audit.scoring import score_outcomes
from testbed.audit.worst_case import worst_cases
from testbed.runtime.preparation import PreparedData
from testbed.runtime.records import ChunkTask, Params
from testbed.runtime.simulation import SimulationContext, simulate_chunk
from testbed.study.spec import Arm, StudySpec, experiment_for

STREAM_STUDY_AUDIT = 7919  # the audited clients' draw, apart from the engine's sampling streams


@dataclass(frozen=True)
class Stage:
    """One audited checkpoint of a baseline run: its name, the round it follows and the model's accuracy."""

    name: str
    round: int
    accuracy: float


def audited_clients(data: PreparedData, seed: int, stage_round: int, count: int, least: int) -> np.ndarray:
    """``count`` clients holding at least ``least`` samples, drawn from (seed, round); the same for every policy."""
    sizes = data.partition.sizes()
    eligible = np.flatnonzero(sizes >= least)
    if len(eligible) == 0:
        eligible = np.arange(len(sizes))
    rng = np.random.default_rng([seed, stage_round, STREAM_STUDY_AUDIT])
    return np.sort(rng.choice(eligible, size=min(count, len(eligible)), replace=False)).astype(np.int64)


def audit_stage(
    spec: StudySpec,
    arm: Arm,
    seed: int,
    stage: Stage,
    params: Params,
    lrs: dict[str, float],
    data: PreparedData,
    attack_params: dict[str, dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Every policy x batch size on the stage's audited clients; one row per (update) with its leakage.

    ``attack_params`` replaces the arm's attack parameters (the budget check); its rows say ``budget: check``.
    """
    dataset = data.dataset
    baselines = BaselineCache(ClassPrototypes(dataset.test_x, dataset.test_y), dataset.train_x, dataset.train_y, seed)
    sizes = spec.audited_batch_sizes(arm)
    clients = audited_clients(data, seed, stage.round, spec.audit.clients, max(sizes))
    rows: list[dict[str, Any]] = []
    for policy in spec.audited_policies(arm, budget_check=attack_params is not None):
        lr = spec.lr_for(lrs, policy)
        for size in sizes:
            experiment = experiment_for(
                spec, arm, seed=seed, policy=policy, lr=lr, batch_size=size, attack=True, attack_params=attack_params
            )
            context = SimulationContext.build(
                experiment, dataset.train_x, dataset.train_y, data.partition, dataset.num_classes
            )
            task = ChunkTask(index=0, round=stage.round, group=0, clients=clients, audited=clients)
            summary, payload = simulate_chunk(context, params, task)
            worker = AttackWorker(experiment, dataset.input_shape, dataset.num_classes)
            started = time.perf_counter()
            outcomes = worker.audit(params, payload.audited, "study")
            seconds = time.perf_counter() - started
            scored = score_outcomes(
                outcomes, summary.ground_truth, dataset.train_x, dataset.train_y, stage.round, 0, baselines
            )
            steps = {update.client: max(update.local_steps, 1) for update in payload.audited}
            for case in worst_cases(scored.scored):
                client = case.client
                n = client.result.n
                best = best_baseline(client.baselines) if client.baselines else {}
                row: dict[str, Any] = {
                    "arm": arm.label,
                    "seed": seed,
                    "stage": stage.name,
                    "stage_round": stage.round,
                    "stage_accuracy": stage.accuracy,
                    "budget": "study" if attack_params is None else "check",
                    "policy": policy,
                    "batch_size": size,
                    "client": client.outcome.client,
                    "samples": n,
                    "realised_batch": n / steps.get(client.outcome.client, 1),
                    "recovered": int(client.flags.sum()),
                    "labels_exact": "" if client.labels_exact is None else int(client.labels_exact),
                    "attack_seconds": seconds / max(len(payload.audited), 1),
                }
                for name in METRIC_NAMES:
                    values = client.result.scores[name]
                    finite = values[np.isfinite(values)]
                    row[name] = float(finite.mean()) if len(finite) else float("nan")
                    base = best.get(name)
                    row[f"{name}_baseline"] = (
                        float(np.nanmean(base)) if base is not None and len(base) else float("nan")
                    )
                # per sample, for the graded ladder (metrics.graded_leakage): best SSIM and best baseline SSIM
                row["ssim_samples"] = json.dumps([round(float(v), 4) for v in client.result.scores["ssim"]])
                base_ssim = best.get("ssim")
                row["ssim_baseline_samples"] = (
                    json.dumps([round(float(v), 4) for v in base_ssim]) if base_ssim is not None else ""
                )
                for attack, item in case.by_attack.items():
                    row[f"recovered[{attack}]"] = int(item.flags.sum())
                row["best_attack"] = max(set(case.chosen), key=case.chosen.count) if case.chosen else ""
                rows.append(row)
            for group, attack, reason in scored.not_applicable:
                del group
                rows_for = [r for r in rows if r["policy"] == policy and r["batch_size"] == size]
                for r in rows_for:
                    r.setdefault("not_applicable", "")
                    if attack not in r["not_applicable"]:
                        r["not_applicable"] = (r["not_applicable"] + f"; {attack}: {reason}").strip("; ")
    return rows
