"""The ``testbed`` command: run, validate, schema, report, ui.

User mistakes print one line on stderr and exit with status 2; nothing else is printed for them. Any
other failure prints one line with its type and message and exits with status 1 (``--debug`` shows the
traceback instead).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from testbed.config.sweep_plan import MAX_SWEEP_CELLS
from testbed.errors import UserError

DEFAULT_UI_PORT = 5000
SWEEP_CELLS_HELP = f"most combinations a sweep may have (default: {MAX_SWEEP_CELLS})"


def _positive(text: str) -> int:
    """An argparse type: a whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


class _Parser(argparse.ArgumentParser):
    """argparse with its usage errors as one line (exit status 2), like every other input mistake."""

    def error(self, message: str) -> NoReturn:
        """Print ``testbed: error: ...`` with a pointer to --help, and exit 2."""
        self.exit(UserError.exit_code, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="testbed",
        description="Federated-learning privacy testbed: run topologies, attack updates, track leakage.",
    )
    parser.add_argument("--debug", action="store_true", help="show the Python traceback of unexpected errors")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    run = commands.add_parser("run", help="run a topology YAML file")
    run.add_argument("file", nargs="?", help="topology YAML file (optional with --resume)")
    run.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a field, e.g. --set rounds=5 --set clients.mixed.batch_size=4",
    )
    run.add_argument("--resume", metavar="RUN_ID", help="continue an interrupted run (or sweep) from its checkpoint")
    run.add_argument(
        "--checkpoints",
        default="checkpoints",
        help="checkpoint folder for --resume without FILE (default: %(default)s)",
    )
    run.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="--resume without FILE: accept code (import paths) named in the checkpoint's stored configuration",
    )
    run.add_argument("--max-sweep-cells", type=_positive, default=MAX_SWEEP_CELLS, metavar="N", help=SWEEP_CELLS_HELP)
    run.add_argument("--quiet", action="store_true", help="no progress output")

    validate = commands.add_parser("validate", help="check a topology (or study) file and print OK or its errors")
    validate.add_argument("file")
    validate.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    validate.add_argument(
        "--max-sweep-cells", type=_positive, default=MAX_SWEEP_CELLS, metavar="N", help=SWEEP_CELLS_HELP
    )

    schema = commands.add_parser("schema", help="print the JSON Schema of topology files")
    schema.add_argument("--markdown", action="store_true", help="print the configuration reference instead")

    report = commands.add_parser("report", help="leakage table, plots and summary of runs read back from MLflow")
    report.add_argument("target", help="an MLflow run id (a sweep parent or a single run) or an experiment name")
    report.add_argument("--uri", default="sqlite:///mlruns.db", help="tracking URI (default: %(default)s)")
    report.add_argument("--out", type=Path, help="output folder (default: reports/TARGET)")
    report.add_argument("--page", type=Path, help="study runs: also write the results page here (docs/results.md)")

    study = commands.add_parser("study", help="run a study file: tuned training over seeds, paired audits")
    study.add_argument("file", help="study YAML file (topologies/studies/mixing-study.yaml)")
    study.add_argument("--out", type=Path, help="folder for the study's tables (default: studies/NAME)")
    study.add_argument("--quiet", action="store_true", help="no progress output")

    ui = commands.add_parser("ui", help="open the MLflow UI on 127.0.0.1 for a tracking store")
    ui.add_argument("--uri", default="sqlite:///mlruns.db", help="tracking URI (default: %(default)s)")
    ui.add_argument("--host", default="127.0.0.1", help="listen address (default: %(default)s)")
    ui.add_argument("--port", type=int, default=DEFAULT_UI_PORT)
    ui.add_argument(
        "--serve-artifacts",
        action="store_true",
        help="also serve (and accept) run artifacts through the UI's server (default: off)",
    )
    return parser


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
MAX_FOLDER_NAME = 100


def default_folder(parent: str, name: str) -> Path:
    """``parent/<name as a slug>``: a folder name of letters, digits, ``. _ -`` that stays inside ``parent``.

    The name comes from the command line or from data (a run id, an experiment or study name); ``..``,
    slashes and other characters cannot take the default output folder elsewhere. ``--out`` is not changed.
    """
    slug = _UNSAFE.sub("-", name).strip(".-")[:MAX_FOLDER_NAME].strip(".-") or "unnamed"
    return Path(parent) / slug


def _run(args: argparse.Namespace) -> int:
    from testbed.config.load import load_experiment
    from testbed.engine import RunAborted, run_experiment
    from testbed.sweep import run_sweep
    from testbed.tracking.checkpoint import experiment_from_checkpoint

    if args.file is None:
        if args.resume is None:
            raise UserError("run: give a topology FILE, or --resume RUN_ID to continue a run")
        experiment = experiment_from_checkpoint(
            args.checkpoints, args.resume, args.overrides, trust=args.trust_checkpoint
        )
    else:
        if args.trust_checkpoint:
            raise UserError("run: --trust-checkpoint applies to --resume without FILE (the file names the code)")
        experiment = load_experiment(args.file, args.overrides, args.max_sweep_cells)
    try:
        if experiment.sweep is not None:
            sweep = run_sweep(
                experiment,
                show_progress=not args.quiet,
                resume_parent_id=args.resume,
                max_cells=args.max_sweep_cells,
            )
            runs = [{"combination": c.values, "run_id": run_id} for c, run_id in sweep.runs]
            print(json.dumps({"parent_run_id": sweep.parent_run_id, "skipped": sweep.skipped, "runs": runs}))
            return 0
        result = run_experiment(experiment, show_progress=not args.quiet, resume_run_id=args.resume)
    except RunAborted as exc:
        print(f"testbed: run stopped: {exc}", file=sys.stderr)
        return 1
    line: dict[str, object] = {"run_id": result.run_id, "final_test_accuracy": result.final_accuracy}
    if experiment.attack is not None:
        line["leakage"] = {
            group: {key: int(value) if key == "audited_samples" else round(value, 4) for key, value in row.items()}
            for group, row in result.leakage.items()
        }
    print(json.dumps(line))
    return 0


def _validate(args: argparse.Namespace) -> int:
    from testbed.config.load import load_experiment
    from testbed.config.topology import read_yaml
    from testbed.tracking.store_check import check_output_folders, check_tracking_uri

    data, _ = read_yaml(args.file)
    if isinstance(data, dict) and "arms" in data and "policies" in data:  # a study file (testbed study)
        from testbed.study.spec import load_study

        if args.overrides:
            raise UserError("validate: --set applies to topology files, not to study files")
        spec = load_study(args.file)
        check_tracking_uri(str(spec.tracking.get("uri", "")))
        print(f"{args.file}: OK (study: {len(spec.arms)} arms, {len(spec.seeds)} seeds)")
        return 0
    experiment = load_experiment(args.file, args.overrides, args.max_sweep_cells)
    check_tracking_uri(experiment.tracking.uri)
    check_output_folders(experiment.tracking.checkpoints, experiment.tracking.artifact_location)
    print(f"{args.file}: OK")
    return 0


def _schema(args: argparse.Namespace) -> int:
    from testbed.config.schema import Experiment
    from testbed.config.schema_docs import markdown

    print(markdown() if args.markdown else json.dumps(Experiment.model_json_schema(), indent=2))
    return 0


def _report(args: argparse.Namespace) -> int:
    from testbed.report.command import report_command
    from testbed.report.data import open_store
    from testbed.study.report import is_study_run, study_report

    open_store(args.uri)  # a missing or unreadable store is a one-line error, and nothing is created for it
    out = args.out or default_folder("reports", args.target)
    if is_study_run(args.target, args.uri):
        path = study_report(args.target, uri=args.uri, out=out, page=args.page)
    else:
        if args.page is not None:
            raise UserError("report: --page applies to study runs only (made by `testbed study`)")
        path = report_command(args.target, uri=args.uri, out=out)
    print(path)
    return 0


def _study(args: argparse.Namespace) -> int:
    from testbed.study.runner import run_study
    from testbed.study.spec import load_study

    spec = load_study(args.file)
    out = args.out or default_folder("studies", spec.name)
    result = run_study(spec, Path(args.file), out, show_progress=not args.quiet)
    print(
        json.dumps({"study_run_id": result.run_id, "tables": str(result.folder), "seconds": round(result.seconds, 1)})
    )
    return 0


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address) listens on this machine only."""
    import ipaddress

    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False


def _ui(args: argparse.Namespace) -> int:
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        args.uri,
        "--host",
        args.host,
        "--port",
        str(args.port),
        "--workers",
        "1",
        "--serve-artifacts" if args.serve_artifacts else "--no-serve-artifacts",
    ]
    if not is_loopback(args.host):
        print(
            f"testbed: warning: --host {args.host} is not a loopback address: anyone who can reach this machine can "
            "read and change the runs in this store through MLflow's API (no authentication)",
            file=sys.stderr,
        )
    print(f"MLflow UI on http://{args.host}:{args.port} (Ctrl-C to stop)", file=sys.stderr)
    try:
        return subprocess.call(command, env=env)
    except KeyboardInterrupt:
        return 0


COMMANDS = {"run": _run, "validate": _validate, "schema": _schema, "report": _report, "study": _study, "ui": _ui}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``testbed`` console script; returns the exit status."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    args = _parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except UserError as exc:
        print(f"testbed: error: {exc}", file=sys.stderr)
        return UserError.exit_code
    except KeyboardInterrupt:
        print("testbed: interrupted", file=sys.stderr)
        return 130
    except SystemExit as exc:  # raised by code the command called (a user's module), not by the command itself
        if args.debug:
            raise
        print(f"testbed: unexpected error: sys.exit({exc.code!r}) called during the command", file=sys.stderr)
        return 1
    except Exception as exc:  # the last line of defence: one line, the traceback only on request
        if args.debug:
            raise
        detail = " ".join(str(exc).split())[:500]
        print(
            f"testbed: unexpected error: {type(exc).__name__}: {detail} (run with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
