"""``testbed run`` in a child process, the way a user runs a topology file: for the tests that go through the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml


def run_topology(folder: Path, topology: dict[str, Any], *, elsewhere: bool = False, timeout: int = 900) -> Any:
    """Write ``topology`` as ``folder/topology.yaml``, run ``testbed run FILE --quiet`` without PYTHONPATH (from
    ``folder``, or from a fresh ``folder/elsewhere`` so that neither the working directory nor PYTHONPATH holds the
    user's modules), assert exit status 0 and return the JSON line the run prints."""
    path = folder / "topology.yaml"
    path.write_text(yaml.safe_dump(topology), encoding="utf-8")
    cwd = folder
    if elsewhere:
        cwd = folder / "elsewhere"
        cwd.mkdir()
    done = subprocess.run(
        [sys.executable, "-m", "testbed", "run", str(path), "--quiet"],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env={key: value for key, value in os.environ.items() if key != "PYTHONPATH"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])
