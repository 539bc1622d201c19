"""What a finished or resumed run records besides its metrics: the resolved configuration, the final
model and summary, the MLflow description, and the check that a resumed run kept its configuration.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

from testbed.config.schema import Experiment
from testbed.errors import UserError
from testbed.runtime.records import Params
from testbed.tracking.store import Tracker, flatten


def resolved_yaml(experiment: Experiment) -> str:
    """The experiment with every default filled in, as YAML."""
    return yaml.safe_dump(experiment.model_dump(mode="json"), sort_keys=False)


def check_same_experiment(experiment: Experiment, state: Mapping[str, Any]) -> None:
    """A resumed run must use the configuration that wrote its checkpoint (only ``rounds`` may grow)."""
    saved = flatten(dict(state.get("config", {})))
    current = flatten(experiment.model_dump(mode="json"))
    saved.pop("rounds", None)
    current.pop("rounds", None)
    if saved and saved != current:
        changed = sorted(key for key in set(saved) | set(current) if saved.get(key) != current.get(key))
        raise UserError(
            f"--resume: the checkpoint was written with a different configuration (differs in: {', '.join(changed)})"
        )


def run_note(
    experiment: Experiment,
    history: list[dict[str, float]],
    leakage: Mapping[str, Mapping[str, float]],
    grids: list[str],
    intervals: Mapping[str, Sequence[Any]] | None = None,
) -> str:
    """The run's MLflow description (markdown): final accuracy, leakage per group, where the audit grids are.

    ``intervals``: with ``attack.audit.target_half_width``, per group its window intervals in window order
    (anything with ``window``, ``audited``, ``low``, ``high`` and ``half_width``, as
    testbed.audit.precision.WindowInterval).
    """
    accuracy = next((row["test_accuracy"] for row in reversed(history) if "test_accuracy" in row), float("nan"))
    lines = [f"**{experiment.name}**: {experiment.rounds} rounds, final test accuracy {accuracy:.4f}."]
    if experiment.attack is None:
        lines.append("")
        lines.append("No attack audited this run.")
        return "\n".join(lines)
    lines += [
        "",
        f"Leakage under {experiment.attack.label}, over every audited sample of the run (recovered: past the "
        "threshold and beyond the no-information baselines; SSIM >= t: the sample's best SSIM at least t and "
        "above every baseline's):",
        "",
    ]
    lines += [
        "| group | audited samples | recovered | SSIM >= 0.7 | SSIM >= 0.5 | mean SSIM | mean AVD |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for group, row in leakage.items():
        ladder = " | ".join(f"{row[name]:.3f}" if name in row else "-" for name in ("ssim_ge_0.7", "ssim_ge_0.5"))
        lines.append(
            f"| {group} | {int(row['audited_samples'])} | {row['recovered_fraction']:.3f} | {ladder} | "
            f"{row['ssim_mean']:.3f} | {row['avd_mean']:.3f} |"
        )
    if not leakage:
        lines.append("| (no audited sample was scored) | 0 | | | | | |")
    lines.append("")
    audit = experiment.attack.audit
    if audit.target_half_width is not None:
        lines += precision_lines(audit.target_half_width, audit.window, intervals or {})
    if grids:
        span = f"`{grids[0]}` ... `{grids[-1]}` ({len(grids)} rounds)" if len(grids) > 1 else f"`{grids[0]}`"
        lines.append(f"Audit grids (originals above matched reconstructions): {span}.")
    lines.append("Every audited sample: `audits/samples.csv`.")
    return "\n".join(lines)


def precision_lines(target: float, window: int, intervals: Mapping[str, Sequence[Any]]) -> list[str]:
    """The run note's table of each group's recovered fraction with its 95% interval per window of rounds."""
    lines = [
        f"Audits sized by a precision target: per group and window of {window} rounds, audited until the 95% "
        f"confidence sequence of its recovered fraction (the audited update as the unit) had half-width "
        f"<= {target:g}:",
        "",
        "| group | windows at target | last window's rounds | audited there | 95% interval | half-width |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for group, rows in intervals.items():
        if not rows:
            continue
        last = rows[-1]
        met = sum(1 for row in rows if row.half_width <= target)
        span = f"{last.window * window + 1}-{(last.window + 1) * window}"
        lines.append(
            f"| {group} | {met} of {len(rows)} | {span} | {last.audited} | [{last.low:.3f}, {last.high:.3f}] | "
            f"{last.half_width:.3f} |"
        )
    if not intervals:
        lines.append("| (no audited update was scored) | | | | | |")
    lines.append("")
    return lines


def log_final(
    tracker: Tracker, run_id: str, experiment: Experiment, params: Params, history: list[dict[str, float]]
) -> None:
    """Artifacts of a finished run: the final model and a summary."""
    with tracker.staging() as folder:
        model_file = Path(folder) / "model_state_dict.pt"
        torch.save(params, model_file)
        tracker.log_file(run_id, model_file)
    final = {key: value for key, value in history[-1].items()} if history else {}
    summary: dict[str, Any] = {
        "name": experiment.name,
        "rounds": experiment.rounds,
        "final": final,
        "best_test_accuracy": max((row.get("test_accuracy", float("nan")) for row in history), default=float("nan")),
        "total_seconds": sum(row.get("round_seconds", 0.0) for row in history),
    }
    tracker.log_json(run_id, summary, "summary.json")
