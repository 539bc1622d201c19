"""Audits sized by a precision target: which clients a round audits, and when a group is settled."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from testbed.audit.precision import PrecisionTarget
from testbed.config.schema import Experiment
from testbed.errors import UserError
from testbed.runtime.scheduling import audited_clients, client_groups, optimisation_clients, sample_clients


def _experiment(audit: dict[str, Any]) -> Experiment:
    return Experiment.model_validate(
        {
            "name": "target",
            "rounds": 10,
            "clients": [{"group": "a", "count": 30, "batch_size": 2}, {"group": "b", "count": 30, "batch_size": 2}],
            "sampling": {"clients_per_round": 40},
            "attack": {"audit": audit},
        }
    )


def test_a_round_audits_up_to_the_cap_of_the_groups_not_yet_settled() -> None:
    experiment = _experiment({"target_half_width": 0.05, "max_clients_per_round": 12})
    plain = _experiment({"clients_per_round": 12})
    for round_index in range(4):
        sampled = sample_clients(experiment, round_index)
        both = audited_clients(experiment, round_index, sampled)
        # with nothing settled the draw is the one clients_per_round of the same size gives
        assert np.array_equal(both, audited_clients(plain, round_index, sampled))
        only_b = audited_clients(experiment, round_index, sampled, frozenset({"a"}))
        b_sampled = int(np.sum(client_groups(experiment, sampled) == "b"))
        assert len(only_b) == min(12, b_sampled) and set(client_groups(experiment, only_b)) == {"b"}
        assert len(audited_clients(experiment, round_index, sampled, frozenset({"a", "b"}))) == 0
        # the optimisation cap reads no audit result: a pure function of the round, within its candidates
        chosen = optimisation_clients(experiment, round_index, 4)
        assert len(chosen) == 4 and chosen <= set(sampled.tolist())
        assert chosen == optimisation_clients(experiment, round_index, 4)


def _cases(group: str, fractions: list[float]) -> list[Any]:
    return [
        SimpleNamespace(
            client=SimpleNamespace(
                outcome=SimpleNamespace(group=group, client=index),
                result=SimpleNamespace(n=4),
                flags=np.array([k < round(4 * f) for k in range(4)]),
            )
        )
        for index, f in enumerate(fractions)
    ]


def test_a_group_is_settled_from_the_audits_of_rounds_up_to_the_lag_and_only_in_its_window() -> None:
    target = PrecisionTarget(0.05, window=5, lag=2, groups=["a", "b"])
    logged = [target.observe(r, _cases("a", [1.0] * 20) + _cases("b", [0.5, 0.25] * 10)) for r in range(3)]
    assert [m["audit/a/audited_in_window"] for m in logged] == [20.0, 40.0, 60.0]
    assert logged[1]["leakage/a/recovered_ci_half_width"] > 0.05 >= logged[2]["leakage/a/recovered_ci_half_width"]
    assert logged[2]["leakage/b/recovered_ci_low"] < 0.375 < logged[2]["leakage/b/recovered_ci_high"]
    assert target.reached == {"a": {0: 2}}  # group b's spread needs more than 60 updates
    assert target.settled(3) == frozenset()  # round 4 decides from rounds 1-2: not yet
    assert target.settled(4) == frozenset({"a"})  # round 5 from rounds 1-3
    assert target.settled(5) == frozenset()  # a new window starts afresh
    again = PrecisionTarget(0.05, window=5, lag=2, groups=["a", "b"])
    again.restore(target.state())  # a checkpoint keeps the decisions
    assert again.settled(4) == frozenset({"a"}) and again.interval("b", 0) == target.interval("b", 0)


def test_a_checkpoint_with_the_targets_state_reads_back_and_a_foreign_one_is_refused(tmp_path: Any) -> None:
    import torch

    from testbed.tracking.checkpoint import load_checkpoint, save_checkpoint

    target = PrecisionTarget(0.05, window=5, lag=2, groups=["a"])
    target.observe(0, _cases("a", [1.0, 0.5, 0.25]))
    base = {"round": 1, "params": {"w": torch.zeros(2)}, "history": [], "config": {}}
    path = tmp_path / "ok.pt"
    save_checkpoint(path, {**base, "audits": {"precision": target.state()}})
    again = PrecisionTarget(0.05, window=5, lag=2, groups=["a"])
    again.restore(load_checkpoint(path)["audits"]["precision"])
    assert again.observed == {"a": {0: [1.0, 0.5, 0.25]}}
    bad = tmp_path / "bad.pt"
    save_checkpoint(bad, {**base, "audits": {"precision": {"observed": {"a": {"0": [1.5]}}}}})
    with pytest.raises(UserError, match=r"audits\.precision must map groups"):
        load_checkpoint(bad)
