"""The audited samples' table: the CSV the row-by-row writer gave, and checkpoints that stay small and safe."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import torch

from testbed.audit.sample_table import CSV_FIELDS, FLOATS, SampleTable
from testbed.tracking.checkpoint import save_checkpoint


def _rows(count: int, seed: int) -> list[dict[str, object]]:
    """Rows as the meter used to keep them: plain Python values, an empty cell where no baseline was drawn."""
    generator = np.random.default_rng(seed)
    rows: list[dict[str, object]] = []
    for index in range(count):
        row: dict[str, object] = {
            "round": 1 + index // 7,
            "aggregator": "root" if index // 4 % 3 else "edge-1",  # one per client block of four
            "group": ("a", "b", "c")[index % 3],
            "client": index // 4,
            "sample": int(generator.integers(60_000)),
            "label": int(generator.integers(10)),
            "attack": ("dense-ratio", "inverting-gradients")[index % 2],
            "matched": int(generator.integers(-1, 8)),
            "recovered": bool(generator.random() < 0.4),
        }
        for field in FLOATS:
            value = float(generator.random())
            row[field] = "" if field.endswith("_baseline") and index % 5 == 0 else value
        row["avd"] = float("inf") if index == 3 else row["avd"]  # an unrecoverable reconstruction
        rows.append(row)
    return rows


def _dict_writer(rows: list[dict[str, object]]) -> str:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=CSV_FIELDS)
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue()


def _table(rows: list[dict[str, object]], table: SampleTable | None = None) -> SampleTable:
    """The same rows appended (to ``table``, else a new one) in client blocks of up to four, as the meter
    appends a scored client."""
    table = SampleTable() if table is None else table
    for start in range(0, len(rows), 4):
        block = rows[start : start + 4]
        table.append(
            {
                "aggregator": str(block[0]["aggregator"]),
                "group": [str(r["group"]) for r in block],
                "attack": [str(r["attack"]) for r in block],
            },
            {
                **{f: [r[f] for r in block] for f in ("round", "client", "sample", "label", "matched")},
                **{f: [np.nan if r[f] == "" else r[f] for r in block] for f in FLOATS},
            },
            [r["recovered"] for r in block],
        )
    return table


def test_the_csv_equals_the_row_by_row_writer() -> None:
    rows = _rows(41, 0)
    table = _table(rows)
    assert len(table) == 41
    assert table.to_csv() == _dict_writer(rows)


def test_a_checkpoint_round_trip_keeps_every_row(tmp_path: Path) -> None:
    rows = _rows(30, 1)
    table = _table(rows)
    path = tmp_path / "state.pt"
    save_checkpoint(path, {"rows": table.state()})
    back = SampleTable.from_state(torch.load(path, weights_only=True)["rows"])  # tensors and plain data only
    assert back.to_csv() == table.to_csv()
    # a checkpoint holds one tensor per column, not one object per sample and field
    assert all(isinstance(values, torch.Tensor) for values in table.state()["columns"].values())
    # rows appended after a resume follow on
    back.append(
        {"aggregator": "root", "group": "z", "attack": "dense-ratio"},
        {**{f: 9 for f in ("round", "client", "sample", "label", "matched")}, **{f: 0.5 for f in FLOATS}},
        [True],
    )
    assert back.to_csv().splitlines()[-1].startswith("9,root,z,9,9,9,dense-ratio,9,0.5")


def test_an_older_checkpoints_row_list_reads_as_the_same_table() -> None:
    rows = _rows(12, 2)
    assert SampleTable.from_state(rows).to_csv() == _dict_writer(rows)
    assert len(SampleTable.from_state([])) == 0 and SampleTable.from_state([]).to_csv() == _dict_writer([])


def test_an_empty_tables_checkpoint_resumes_into_whole_numbers(tmp_path: Path) -> None:
    """Round 1's checkpoint is written before its scores are back: the empty table must resume with its
    columns' types, so the rows appended after the resume print as before."""
    path = tmp_path / "state.pt"
    save_checkpoint(path, {"rows": SampleTable().state()})
    resumed = SampleTable.from_state(torch.load(path, weights_only=True)["rows"])
    rows = _rows(8, 3)
    expected = _table(rows)
    _table(rows, resumed)
    assert resumed.column("round").dtype == np.int64 and resumed.to_csv() == expected.to_csv() == _dict_writer(rows)


def test_checkpoints_from_before_the_best_ssim_column_read_it_as_their_own_ssim() -> None:
    rows = _rows(9, 4)
    state = _table(rows).state()
    del state["columns"]["best_ssim"]
    resumed = SampleTable.from_state(state)
    assert np.array_equal(resumed.column("best_ssim"), [row["ssim"] for row in rows])
    older = [{key: value for key, value in row.items() if key != "best_ssim"} for row in rows]
    assert np.array_equal(SampleTable.from_state(older).column("best_ssim"), [row["ssim"] for row in rows])
