"""``testbed report`` for a study run: fetch its tables from MLflow and write the report (and the page)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from testbed.config.topology import load_yaml_text
from testbed.errors import UserError
from testbed.study.page import write_report
from testbed.study.runner import STUDY_TAG, checkout_commit
from testbed.study.spec import AuditPlan

DEFAULT_BOOTSTRAP = int(AuditPlan.model_fields["bootstrap"].default)
MIN_BOOTSTRAP = 100
MAX_BOOTSTRAP = 1_000_000


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
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(target)
    if run.info.status != "FINISHED":
        raise UserError(f"report: study run {target} is {run.info.status}, not FINISHED; its tables are incomplete")
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(client.download_artifacts(target, "study", scratch))
        spec_text = Path(client.download_artifacts(target, "study.yaml", scratch)).read_text(encoding="utf-8")
        baseline, bootstrap = _stored_settings(spec_text, target)
        command = f"testbed report {target} --uri {uri} --out {out}" + (f" --page {page}" if page else "")
        return write_report(folder, out, page, baseline, bootstrap, f"`{command}`{_at_commit()}")


def _stored_settings(text: str, target: str) -> tuple[str, int]:
    """The baseline policy and bootstrap count of a study file read back from the store.

    The stored study.yaml is data: it is parsed with the capped safe loader and only these two values
    are read; nothing it names (policies, models, defences) is validated, built or imported.
    """
    source = f"study.yaml of run {target}"
    data, _ = load_yaml_text(text, source)
    audit = data.get("audit") if isinstance(data, dict) else None
    baseline = data.get("baseline") if isinstance(data, dict) else None
    bootstrap = audit.get("bootstrap", DEFAULT_BOOTSTRAP) if isinstance(audit, dict) else DEFAULT_BOOTSTRAP
    if not isinstance(baseline, str) or not isinstance(bootstrap, int) or isinstance(bootstrap, bool):
        raise UserError(f"report: {source} has no baseline policy name or a bootstrap count that is not a number")
    if not MIN_BOOTSTRAP <= bootstrap <= MAX_BOOTSTRAP:
        raise UserError(f"report: {source}: audit.bootstrap {bootstrap} is outside {MIN_BOOTSTRAP}..{MAX_BOOTSTRAP}")
    return baseline, bootstrap


def _at_commit() -> str:
    """', at commit <hash>' of the checkout the testbed runs from, when it is one."""
    found = checkout_commit(Path(__file__).parent)
    return f" at commit `{found[0]}`" if found is not None else ""
