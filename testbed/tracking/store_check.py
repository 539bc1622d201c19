"""Checks of ``tracking.uri`` that need no server: a known scheme, a folder a local store can be made
in, and the database driver a SQL store needs. They run before data is loaded, Ray starts or anything
is written, so a wrong address is one line (exit status 2) instead of a traceback mid-run.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from urllib.parse import urlparse

from testbed.errors import UserError

SQL_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")
REMOTE_SCHEMES = ("http", "https", "databricks")
DRIVER_HINTS: dict[str, str] = {
    "psycopg": 'pip install -e ".[postgres]"',
    "psycopg2": 'pip install psycopg2-binary, or use postgresql+psycopg:// with pip install -e ".[postgres]"',
    "MySQLdb": 'use mysql+pymysql:// and pip install -e ".[mysql]"',
    "pymysql": 'pip install -e ".[mysql]"',
    "pyodbc": "pip install pyodbc (and the ODBC driver of your SQL Server)",
}
"""What to install for each database driver SQLAlchemy may ask for (the optional extras in pyproject.toml)."""


def check_tracking_uri(uri: str) -> None:
    """Raise UserError naming ``tracking.uri`` when the store cannot work here; servers are not contacted."""
    scheme = urlparse(uri).scheme.split("+", 1)[0].lower()
    if scheme in ("", "file") or (len(scheme) == 1 and os.name == "nt"):
        folder = Path(urlparse(uri).path if scheme == "file" else uri)
        _check_creatable(folder, uri, what="the MLflow file store")
        return
    if scheme in REMOTE_SCHEMES:
        return
    if scheme not in SQL_SCHEMES:
        allowed = ", ".join(f"{name}://" for name in (*SQL_SCHEMES, *REMOTE_SCHEMES, "file"))
        raise UserError(f"tracking.uri: unknown store scheme {scheme!r} in {uri!r}; allowed: {allowed} or a folder")
    from sqlalchemy.engine.url import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        url = make_url(uri)
        dialect = url.get_dialect()
    except (ArgumentError, NoSuchModuleError, ValueError) as exc:
        raise UserError(f"tracking.uri: not a database address SQLAlchemy understands: {uri!r} ({exc})") from None
    try:
        dialect.import_dbapi()
    except ImportError as exc:
        module = (getattr(exc, "name", None) or str(exc)).split(".")[0]
        hint = DRIVER_HINTS.get(module, f"pip install the Python package that provides {module!r}")
        raise UserError(
            f"tracking.uri: the {scheme} store needs the database driver {module!r}, which is not installed; {hint}"
        ) from None
    if scheme == "sqlite" and url.database not in (None, "", ":memory:"):
        database = Path(str(url.database))
        if database.is_dir():
            raise UserError(f"tracking.uri: {database} is a folder; name a database file, e.g. sqlite:///mlruns.db")
        _check_creatable(database.parent, uri, what="the sqlite database")


def _check_creatable(folder: Path, uri: str, *, what: str) -> None:
    """``folder`` exists as a writable folder, or its nearest existing ancestor is one (so it can be made)."""
    check_folder(folder, "tracking.uri", what=what, hint=f"check {uri!r}")


def check_folder(folder: str | Path, field: str, *, what: str, hint: str = "") -> None:
    """``folder`` is a writable folder or can be made as one; else a UserError naming ``field``.

    Nothing is left behind: the check makes a probe folder in the nearest existing ancestor and removes it.
    """
    wanted = Path(folder).expanduser()
    existing = wanted
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{field}: cannot make the folder {wanted} for {what} ({existing} is not a folder)")
    try:  # a probe folder, removed at once: os.access says yes to root even where nothing can be made
        os.rmdir(tempfile.mkdtemp(prefix=".testbed-probe-", dir=existing))
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise UserError(
            f"{field}: cannot make {what} under {existing} ({reason}){'; ' + hint if hint else ''}"
        ) from None


def check_output_folders(checkpoints: str, artifact_location: str) -> None:
    """The run's local output folders can be written: checkpoints, and artifacts when they are local files."""
    check_folder(checkpoints, "tracking.checkpoints", what="checkpoints")
    if "://" not in artifact_location or artifact_location.startswith("file:"):
        local = artifact_location.removeprefix("file://").removeprefix("file:")
        check_folder(local, "tracking.artifact_location", what="artifacts")
