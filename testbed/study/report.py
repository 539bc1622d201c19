"""``testbed report`` for a study: its tables from an MLflow run or a folder, then the report (and the page).

A folder target holds the tables ``testbed study`` writes and the study file as ``study.yaml``
(docs/results/tables is the committed study's).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from pydantic import ValidationError

from testbed.config.topology import load_yaml_text
from testbed.errors import UserError
from testbed.study.page import write_report
from testbed.study.runner import STUDY_TAG, checkout_commit
from testbed.study.spec import StudySpec


def is_study_run(target: str, uri: str) -> bool:
    """Whether ``target`` is a study's tables folder or the id of a run ``testbed study`` made (tagged
    ``testbed.study``)."""
    if _is_tables(Path(target)):
        return True
    from mlflow.tracking import MlflowClient

    try:
        run = MlflowClient(tracking_uri=uri).get_run(target)
    except Exception:
        return False
    return STUDY_TAG in run.data.tags


def study_report(target: str, *, uri: str, out: Path, page: Path | None) -> Path:
    """Read the study's tables from the folder ``target`` or download them from run ``target`` at ``uri``;
    write the report to ``out`` (and ``page``)."""
    from mlflow.tracking import MlflowClient

    if _is_tables(Path(target)):
        folder = Path(target)
        spec = _stored_spec((folder / "study.yaml").read_text(encoding="utf-8"), str(folder / "study.yaml"))
        command = f"testbed report {target} --out {out}" + (f" --page {page}" if page else "")
        return write_report(folder, out, page, spec, f"`{command}`{_at_commit()}")

    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(target)
    if run.info.status != "FINISHED":
        raise UserError(f"report: study run {target} is {run.info.status}, not FINISHED; its tables are incomplete")
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(client.download_artifacts(target, "study", scratch))
        spec_text = Path(client.download_artifacts(target, "study.yaml", scratch)).read_text(encoding="utf-8")
        spec = _stored_spec(spec_text, f"study.yaml of run {target}")
        command = f"testbed report {target} --uri {uri} --out {out}" + (f" --page {page}" if page else "")
        return write_report(folder, out, page, spec, f"`{command}`{_at_commit()}")


def _is_tables(folder: Path) -> bool:
    """A folder with a study's audits table and its study file."""
    return (folder / "audits.csv").is_file() and (folder / "study.yaml").is_file()


def _stored_spec(text: str, source: str) -> StudySpec:
    """The study file read back with the report, as data: parsed with the capped safe loader and checked
    against the study schema, which only compares names and numbers (nothing it names, policies, models or
    defences, is built or imported)."""
    data, _ = load_yaml_text(text, source)
    try:
        return StudySpec.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "study"
        raise UserError(f"report: {source}: {where}: {first['msg']}") from None


def _at_commit() -> str:
    """', at commit <hash>' of the checkout the testbed runs from, when it is one."""
    found = checkout_commit(Path(__file__).parent)
    return f" at commit `{found[0]}`" if found is not None else ""
