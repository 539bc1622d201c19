"""MLflow tracking of a run: parameters, per-round metrics, artifacts.

Uses ``MlflowClient`` directly (no global active-run state), so parent and child runs of a sweep and
several runs in one process stay independent.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from testbed.config.flat import flatten as flatten  # re-exported: the parameters a run logs
from testbed.config.schema import Experiment
from testbed.errors import UserError

MAX_RUN_NAME_LENGTH = 250  # the run name column of MLflow's SQL stores
RETRY_DELAYS_S = (0.5, 2.0)
MAX_RETRY_DELAY_S = 10.0
QUEUED_AT_KEY = "__queued_at_ms__"  # in a queued entry: its MLflow timestamp, fixed when it was queued

T = TypeVar("T")


class TrackingUnavailable(RuntimeError):
    """MLflow stayed unreachable longer than the configured outage allowance."""


def _reason(exc: Exception) -> str:
    """The gist of a failure to reach a store: the operating system's reason where there is one."""
    text = str(exc).strip()
    system = re.search(r"\[Errno -?\d+\] ([^\"')\]]+)", text)
    if system is not None:
        return system.group(1).strip()
    if "timed out" in text.lower():
        return "no answer (timed out)"
    return text.splitlines()[0][:200] if text else type(exc).__name__


def _artifact_uri(location: str) -> str:
    return Path(location).resolve().as_uri() if "://" not in location else location


class Tracker:
    """One MLflow tracking store and experiment; opens runs and logs into them."""

    def __init__(self, uri: str, experiment: str, artifact_location: str, outage_s: float = 300.0) -> None:
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # stdout is the run's JSON line
        from mlflow.tracking import MlflowClient

        self.outage_s = outage_s
        self.pending: list[tuple[str, int, dict[str, float]]] = []
        self.down_since: float | None = None
        self.uri = uri
        self.experiment_name = experiment
        self.artifact_location = artifact_location
        try:
            self.client = MlflowClient(tracking_uri=uri)
        except Exception as exc:  # a store MLflow cannot open is the user's address to fix
            raise UserError(f"tracking.uri: MLflow cannot open {uri!r}: {_reason(exc)}") from None
        self.experiment_id: str | None = None

    @classmethod
    def for_experiment(cls, experiment: Experiment) -> Tracker:
        """The tracker an experiment's ``tracking`` block describes."""
        tracking = experiment.tracking
        return cls(tracking.uri, experiment.experiment_name, tracking.artifact_location, tracking.outage_s)

    def check(self) -> None:
        """Fail fast, in one line, when the tracking store cannot be reached or opened."""
        previous = {
            key: os.environ.get(key) for key in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")
        }
        os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
        os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = "5"
        try:
            self.client.search_experiments(max_results=1)
        except Exception as exc:  # any failure to reach the store is the user's address to fix
            raise UserError(f"tracking.uri: cannot reach MLflow at {self.uri!r}: {_reason(exc)}") from None
        finally:
            for key, value in previous.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value

    def ensure_experiment(self) -> str:
        """The experiment id, creating the experiment (with its artifact location) if needed."""
        if self.experiment_id is None:
            found = self.client.get_experiment_by_name(self.experiment_name)
            if found is None:
                self.experiment_id = self.client.create_experiment(
                    self.experiment_name, artifact_location=_artifact_uri(self.artifact_location)
                )
            else:
                self.experiment_id = found.experiment_id
        return self.experiment_id

    def start_run(
        self,
        name: str,
        params: Mapping[str, str],
        parent_run_id: str | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> str:
        """Create a run (a child of ``parent_run_id`` when given) with its parameters; return its id."""
        from mlflow.entities import Param

        name = name[:MAX_RUN_NAME_LENGTH]
        all_tags = {"mlflow.runName": name, **(tags or {})}
        if parent_run_id is not None:
            all_tags["mlflow.parentRunId"] = parent_run_id
        run = self.client.create_run(self.ensure_experiment(), tags=all_tags, run_name=name)
        run_id = str(run.info.run_id)
        entries = [Param(key, value) for key, value in params.items()]
        try:
            for start in range(0, len(entries), 100):
                self.client.log_batch(run_id, params=entries[start : start + 100])
        except BaseException:  # a run whose parameters were refused is closed, not left RUNNING
            with contextlib.suppress(Exception):
                self.client.set_terminated(run_id, status="FAILED")
            raise
        return run_id

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int) -> None:
        """Queue numeric metrics at ``step`` (non-finite values are skipped) and flush the queue.

        While MLflow is unreachable the metrics stay queued (``pending``) and are sent with the next
        successful flush; past ``outage_s`` of continuous failure, TrackingUnavailable is raised.
        """
        self.queue(run_id, metrics, step)
        self.flush()

    def queue(self, run_id: str, metrics: Mapping[str, float], step: int) -> None:
        """Add metrics to the queue without sending them (non-finite values are skipped).

        The entry records when it was queued, so a second delivery of it (after a resume from a
        checkpoint taken before the first one, or when a reply was lost) is the same MLflow record,
        which the SQL stores keep once.
        """
        finite = {
            key: float(value) for key, value in metrics.items() if value == value and abs(float(value)) != float("inf")
        }
        finite[QUEUED_AT_KEY] = float(int(time.time() * 1000))
        self.pending.append((run_id, step, finite))

    def flush(self) -> None:
        """Send queued metrics, retrying with back-off; raise TrackingUnavailable after a long outage."""
        from mlflow.entities import Metric

        for attempt, delay in enumerate((0.0, *RETRY_DELAYS_S)):
            time.sleep(delay)
            try:
                while self.pending:
                    run_id, step, values = self.pending[0]
                    stamp = int(values.get(QUEUED_AT_KEY, time.time() * 1000))
                    entries = [Metric(key, value, stamp, step) for key, value in values.items() if key != QUEUED_AT_KEY]
                    for start in range(0, len(entries), 500):
                        self.client.log_batch(run_id, metrics=entries[start : start + 500])
                    self.pending.pop(0)
                self.down_since = None
                return
            except Exception:  # an unreachable store shows up as many exception types
                if attempt == len(RETRY_DELAYS_S):
                    break
        self.down_since = self.down_since or time.monotonic()
        if time.monotonic() - self.down_since > self.outage_s:
            raise TrackingUnavailable(
                f"MLflow at {self.uri} unreachable for over {self.outage_s:g} s; {len(self.pending)} rounds of "
                "metrics are kept in the checkpoint"
            )

    def _patiently(self, call: Callable[[], T]) -> T:
        """Make one MLflow call, waiting out an outage: retry with back-off while the store does not answer.

        An error from a store that answers is raised at once. The outage clock is the one ``flush``
        keeps, so a run that is already waiting does not wait twice; past ``outage_s``,
        TrackingUnavailable is raised.
        """
        delay = RETRY_DELAYS_S[0]
        while True:
            try:
                result = call()
            except Exception as exc:  # an unreachable store shows up as many exception types
                self.down_since = self.down_since or time.monotonic()
                if self._answers():
                    self.down_since = None
                    raise
                if time.monotonic() - self.down_since > self.outage_s:
                    raise TrackingUnavailable(f"MLflow at {self.uri} unreachable for over {self.outage_s:g} s") from exc
                time.sleep(delay)
                delay = min(2 * delay, MAX_RETRY_DELAY_S)
                continue
            self.down_since = None
            return result

    def _answers(self) -> bool:
        """Whether the tracking store answers a trivial query."""
        try:
            self.client.search_experiments(max_results=1)
        except Exception:  # any failure means it does not answer
            return False
        return True

    def log_text(self, run_id: str, text: str, name: str) -> None:
        """Store ``text`` as an artifact file ``name`` (waiting out an MLflow outage)."""
        self._patiently(lambda: self.client.log_text(run_id, text, name))

    def log_json(self, run_id: str, data: Any, name: str) -> None:
        """Store ``data`` as a JSON artifact (waiting out an MLflow outage)."""
        text = json.dumps(data, indent=2, sort_keys=True, default=str)
        self._patiently(lambda: self.client.log_text(run_id, text, name))

    def log_file(self, run_id: str, path: str | Path, folder: str | None = None) -> None:
        """Copy a local file into the run's artifacts (waiting out an MLflow outage)."""
        self._patiently(lambda: self.client.log_artifact(run_id, str(path), folder))

    @contextmanager
    def staging(self) -> Iterator[Path]:
        """A temporary folder for files about to be logged as artifacts."""
        with tempfile.TemporaryDirectory(prefix="testbed-") as folder:
            yield Path(folder)

    def set_note(self, run_id: str, text: str) -> None:
        """The run's description (MLflow's note, markdown), shown first by the MLflow UI."""
        self._patiently(lambda: self.client.set_tag(run_id, "mlflow.note.content", text))

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        """Deliver every queued metric, then close the run with FINISHED, FAILED or KILLED.

        Both wait out an MLflow outage of up to ``outage_s`` (then TrackingUnavailable): a run is never
        closed while rounds of its metrics are still queued.
        """
        while self.pending:
            self.flush()
        self._patiently(lambda: self.client.set_terminated(run_id, status=status))
