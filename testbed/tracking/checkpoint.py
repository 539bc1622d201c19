"""Per-round checkpoints of a run, written atomically and read back as data.

A checkpoint is data that people share: reading one never imports or calls anything it names. Its
tensors are read with ``weights_only=True`` (no unpickling of code), its structure is checked before
anything uses it, and the configuration it stores is only taken as the run's configuration (which may
name models, data sets and defences to import) after an explicit ``--trust-checkpoint``, unless it
names no code at all.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from testbed.errors import UserError

if TYPE_CHECKING:
    from testbed.config.schema import Experiment

FILE_NAME = "state.pt"
REQUIRED = ("round", "params", "history", "config")


def checkpoint_path(folder: str | Path, run_id: str) -> Path:
    """Where the checkpoint of a run lives."""
    return Path(folder) / run_id / FILE_NAME


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically: a crash leaves the previous checkpoint intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".tmp")
    torch.save(state, partial)
    with open(partial, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(partial, path)


def _first_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())[:200]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True`` and check its structure; a bad file is a UserError naming it."""
    if not path.is_file():
        raise UserError(f"--resume: no checkpoint at {path} (is the run id right, and the checkpoints folder?)")
    try:
        state: Any = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:  # whatever the file holds, it is not a checkpoint this testbed wrote
        raise UserError(
            f"--resume: {path} is not a readable checkpoint ({type(exc).__name__}: not a file of tensors and "
            "plain data as this testbed writes them)"
        ) from None
    problem = checkpoint_problem(state)
    if problem is not None:
        raise UserError(f"--resume: {path} is not a checkpoint of this testbed: {problem}")
    checked: dict[str, Any] = state
    return checked


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def checkpoint_problem(state: Any) -> str | None:
    """What is wrong with the structure of a loaded checkpoint, or None when it is one this testbed writes."""
    if not isinstance(state, dict):
        return f"expected a mapping, found {type(state).__name__}"
    missing = [key for key in REQUIRED if key not in state]
    if missing:
        return f"no {', '.join(missing)}"
    rounds = state["round"]
    if not isinstance(rounds, int) or isinstance(rounds, bool) or rounds < 0:
        return f"round must be a count of rounds, found {rounds!r:.50}"
    params = state["params"]
    if not isinstance(params, dict) or not params:
        return "params must be a mapping of parameter names to tensors"
    for name, tensor in params.items():
        if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
            return f"params: {name!r:.50} is not a named tensor"
    if not isinstance(state["config"], dict):
        return "config must be a mapping (the resolved topology)"
    history = state["history"]
    if not isinstance(history, list) or not all(_metric_row(row) for row in history):
        return "history must be a list of rows of metric names and numbers"
    pending = state.get("pending_metrics", [])
    if not isinstance(pending, list) or not all(_pending_entry(entry) for entry in pending):
        return "pending_metrics must be a list of (run id, step, metrics)"
    return _audits_problem(state.get("audits", {}))


def _metric_row(row: Any) -> bool:
    return isinstance(row, dict) and all(isinstance(key, str) and _number(value) for key, value in row.items())


def _pending_entry(entry: Any) -> bool:
    return (
        isinstance(entry, list | tuple)
        and len(entry) == 3
        and isinstance(entry[0], str)
        and isinstance(entry[1], int)
        and _metric_row(entry[2])
    )


def _audits_problem(audits: Any) -> str | None:
    """Whether the audit state reads back as sample tables (tried here, before anything starts)."""
    from testbed.audit.sample_table import SampleTable

    if not isinstance(audits, dict):
        return "audits must be a mapping"
    try:
        for key in ("rows", "attack_rows"):
            SampleTable.from_state(audits.get(key, []))
        counts = audits.get("not_applicable", {})
        if not isinstance(counts, dict) or not all(
            isinstance(key, str) and _number(value) and math.isfinite(value) for key, value in counts.items()
        ):
            return "audits.not_applicable must map reasons to counts"
        grids = audits.get("grids", [])
        if not isinstance(grids, list) or not all(isinstance(grid, str) for grid in grids):
            return "audits.grids must be a list of artifact paths"
        if not _precision_state(audits.get("precision", {})):
            return "audits.precision must map groups to each window's audited fractions and the round it met the target"
    except Exception as exc:  # any failure to rebuild the tables means the audit state is not ours
        return f"audits cannot be read back ({_first_line(exc)})"
    return None


def _precision_state(state: Any) -> bool:
    """Whether a precision target's state is ours: ``observed`` group -> window -> fractions in [0, 1] and
    ``reached`` group -> window -> round (windows written as whole numbers in strings)."""
    if not isinstance(state, dict) or set(state) - {"observed", "reached"}:
        return False

    def windows(by_group: Any, ok: Any) -> bool:
        return isinstance(by_group, dict) and all(
            isinstance(group, str)
            and isinstance(by_window, dict)
            and all(isinstance(w, str) and w.isdigit() and ok(v) for w, v in by_window.items())
            for group, by_window in by_group.items()
        )

    def fractions(values: Any) -> bool:
        return isinstance(values, list) and all(_number(v) and 0.0 <= v <= 1.0 for v in values)

    return windows(state.get("observed", {}), fractions) and windows(
        state.get("reached", {}), lambda r: isinstance(r, int) and not isinstance(r, bool) and r >= 0
    )


def _strings(value: Any) -> Iterator[str]:
    """Every string in a nested structure, keys included."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from _strings(key)
            yield from _strings(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _strings(item)


def code_references(config: Mapping[str, Any]) -> list[str]:
    """The fields of a stored configuration that name Python code to import (``field=name``).

    Built-in models, data sets, defence parts and attacks are looked up in registries and import
    nothing; an import path (``package.module:callable``) in ``model.name``, ``dataset.name`` or a
    defence block would. Defence blocks are searched for any dotted or colon name, keys included.
    """
    from defenses.import_path import is_import_path
    from defenses.registry import is_import_path as names_defence_class

    found = []
    for block in ("model", "dataset"):
        section = config.get(block)
        name = section.get("name") if isinstance(section, Mapping) else None
        if isinstance(name, str) and is_import_path(name):
            found.append(f"{block}.name={name}")
    clients = config.get("clients")
    for index, group in enumerate(clients if isinstance(clients, list) else []):
        defence = group.get("defence") if isinstance(group, Mapping) else None
        for text in _strings(defence):
            if names_defence_class(text):
                found.append(f"clients[{index}].defence={text}")
    return found


def experiment_from_checkpoint(
    folder: str | Path, run_id: str, overrides: Sequence[str] = (), *, trust: bool = False
) -> Experiment:
    """The configuration a checkpointed run was started with (``--set`` may still change ``rounds``).

    A configuration that names code to import is refused unless ``trust`` (``--trust-checkpoint``):
    the checkpoint is data, and the topology file is where code is named.
    """
    from testbed.config.topology import apply_overrides, validate

    path = checkpoint_path(folder, run_id)
    state = load_checkpoint(path)
    named = code_references(state["config"])
    if named and not trust:
        shown = ", ".join(named[:3]) + (f" and {len(named) - 3} more" if len(named) > 3 else "")
        raise UserError(
            f"--resume: the configuration stored in {path} names code to import ({shown}); a checkpoint is "
            f"data and is not trusted to name code: pass the topology file (testbed run FILE --resume {run_id}), "
            "or --trust-checkpoint if you trust whoever wrote it"
        )
    data = apply_overrides(dict(state["config"]), overrides)
    return validate(data, source=f"{path} (stored configuration)")
