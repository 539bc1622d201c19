"""The study's cost table: attack seconds per audited update and training minutes per arm, from its own tables."""

from __future__ import annotations

import math

from testbed.study.cost import cost_rows, cost_table


def test_cost_per_audited_update_leaves_out_the_budget_check_and_missing_times() -> None:
    audits = [
        {"arm": "a", "budget": "study", "attack_seconds": "1.0"},
        {"arm": "a", "budget": "study", "attack_seconds": "2.0"},
        {"arm": "a", "budget": "study", "attack_seconds": "6.0"},
        {"arm": "a", "budget": "check", "attack_seconds": "100.0"},  # the larger budgets are not the study's cost
        {"arm": "b", "budget": "study", "attack_seconds": ""},  # no measurement
    ]
    training = [{"arm": "a", "seconds": "30"}, {"arm": "a", "seconds": "90"}, {"arm": "b", "seconds": "60"}]
    rows = {row["arm"]: row for row in cost_rows(audits, training)}
    assert rows["a"]["audited_updates"] == 3
    assert rows["a"]["attack_seconds_per_update"] == 3.0 and rows["a"]["attack_seconds_per_update_median"] == 2.0
    assert rows["a"]["attack_minutes"] == 9.0 / 60
    assert rows["a"]["training_runs"] == 2 and rows["a"]["training_minutes"] == 2.0
    assert rows["b"]["audited_updates"] == 0 and math.isnan(rows["b"]["attack_seconds_per_update"])
    table = cost_table(list(rows.values()))
    assert table[-1] == "| all | 3 | 3.00 (mean) | 0.1 | 3 | 3.0 |"
