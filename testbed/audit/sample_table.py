"""Every audited sample's scores as columns: what ``samples.csv`` holds, kept compactly for the run.

A run audits tens of thousands of samples a round and checkpoints after every round, so the table is
stored by column: numbers in numpy arrays (one block per scored client, joined when read), names
(aggregator, group, attack) as codes into a short vocabulary. A checkpoint then holds a few tensors
instead of one Python object per sample and field, whose pickling grew with the run (every round
re-wrote every earlier row).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

from metrics import METRIC_NAMES

NAMES = ("aggregator", "group", "attack")
"""Columns of names, stored as codes into a vocabulary."""
INTEGERS = ("round", "client", "sample", "label", "matched")
"""Columns of whole numbers."""
BASELINES = tuple(f"{name}_baseline" for name in METRIC_NAMES)
"""The best no-information baseline's score per metric (empty in the CSV where no baseline was drawn)."""
BEST_SSIM = "best_ssim"
"""Per sample, the highest SSIM any attack reached: the kept reconstruction's SSIM unless a portfolio's worst
case kept another attack's (recovered by AVD) for it. The SSIM ladder counts this against ``ssim_baseline``."""
FLOATS = (*METRIC_NAMES, BEST_SSIM, *BASELINES)
"""Columns of scores."""
CSV_FIELDS = ("round", "aggregator", "group", "client", "sample", "label", "attack", "matched", *FLOATS, "recovered")
"""The columns of ``samples.csv``, in order."""


DTYPES: dict[str, type] = {
    "recovered": np.bool_,
    **{column: np.int32 for column in NAMES},
    **{column: np.int64 for column in INTEGERS},
    **{column: np.float64 for column in FLOATS},
}
"""Each stored column's type (names as int32 codes)."""


class SampleTable:
    """Rows of audited samples (``CSV_FIELDS``), appended a scored client at a time and read by column."""

    def __init__(self) -> None:
        self.vocabulary: dict[str, list[str]] = {name: [] for name in NAMES}
        self._blocks: list[dict[str, np.ndarray]] = []
        self._joined: dict[str, np.ndarray] | None = None

    def __len__(self) -> int:
        return sum(len(block["round"]) for block in self._blocks)

    def _code(self, column: str, value: str) -> int:
        words = self.vocabulary[column]
        if value not in words:
            words.append(value)
        return words.index(value)

    def append(self, names: dict[str, str | Sequence[str]], numbers: dict[str, Any], recovered: Any) -> None:
        """Add the rows of one scored client: ``names`` per NAMES column (one name for every row, or one per
        row), ``numbers`` per INTEGERS and FLOATS column (arrays of the rows' length, or one value for all;
        NaN for a missing baseline), ``recovered`` a boolean per row."""
        flags = np.asarray(recovered, dtype=bool)
        count = len(flags)
        block: dict[str, np.ndarray] = {"recovered": flags}
        for column in NAMES:
            value = names[column]
            codes = (
                [self._code(column, value)] * count
                if isinstance(value, str)
                else [self._code(column, item) for item in value]
            )
            block[column] = np.asarray(codes, dtype=np.int32).reshape(count)
        for column in INTEGERS:
            block[column] = np.broadcast_to(np.asarray(numbers[column], dtype=np.int64), (count,)).copy()
        for column in FLOATS:
            block[column] = np.broadcast_to(np.asarray(numbers[column], dtype=np.float64), (count,)).copy()
        self._blocks.append(block)
        self._joined = None

    def column(self, name: str) -> np.ndarray:
        """One column of every row so far (codes for a NAMES column)."""
        if self._joined is None:
            self._joined = {
                field: np.concatenate([block[field] for block in self._blocks]).astype(dtype, copy=False)
                if self._blocks
                else np.zeros(0, dtype=dtype)
                for field, dtype in DTYPES.items()
            }
            self._blocks = [self._joined] if self._blocks else []
        return self._joined[name]

    def names(self, column: str) -> list[str]:
        """A NAMES column as strings."""
        words = self.vocabulary[column]
        return [words[code] for code in self.column(column).tolist()]

    def to_csv(self) -> str:
        """The rows as CSV text with the CSV_FIELDS header (an empty cell for a missing baseline)."""
        columns: list[Iterable[Any]] = []
        for field in CSV_FIELDS:
            if field in NAMES:
                columns.append(self.names(field))
            elif field in BASELINES:
                values = self.column(field)
                columns.append(["" if np.isnan(v) else v for v in values.tolist()])
            else:
                columns.append(self.column(field).tolist())
        text = io.StringIO()
        writer = csv.writer(text, lineterminator="\r\n")
        writer.writerow(CSV_FIELDS)
        writer.writerows(zip(*columns, strict=True))
        return text.getvalue()

    def state(self) -> dict[str, Any]:
        """The table as tensors and vocabularies, what a checkpoint keeps (``torch.load(weights_only=True)``)."""
        return {
            "vocabulary": {column: list(words) for column, words in self.vocabulary.items()},
            "columns": {field: torch.from_numpy(self.column(field).copy()) for field in DTYPES},
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> SampleTable:
        """The table ``state`` describes (also a list of row dicts, as older checkpoints kept)."""
        table = cls()
        if isinstance(state, list):
            for row in state:
                row = {BEST_SSIM: row["ssim"], **row}  # rows kept before the column: their own SSIM
                table.append(
                    {column: str(row.get(column, "")) for column in NAMES},
                    {
                        **{column: row[column] for column in INTEGERS},
                        **{column: np.nan if row.get(column, "") == "" else row[column] for column in FLOATS},
                    },
                    [bool(row["recovered"])],
                )
            return table
        if not state:
            return table
        table.vocabulary = {column: list(state["vocabulary"][column]) for column in NAMES}
        stored = dict(state["columns"])
        stored.setdefault(BEST_SSIM, stored["ssim"])  # a checkpoint from before the column: their own SSIM
        columns = {field: stored[field].numpy().astype(dtype) for field, dtype in DTYPES.items()}
        if len(columns["round"]):
            table._blocks = [columns]
        return table
