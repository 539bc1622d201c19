"""``testbed report`` for a study run: fetch its tables from MLflow and write the report (and the page)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from testbed.errors import UserError
from testbed.study.page import write_report
from testbed.study.runner import STUDY_TAG, checkout_commit
from testbed.study.spec import StudySpec


def is_study_run(target: str, uri: str) -> bool:
    """Whether ``target`` is the id of a run ``testbed study`` made (tagged ``testbed.study``)."""
    from mlflow.tracking import MlflowClient

    try:
        run = MlflowClient(tracking_uri=uri).get_run(target)
    except Exception:
        return False
    return STUDY_TAG in run.data.tags


def study_report(target: str, *, uri: str, out: Path, page: Path | None) -> Path:
    """Download the study's tables from run ``target`` at ``uri``; write the report to ``out`` (and ``page``)."""
    import yaml
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(target)
    if run.info.status != "FINISHED":
        raise UserError(f"report: study run {target} is {run.info.status}, not FINISHED; its tables are incomplete")
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(client.download_artifacts(target, "study", scratch))
        spec_text = Path(client.download_artifacts(target, "study.yaml", scratch)).read_text(encoding="utf-8")
        spec = StudySpec.model_validate(yaml.safe_load(spec_text))
        command = f"testbed report {target} --uri {uri} --out {out}" + (f" --page {page}" if page else "")
        return write_report(folder, out, page, spec.baseline, spec.audit.bootstrap, f"`{command}`{_at_commit()}")


def _at_commit() -> str:
    """', at commit <hash>' of the checkout the testbed runs from, when it is one."""
    found = checkout_commit(Path(__file__).parent)
    return f" at commit `{found[0]}`" if found is not None else ""
