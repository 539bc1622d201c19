"""The metrics package stands alone: importing it pulls in neither the engine, Ray nor MLflow."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_metrics_imports_no_engine_ray_or_mlflow() -> None:
    probe = (
        "import sys, metrics; print(sorted(m for m in sys.modules if m.split('.')[0] in {'testbed', 'ray', 'mlflow'}))"
    )
    output = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert output.strip() == "[]"
