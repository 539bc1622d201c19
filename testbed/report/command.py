"""``testbed report TARGET``: a leakage table, plots and a markdown summary of finished runs.

TARGET is an MLflow experiment name or a run id (a sweep parent stands for its children). The report
is written to a folder (``report.md``, ``leakage.csv``, PNG figures) and, when the target is one run
or one sweep, also logged to that run's artifacts under ``report/``. See docs/report.md.
"""

from __future__ import annotations

import csv
import json
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from testbed.report.data import (
    COMBINATION_TAG,
    LeakageRow,
    Selection,
    Spread,
    leakage_rows,
    open_store,
    read_results,
    select_runs,
)
from testbed.report.markup import code, text
from testbed.report.plots import plot_leakage_vs_batch, plot_privacy_utility

ARTIFACT_FOLDER = "report"
CSV_COLUMNS = (
    "model",
    "attack",
    "defence",
    "batch_size",
    "setting",
    "samples",
    *(f"{score}_{stat}" for score in ("avd", "ssim") for stat in ("mean", "std", "q1", "median", "q3")),
    "recovered_fraction",
    "unrecoverable",
    "label_accuracy",
    "label_histogram_exact",
    "final_test_accuracy",
    "runs",
    "run_ids",
)


def number(value: float | None, digits: int = 3) -> str:
    """A value for the markdown table: fixed decimals, '-' for missing, NaN or infinite."""
    if value is None or not math.isfinite(value):
        return "-"
    return f"{value:.{digits}f}"


def _plain(value: float) -> str:
    return repr(value) if math.isfinite(value) else ""


def write_csv(rows: list[LeakageRow], path: Path) -> None:
    """The leakage table with every statistic in its own column; missing values are empty cells."""
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(CSV_COLUMNS)
        for row in rows:
            policy = row.policy
            spreads = [
                _plain(getattr(spread, stat))
                for spread in (row.avd, row.ssim)
                for stat in ("mean", "std", "q1", "median", "q3")
            ]
            writer.writerow(
                [
                    policy.model,
                    policy.attack,
                    policy.defence,
                    policy.batch_size,
                    policy.setting,
                    row.samples,
                    *spreads,
                    _plain(row.recovered_fraction),
                    _plain(row.unrecoverable),
                    _plain(row.label_accuracy),
                    _plain(row.label_histogram_exact),
                    _plain(row.accuracy),
                    len(row.run_ids),
                    " ".join(row.run_ids),
                ]
            )


def label_leak_notes(rows: list[LeakageRow]) -> list[str]:
    """One note per identical-label row whose labels were inferred: that defence makes the label leak certain."""
    notes = []
    for row in rows:
        if "identical-labels" not in row.policy.defence or not math.isfinite(row.label_histogram_exact):
            continue
        notes.append(
            f"{text(row.policy.model)} / {text(row.policy.attack)} / {text(row.policy.defence)}, "
            f"batch {row.policy.batch_size}: "
            f"identical-label batching gives every audited update a single class, and label inference recovered "
            f"the exact label histogram of {number(row.label_histogram_exact)} of the updates (label accuracy "
            f"{number(row.label_accuracy)}): this defence makes the class of every sample in a batch known to "
            "the server, whatever the image reconstructions show."
        )
    return notes


def _mean_std(spread: Spread) -> str:
    return "-" if not math.isfinite(spread.mean) else f"{number(spread.mean)} ± {number(spread.std)}"


def _median_iqr(spread: Spread) -> str:
    if not math.isfinite(spread.median):
        return "-"
    return f"{number(spread.median)} [{number(spread.q1)}, {number(spread.q3)}]"


def markdown_table(rows: list[LeakageRow]) -> list[str]:
    """The leakage table as markdown lines (a setting column only when some row has one)."""
    with_setting = any(row.policy.setting for row in rows)
    header = ["model", "attack", "defence", "batch size", *(["setting"] if with_setting else [])]
    header += [
        "AVD mean ± std",
        "AVD median [IQR]",
        "SSIM mean ± std",
        "recovered",
        "unrecoverable",
        "label accuracy",
        "exact label histogram",
        "audited samples",
        "final test accuracy",
        "runs",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        policy = row.policy
        cells = [text(policy.model), text(policy.attack), text(policy.defence), str(policy.batch_size)]
        cells += [text(policy.setting) if policy.setting else "-"] if with_setting else []
        cells += [
            _mean_std(row.avd),
            _median_iqr(row.avd),
            _mean_std(row.ssim),
            number(row.recovered_fraction),
            number(row.unrecoverable),
            number(row.label_accuracy),
            number(row.label_histogram_exact),
            str(row.samples),
            number(row.accuracy),
            ", ".join(code(run_id) for run_id in row.run_ids),
        ]
        lines.append("| " + " | ".join(cells) + " |")  # every cell is escaped text, a number or plain code
    return lines


def _runs_table(selection: Selection) -> list[str]:
    lines = ["| run id | name | combination | final test accuracy |", "|---|---|---|---|"]
    for run in selection.runs:
        combination = run.data.tags.get(COMBINATION_TAG)
        shown = (
            ", ".join(f"{key}={json.dumps(value)}" for key, value in json.loads(combination).items())
            if combination
            else "-"
        )
        accuracy = number(run.data.metrics.get("test_accuracy"))
        lines.append(f"| {code(run.info.run_id)} | {text(run.info.run_name or '-')} | {text(shown)} | {accuracy} |")
    return lines


def write_markdown(
    selection: Selection,
    uri: str,
    rows: list[LeakageRow],
    figures: list[Path],
    notes: list[str],
    path: Path,
) -> None:
    """report.md: what was read, the leakage table, the figures as relative links, and notes."""
    skipped = ", ".join(f"{count} {status}" for status, count in sorted(selection.skipped.items()))
    logged = (
        f"also logged to run {code(selection.log_run_id)} under `{ARTIFACT_FOLDER}/`"
        if selection.log_run_id
        else "not logged to MLflow (the target is neither one run nor one sweep)"
    )
    read_at = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    lines = [
        f"# Leakage report: {text(selection.target)}",
        "",
        f"- Target: {selection.description}",
        f"- Tracking store: {code(uri)}",
        f"- Read at: {read_at}",
        f"- Runs read: {len(selection.runs)} finished" + (f"; skipped: {skipped}" if skipped else ""),
        f"- This report: {logged}",
        "",
        "## Leakage by policy and batch size",
        "",
        "AVD and SSIM statistics are over the audited samples the attack produced a finite reconstruction "
        "for; `unrecoverable` is the share that had none. `recovered` is the share of all audited samples "
        "that passed the recovery test. Rows with the same model, attack, defence, batch size and setting "
        "pool the samples of all their runs and average the runs' final test accuracy. '-' marks a value "
        "that was not measured (no audits, no labels inferred) or is not finite.",
        "",
        *(markdown_table(rows) if rows else ["No client groups found in the runs read."]),
        "",
        "The same table with every statistic in its own column: [leakage.csv](leakage.csv).",
        "",
        "## Figures",
        "",
    ]
    for figure in figures:
        lines += [f"![{figure.stem.replace('_', ' ')}]({figure.name})", ""]
    if not figures:
        lines += ["No audited samples in these runs, so there is no leakage to plot.", ""]
    lines += ["## Runs", "", *_runs_table(selection), ""]
    if notes:
        lines += ["## Notes", "", *(f"- {note}" for note in notes), ""]
    path.write_text("\n".join(lines), encoding="utf-8")


def _log(client: Any, run_id: str, files: list[Path]) -> None:
    for file in files:
        client.log_artifact(run_id, str(file), ARTIFACT_FOLDER)


def report_command(target: str, *, uri: str, out: Path) -> Path:
    """Read the runs ``target`` names from MLflow at ``uri``, write the report into ``out``; return report.md."""
    client = open_store(uri)
    selection = select_runs(client, target, uri)
    results, notes = read_results(client, selection.runs)
    rows = leakage_rows(results)
    notes += label_leak_notes(rows)
    out.mkdir(parents=True, exist_ok=True)
    table = out / "leakage.csv"
    write_csv(rows, table)
    figures = plot_leakage_vs_batch(rows, out)
    tradeoff = plot_privacy_utility(results, out)
    figures += [tradeoff] if tradeoff is not None else []
    summary = out / "report.md"
    write_markdown(selection, uri, rows, figures, notes, summary)
    if selection.log_run_id is not None:
        _log(client, selection.log_run_id, [summary, table, *figures])
    return summary
