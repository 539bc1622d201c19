#!/usr/bin/env bash
# The rate benchmark against the reference implementations (docs/benchmarks.md, "Attack rate against the
# reference implementations"). Creates .venv-ref/ once: a virtual environment that reuses the project's
# environment (torch, scipy, scikit-learn, numpy, through a .pth file, so no second torch is downloaded) and
# adds Geiping et al.'s `breaching` 0.1.2 from PyPI with the two light packages it imports (hydra-core and
# omegaconf); lpips is imported by breaching only for its image reports, which the benchmark does not use.
# breaching is never a dependency of the package. Then runs benchmarks/reference_rates.py in that
# environment with the arguments given (e.g. --quick, --write-docs).
#
#     bash benchmarks/reference_rates.sh --write-docs      # default run (about 15 minutes on 2 loaded cores)
#     bash benchmarks/reference_rates.sh --quick
set -euo pipefail
cd "$(dirname "$0")/.."
PROJECT_PYTHON="${PROJECT_PYTHON:-.venv/bin/python}"
REF=.venv-ref
if [ ! -x "$REF/bin/python" ] || ! "$REF/bin/python" -c "import breaching" >/dev/null 2>&1; then
    "$PROJECT_PYTHON" -m venv "$REF"
    project_site=$("$PROJECT_PYTHON" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    ref_site=$("$REF/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    # addsitedir also runs the project environment's own .pth files (its editable install of this checkout)
    echo "import site; site.addsitedir('$project_site')" > "$ref_site/project-venv.pth"
    "$REF/bin/python" -m pip install --quiet --no-deps breaching==0.1.2 hydra-core==1.3.2 omegaconf==2.3.0 \
        "antlr4-python3-runtime==4.9.3"
fi
exec "$REF/bin/python" -m benchmarks.reference_rates "$@"
