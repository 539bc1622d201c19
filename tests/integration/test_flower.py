"""Auditing Flower: the auditor on replies (no Flower needed) and the example Flower app run in Flower's simulation.

The example app's leakage must agree with the testbed's own attack on the same global models and batches
replayed through the testbed's client update (``reference_update``); a malformed reply is counted, not fatal.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from testbed.audit.scoring import score_outcomes
from testbed.audit.worst_case import worst_cases
from testbed.integrations.flower import FlowerAuditor, Reply
from testbed.integrations.flower.auditor import RoundAudit
from testbed.runtime.local_update import reference_update
from testbed.runtime.models import model_for
from testbed.runtime.records import ClientUpdate
from tests.conftest import REPO

FLOWER_APP = REPO / "topologies" / "flower"


def _topology(tracking: dict[str, Any], **changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "name": "flower-unit",
        "seed": 0,
        "rounds": 1,
        "dataset": {"name": "mnist-5k", "partition": {"scheme": "iid"}, "max_test": 300},
        "model": {"name": "mlp", "hidden": [32], "activation": "relu"},
        "algorithm": {"name": "fedsgd", "lr": 0.1},
        "clients": [{"group": "flower", "count": 20, "batch_size": 1, "defence": {"loss": "cross-entropy"}}],
        "attack": {"name": "dense-ratio"},
        "tracking": tracking,
    }
    data.update(changes)
    return data


def _trained_weights(
    auditor: FlowerAuditor, start: dict[str, np.ndarray], indices: np.ndarray
) -> dict[str, np.ndarray]:
    """What a Flower client sends after one SGD step on ``indices``: its weights."""
    experiment, dataset = auditor.experiment, auditor.dataset
    model = model_for(experiment.model, dataset.input_shape, dataset.num_classes)
    params = {name: torch.as_tensor(value) for name, value in start.items()}
    batch = [(torch.as_tensor(dataset.train_x[indices]), torch.as_tensor(dataset.train_y[indices]).long())]
    loss = auditor.worker.losses[auditor.group]
    gradient = reference_update(model, loss, params, batch, kind="gradient", lr=experiment.algorithm.lr)  # type: ignore[arg-type]
    return {name: (params[name] - experiment.algorithm.lr * gradient[name]).numpy() for name in params}


def _metrics(uri: str, run_id: str) -> dict[str, float]:
    return dict(MlflowClient(tracking_uri=uri).get_run(run_id).data.metrics)


def test_the_auditor_scores_well_formed_replies_and_counts_the_others(tracking: dict[str, Any]) -> None:
    auditor = FlowerAuditor(_topology(tracking))
    model = model_for(auditor.experiment.model, auditor.dataset.input_shape, auditor.dataset.num_classes, seed=0)
    start = {name: value.detach().numpy() for name, value in model.state_dict().items()}
    indices = auditor.client_indices(3)[:1]
    sent = _trained_weights(auditor, start, indices)
    first = next(iter(sent))
    replies = [
        Reply(client=3, arrays=sent, num_samples=1, batch_size=1, sample_indices=indices),
        Reply(client=4, arrays={**sent, first: sent[first].T.copy()}, num_samples=1, batch_size=1),
        Reply(client=5, arrays={**sent, first: np.full_like(sent[first], np.nan)}, num_samples=1, batch_size=1),
        Reply(
            client=6, arrays={name: value for name, value in sent.items() if name != first}, num_samples=1, batch_size=1
        ),
    ]
    found = auditor.audit_round(1, start, replies)
    auditor.close()
    # one sample behind a FedSGD update: the dense-layer ratio recovers it exactly (weights -> gradient in float64)
    assert found.attacked == [3] and found.recovered == {3: 1} and found.recovered_fraction == 1.0
    reasons = dict(found.not_applicable)
    assert "has shape" in reasons[4] and "NaN or Inf" in reasons[5] and "lacks the global model's array" in reasons[6]
    metrics = _metrics(tracking["uri"], auditor.run_id)
    assert metrics["leakage/flower/recovered_fraction"] == 1.0
    assert metrics["audit/rejected_replies"] == 3.0


def test_without_ground_truth_the_auditor_logs_reconstructions_not_scores(
    tracking: dict[str, Any], tmp_path: Path
) -> None:
    auditor = FlowerAuditor(_topology(tracking))
    model = model_for(auditor.experiment.model, auditor.dataset.input_shape, auditor.dataset.num_classes, seed=0)
    start = {name: value.detach().numpy() for name, value in model.state_dict().items()}
    sent = _trained_weights(auditor, start, auditor.client_indices(0)[:1])
    found = auditor.audit_round(1, start, [Reply(client=0, arrays=sent, num_samples=1, batch_size=1)])
    auditor.close()
    assert found.attacked == [0] and not found.scored and found.recovered_fraction is None
    client = MlflowClient(tracking_uri=tracking["uri"])
    run = client.get_run(auditor.run_id)
    assert "leakage/flower/recovered_fraction" not in run.data.metrics
    assert run.data.metrics["audit/unscored_updates"] == 1.0
    assert "no ground truth" in run.data.tags["mlflow.note.content"]
    folder = Path(client.download_artifacts(auditor.run_id, "audits", str(tmp_path)))
    with np.load(folder / "reconstructions_round_0001.npz", allow_pickle=False) as stored:
        assert stored["dense-ratio__client_0"].shape == (1, *auditor.dataset.input_shape)


# --- the example Flower app, in Flower's simulation ------------------------------------------------------------


def _flower_app() -> Any:
    pytest.importorskip("flwr")
    if str(FLOWER_APP) not in sys.path:
        sys.path.insert(0, str(FLOWER_APP))  # Flower's Ray workers get this sys.path and import the app from it
    import flower_app

    return flower_app


def _replayed(auditor: FlowerAuditor, audit: RoundAudit) -> dict[int, int]:
    """Per client, samples the testbed's own attack recovers from the update its client code computes on the same
    global model and batches."""
    experiment, dataset = auditor.experiment, auditor.dataset
    model = model_for(experiment.model, dataset.input_shape, dataset.num_classes)
    params = {name: torch.as_tensor(value) for name, value in audit.global_arrays.items() if name in auditor.names}
    fedsgd = experiment.algorithm.name == "fedsgd"
    loss = auditor.worker.losses[auditor.group]
    updates, truth = [], {}
    for reply in audit.replies:
        assert reply.sample_indices is not None
        order = reply.sample_indices
        batches = [
            (torch.as_tensor(dataset.train_x[part]), torch.as_tensor(dataset.train_y[part]).long())
            for part in np.array_split(order, np.arange(reply.batch_size, len(order), reply.batch_size))
        ]
        update = reference_update(
            model,
            loss,
            params,
            batches,
            kind="gradient" if fedsgd else "delta",
            lr=experiment.algorithm.lr,  # type: ignore[arg-type]
        )
        updates.append(
            ClientUpdate(
                reply.client,
                auditor.group,
                audit.round - 1,
                update,
                len(order),
                reply.batch_size,
                reply.local_steps,
                None,
            )
        )
        truth[reply.client] = order
    outcomes = auditor.worker.audit(params, updates, "root")
    scored = score_outcomes(outcomes, truth, dataset.train_x, dataset.train_y, audit.round - 1, 0, auditor.baselines)
    return {case.client.outcome.client: int(case.client.flags.sum()) for case in worst_cases(scored.scored)}


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.parametrize("algorithm", ["fedsgd", "fedavg"])
def test_the_example_flower_app_is_audited_and_agrees_with_the_testbed(
    algorithm: str, tracking: dict[str, Any]
) -> None:
    app = _flower_app()
    rounds = 2 if algorithm == "fedsgd" else 1
    overrides: tuple[str, ...] = (f"algorithm.name={algorithm}", f"rounds={rounds}", f"tracking.uri={tracking['uri']}")
    if algorithm == "fedavg":
        # one epoch over 40 images (10 steps of 4): the multi-step attacks simulate all ten steps
        overrides += ("dataset.max_train=800", "attack.params.inverting-gradients.iterations=50")
    strategy = app.simulate(app.TOPOLOGY, overrides)
    assert [audit.round for audit in strategy.audits] == list(range(1, rounds + 1))
    metrics = _metrics(tracking["uri"], strategy.run_id)
    for audit in strategy.audits:
        # the topology's audit.clients_per_round (4) of the 20 replies, each with the samples it trained on
        assert len(audit.attacked) == 4 and audit.scored and not audit.not_applicable
        steps = {reply.local_steps for reply in audit.replies}
        assert steps == {1} if algorithm == "fedsgd" else min(steps) > 1  # FedAvg: one epoch of several batches
        replayed = _replayed(strategy.auditor, audit)
        samples = sum(audit.samples.values())
        # the same update up to float32 round-off (Flower sends weights; the audit subtracts the global model):
        # samples near the recovery threshold may flip, at most 5% of the round's samples (and at least one)
        assert abs(sum(audit.recovered.values()) - sum(replayed.values())) <= max(1, 0.05 * samples)
    assert 0.0 <= metrics["leakage/flower/recovered_fraction"] <= 1.0
    if algorithm == "fedsgd":
        # an untrained MLP, batches of 4: the analytic attacks recover most samples (measured: all of them)
        assert strategy.audits[0].recovered_fraction is not None and strategy.audits[0].recovered_fraction >= 0.75


@pytest.mark.slow
@pytest.mark.ray
def test_a_wrong_shape_reply_is_counted_and_left_out_not_fatal(tracking: dict[str, Any], tmp_path: Path) -> None:
    app = _flower_app()
    from tests.support.flower_clients import BROKEN_CLIENT, broken_client_app

    overrides = ("rounds=1", f"tracking.uri={tracking['uri']}")
    strategy = app.simulate(app.TOPOLOGY, overrides, client=broken_client_app)
    (audit,) = strategy.audits
    reasons = dict(audit.not_applicable)
    assert list(reasons) == [BROKEN_CLIENT] and "has shape" in reasons[BROKEN_CLIENT]
    assert len(audit.attacked) == 4 and BROKEN_CLIENT not in audit.attacked
    client = MlflowClient(tracking_uri=tracking["uri"])
    run = client.get_run(strategy.run_id)
    assert run.info.status == "FINISHED" and run.data.metrics["audit/rejected_replies"] == 1.0
    stored = Path(client.download_artifacts(strategy.run_id, "audits/not_applicable.json", str(tmp_path)))
    counts = json.loads(stored.read_text(encoding="utf-8"))
    assert sum(count for reason, count in counts.items() if "has shape" in reason) == 1
