"""Reading runs back from MLflow for ``testbed report``: which runs, which policies, what leaked.

A *policy* is one client group's defence in one run, together with the run's model, attack and the
group's batch size. Leakage numbers come from each run's ``audits/samples.csv`` (one row per audited
sample); label accuracy and exact label histograms from the ``leakage/<group>/label_accuracy`` and
``label_histogram_exact`` metrics; utility from the last
logged ``test_accuracy``.
"""

from __future__ import annotations

import csv
import json
import math
import os
import tempfile
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from testbed.errors import UserError
from testbed.report.markup import code
from testbed.report.markup import text as plain

SWEEP_TAG = "testbed.sweep"
COMBINATION_TAG = "testbed.combination"
PARENT_TAG = "mlflow.parentRunId"
SAMPLES_ARTIFACT = "audits/samples.csv"
NOT_APPLICABLE_ARTIFACT = "audits/not_applicable.json"
NOT_IN_SETTING = tuple(
    "name seed sweep tracking. resources. evaluation. model. attack.name attack.labels_known attack.params.".split()
)
PROGRESS_BAR = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
_WORDS: dict[str, Any] = {"None": None, "True": True, "False": False}


@dataclass
class Selection:
    """The finished runs a target stands for, the run the report is attached to, and what was skipped."""

    target: str
    description: str
    runs: list[Any]
    log_run_id: str | None
    skipped: Counter[str] = field(default_factory=Counter)


@dataclass(frozen=True)
class Policy:
    """What a row of the leakage table is keyed by."""

    model: str
    attack: str
    defence: str
    batch_size: int
    setting: str = ""

    @property
    def label(self) -> str:
        """The defence, followed by any other setting that tells runs apart."""
        return f"{self.defence} [{self.setting}]" if self.setting else self.defence


@dataclass
class GroupResult:
    """One client group in one finished run: its policy, audited samples and the run's accuracy."""

    run_id: str
    run_name: str
    group: str
    policy: Policy
    accuracy: float
    avd: np.ndarray
    ssim: np.ndarray
    recovered: np.ndarray
    label_accuracy: float = math.nan
    label_histogram_exact: float = math.nan


@dataclass(frozen=True)
class Spread:
    """Mean, standard deviation and quartiles of one score over the recoverable samples."""

    mean: float = math.nan
    std: float = math.nan
    q1: float = math.nan
    median: float = math.nan
    q3: float = math.nan

    @classmethod
    def of(cls, values: np.ndarray) -> Spread:
        """The statistics of the finite entries of ``values`` (all NaN when there are none)."""
        finite = values[np.isfinite(values)]
        if finite.size == 0:
            return cls()
        q1, median, q3 = np.percentile(finite, [25, 50, 75])
        return cls(float(finite.mean()), float(finite.std()), float(q1), float(median), float(q3))


@dataclass
class LeakageRow:
    """One row of the leakage table: a policy at one batch size, pooled over the runs that share it."""

    policy: Policy
    samples: int
    avd: Spread
    ssim: Spread
    recovered_fraction: float
    unrecoverable: float
    label_accuracy: float
    accuracy: float
    run_ids: list[str]
    label_histogram_exact: float = math.nan


def open_store(uri: str) -> Any:
    """An ``MlflowClient`` for ``uri``; a missing sqlite file or an unreachable store is a UserError."""
    from mlflow.tracking import MlflowClient

    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///") :])
        if not path.is_file():
            raise UserError(f"--uri: no MLflow store at {path} (run an experiment first, or pass --uri)")
    elif "://" not in uri or uri.startswith("file:"):
        folder = Path(uri.removeprefix("file://").removeprefix("file:"))
        if not folder.is_dir():
            raise UserError(f"--uri: no MLflow store at {folder} (run an experiment first, or pass --uri)")
    try:
        client = MlflowClient(tracking_uri=uri)
        client.search_experiments(max_results=1)
    except Exception as exc:  # whatever the store raises, the address is the user's to fix
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise UserError(f"--uri: cannot read MLflow at {uri!r}: {first}") from None
    return client


def _search(client: Any, experiment_ids: list[str], filter_string: str = "") -> list[Any]:
    runs: list[Any] = []
    token = None
    while True:
        page = client.search_runs(experiment_ids, filter_string=filter_string, max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _children(client: Any, parent: Any) -> list[Any]:
    return _search(client, [parent.info.experiment_id], f"tags.`{PARENT_TAG}` = '{parent.info.run_id}'")


def _find_run(client: Any, target: str) -> Any | None:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(target)
    except MlflowException:
        return None


def select_runs(client: Any, target: str, uri: str) -> Selection:
    """Resolve an experiment name or a run id into the runs to report on (finished ones only)."""
    experiment = client.get_experiment_by_name(target)
    if experiment is not None:
        candidates: list[Any] = []
        parents = []
        for run in _search(client, [experiment.experiment_id]):
            if run.data.tags.get(SWEEP_TAG) == "parent":
                parents.append(run)
                candidates.extend(_children(client, run))
            elif PARENT_TAG not in run.data.tags:
                candidates.append(run)
        plain = [run for run in candidates if PARENT_TAG not in run.data.tags]
        owners = parents + plain
        log_run_id = owners[0].info.run_id if len(owners) == 1 else None
        description = f"experiment {code(target)} (sweeps: {len(parents)}, single runs: {len(plain)})"
        return _finished(target, description, candidates, log_run_id)
    run = _find_run(client, target)
    if run is None:
        known = sorted(item.name for item in client.search_experiments())
        raise UserError(
            f"no experiment or run {target!r} in {uri}; experiments there: {', '.join(known) or 'none'} "
            f"(browse their runs with `testbed ui --uri {uri}`)"
        )
    if run.data.tags.get(SWEEP_TAG) == "parent":
        description = f"sweep {code(run.info.run_name)} (parent run {code(run.info.run_id)})"
        return _finished(target, description, _children(client, run), run.info.run_id)
    return _finished(target, f"run {code(run.info.run_name)} ({code(run.info.run_id)})", [run], run.info.run_id)


def _finished(target: str, description: str, runs: list[Any], log_run_id: str | None) -> Selection:
    done = sorted((run for run in runs if run.info.status == "FINISHED"), key=lambda run: run.info.start_time)
    skipped = Counter(run.info.status for run in runs if run.info.status != "FINISHED")
    return Selection(target, description, done, log_run_id, skipped)


def param_value(text: str) -> Any:
    """A flattened parameter back as data: JSON numbers, lists and objects, None/True/False, else text."""
    if text in _WORDS:
        return _WORDS[text]
    try:
        return json.loads(text)
    except ValueError:
        return text


def groups_of(params: Mapping[str, str]) -> list[str]:
    """The client group names of a run, read from its ``clients.<group>.count`` parameters."""
    names = [
        key[len("clients.") : -len(".count")] for key in params if key.startswith("clients.") and key.endswith(".count")
    ]
    return [name for name in names if f"clients.{name}.batch_size" in params]


def describe_model(params: Mapping[str, str]) -> str:
    """The model's name with its activation (none for softmax regression); for an MLP also its hidden widths."""
    name = params.get("model.name", "?")
    activation = params.get("model.activation")
    if name == "softmax" or activation in (None, "None"):
        return name
    if name != "mlp":
        return f"{name} {activation}"
    hidden = param_value(params.get("model.hidden", "[]"))
    widths = ",".join(str(width) for width in hidden) if isinstance(hidden, list) else str(hidden)
    return f"mlp {activation} [{widths}]"


def describe_attack(params: Mapping[str, str]) -> str:
    """The attack's name with its parameters ('none' when the run had no audits), noting public labels."""
    name = params.get("attack.name")
    if name is None:
        return "none"
    listed = param_value(name)
    if isinstance(listed, list):  # a portfolio: its worst case
        name = "worst case of " + ", ".join(str(item) for item in listed)
    settings = sorted(
        (key.removeprefix("attack.params."), value) for key, value in params.items() if key.startswith("attack.params.")
    )
    if settings:
        name += "(" + ", ".join(f"{key}={value}" for key, value in settings) + ")"
    return f"{name} (labels known)" if params.get("attack.labels_known") == "True" else name


def defence_spec(params: Mapping[str, str], group: str) -> dict[str, Any]:
    """The group's ``defence`` block rebuilt from its flattened parameters."""
    prefix = f"clients.{group}.defence."
    spec: dict[str, Any] = {}
    for key, text in sorted(params.items()):
        if not key.startswith(prefix):
            continue
        *parents, leaf = key[len(prefix) :].split(".")
        node = spec
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = param_value(text)
    return spec


def _short(value: Any) -> str:
    return json.dumps(value) if isinstance(value, list | dict) else str(value)


def _part(described: Mapping[str, Any]) -> str:
    values = {key: value for key, value in described.items() if key != "name" and value is not None}
    if not values:
        return str(described["name"])
    if len(values) == 1:
        return f"{described['name']}({_short(next(iter(values.values())))})"
    return f"{described['name']}(" + ", ".join(f"{key}={_short(value)}" for key, value in values.items()) + ")"


def _names_code(value: Any) -> bool:
    """Whether a stored defence block holds a dotted or colon name anywhere (keys included): an import path."""
    from defenses.registry import is_import_path

    if isinstance(value, str):
        return is_import_path(value)
    if isinstance(value, Mapping):
        return any(_names_code(key) or _names_code(item) for key, item in value.items())
    if isinstance(value, list):
        return any(_names_code(item) for item in value)
    return False


def _stored_part(value: Any) -> str:
    """One defence part as stored: 'name', or 'name(parameters)' for a one-key mapping."""
    if isinstance(value, Mapping) and len(value) == 1:
        name, params = next(iter(value.items()))
        return f"{name}({_short(params)})" if params else str(name)
    return _short(value)


def stored_defence(spec: Mapping[str, Any]) -> str:
    """The defence as its stored names and parameters read ('batching / loss / transform / ...'), nothing imported."""
    if spec.get("dp") is not None:
        parts = [_stored_part({"dp": spec["dp"]})]
    else:
        parts = [_stored_part(spec.get("batching", "random"))]
    parts.append(_stored_part(spec.get("loss", "cross-entropy")))
    update = spec.get("update")
    parts += [_stored_part(item) for item in update] if isinstance(update, list) else []
    return " / ".join(parts)


def describe_defence(spec: Mapping[str, Any]) -> str:
    """'batching / loss / transform(parameter) / ...', with defaults filled in and names made canonical.

    The spec comes from a tracking store, which is data: only registry names are looked up (that imports
    nothing); a block naming a class by import path is shown as stored (``stored_defence``), never imported.
    """
    from defenses import DefenceConfigError, build_policy

    if _names_code(spec):
        return stored_defence(spec)
    try:
        described = build_policy(spec).describe()
    except (DefenceConfigError, ImportError, TypeError, ValueError):
        return stored_defence(spec)
    parts = [described["batching"], described["loss"], *described["update"]]
    if "dp" in described:  # DP-SGD: Poisson batches, per-example clipping and noise before any transform
        parts = [described["dp"], described["loss"], *described["update"]]
    return " / ".join(_part(part) for part in parts)


def _setting(params: Mapping[str, str], group: str, varying: Iterable[str]) -> str:
    own = f"clients.{group}."
    keys = []
    for key in sorted(varying):
        if key.startswith(NOT_IN_SETTING):
            continue
        if key.startswith("clients.") and (
            not key.startswith(own) or key == own + "batch_size" or key.startswith(own + "defence.")
        ):
            continue
        keys.append(f"{key}={params.get(key, '-')}")
    return ", ".join(keys)


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return math.nan


def _download(client: Any, run_id: str, artifact: str, folder: str) -> Path | None:
    parent = artifact.rsplit("/", 1)[0]
    if artifact not in {item.path for item in client.list_artifacts(run_id, parent)}:
        return None
    quiet = os.environ.get(PROGRESS_BAR)
    os.environ[PROGRESS_BAR] = "false"
    try:
        return Path(client.download_artifacts(run_id, artifact, folder))
    finally:
        if quiet is None:
            os.environ.pop(PROGRESS_BAR)
        else:
            os.environ[PROGRESS_BAR] = quiet


def _weighted_label_accuracy(client: Any, run_id: str, group: str, metric: str = "label_accuracy") -> float:
    """A per-round label metric of a group averaged over its audited rounds, weighted by audited samples."""
    history = client.get_metric_history(run_id, f"leakage/{group}/{metric}")
    if not history:
        return math.nan
    counts = {item.step: item.value for item in client.get_metric_history(run_id, f"leakage/{group}/n")}
    weights = np.array([counts.get(item.step, 1.0) for item in history])
    values = np.array([item.value for item in history])
    return float((weights * values).sum() / weights.sum()) if weights.sum() > 0 else math.nan


def read_results(client: Any, runs: list[Any]) -> tuple[list[GroupResult], list[str]]:
    """Every client group of every run with its audited samples; and notes on what could not be scored."""
    varying = {
        key
        for key in {key for run in runs for key in run.data.params}
        if len({run.data.params.get(key) for run in runs}) > 1
    }
    results: list[GroupResult] = []
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="testbed-report-") as folder:
        for run in runs:
            params, run_id = run.data.params, run.info.run_id
            samples: dict[str, list[dict[str, str]]] = defaultdict(list)
            path = _download(client, run_id, SAMPLES_ARTIFACT, folder)
            if path is not None:
                with path.open(newline="", encoding="utf-8") as handle:
                    for row in csv.DictReader(handle):
                        samples[row["group"]].append(row)
            skipped = _download(client, run_id, NOT_APPLICABLE_ARTIFACT, folder)
            if skipped is not None:
                reasons = json.loads(skipped.read_text(encoding="utf-8"))
                for reason, count in sorted(reasons.items()):
                    notes.append(
                        f"run {code(run.info.run_name)}: attack not applicable to {plain(count)} audited updates "
                        f"({plain(reason)})"
                    )
            accuracy = run.data.metrics.get("test_accuracy", math.nan)
            model, attack = describe_model(params), describe_attack(params)
            for group in groups_of(params):
                rows = samples.get(group, [])
                policy = Policy(
                    model,
                    attack,
                    describe_defence(defence_spec(params, group)),
                    int(param_value(params[f"clients.{group}.batch_size"])),
                    _setting(params, group, varying),
                )
                results.append(
                    GroupResult(
                        run_id,
                        run.info.run_name,
                        group,
                        policy,
                        accuracy,
                        np.array([_float(row["avd"]) for row in rows], dtype=np.float64),
                        np.array([_float(row["ssim"]) for row in rows], dtype=np.float64),
                        np.array([row["recovered"] == "True" for row in rows], dtype=bool),
                        _weighted_label_accuracy(client, run_id, group),
                        _weighted_label_accuracy(client, run_id, group, "label_histogram_exact"),
                    )
                )
    return results, notes


def _nanmean(values: Iterable[float]) -> float:
    finite = [value for value in values if math.isfinite(value)]
    return float(np.mean(finite)) if finite else math.nan


def leakage_rows(results: list[GroupResult]) -> list[LeakageRow]:
    """One row per policy (model, attack, defence, batch size, setting), pooling the samples of its runs."""
    pooled: dict[Policy, list[GroupResult]] = defaultdict(list)
    for result in results:
        pooled[result.policy].append(result)
    rows = []
    for policy, members in pooled.items():
        avd = np.concatenate([member.avd for member in members])
        recoverable = np.isfinite(avd)
        ssim = np.concatenate([member.ssim for member in members])[recoverable]
        flags = np.concatenate([member.recovered for member in members])
        rows.append(
            LeakageRow(
                policy=policy,
                samples=int(avd.size),
                avd=Spread.of(avd),
                ssim=Spread.of(ssim),
                recovered_fraction=float(flags.mean()) if flags.size else math.nan,
                unrecoverable=float((~recoverable).mean()) if avd.size else math.nan,
                label_accuracy=_nanmean(member.label_accuracy for member in members),
                accuracy=_nanmean({member.run_id: member.accuracy for member in members}.values()),
                run_ids=sorted({member.run_id for member in members}),
                label_histogram_exact=_nanmean(member.label_histogram_exact for member in members),
            )
        )
    return sorted(rows, key=lambda row: (row.policy.model, row.policy.attack, row.policy.label, row.policy.batch_size))
