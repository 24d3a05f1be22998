#!/usr/bin/env bash
# Builds the HTML docs with warnings as errors, executing every tutorial.
#
#   scripts/build-docs.sh [extra sphinx-build options]
#
# Installs the docs dependencies (the ``docs`` extra: sphinx, myst-nb, jupytext, ipykernel,
# sphinx-rtd-theme) into the active interpreter if any is missing, then runs
#
#   sphinx-build -W --keep-going -E -b html docs docs/_build/html
#
# Environment:
#   PYTHON                  interpreter (default: $VIRTUAL_ENV/bin/python, else .venv/bin/python,
#                           else python3)
#   SCOREVI_TUTORIAL_SCALE  size of the tutorial runs (default here: small; unset/"full" for the
#                           full-size runs of a release build)
#   SCOREVI_NB_EXECUTION    myst-nb execution mode: force (default), cache or off
#   SCOREVI_INTERSPHINX     auto (default: link to reachable inventories), 1 or 0; see docs/conf.py
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

if [[ -z "${PYTHON:-}" ]]; then
    if [[ -n "${VIRTUAL_ENV:-}" && -x "$VIRTUAL_ENV/bin/python" ]]; then
        PYTHON="$VIRTUAL_ENV/bin/python"
    elif [[ -x "$ROOT/.venv/bin/python" ]]; then
        PYTHON="$ROOT/.venv/bin/python"
    else
        PYTHON="$(command -v python3)"
    fi
fi

if ! "$PYTHON" -c "import sphinx, myst_nb, jupytext, ipykernel, sphinx_rtd_theme" 2>/dev/null; then
    echo "build-docs.sh: installing the docs dependencies into $("$PYTHON" -c 'import sys; print(sys.prefix)')"
    "$PYTHON" -m pip install --quiet "sphinx>=7" "myst-nb>=1.1" "jupytext>=1.16" "ipykernel>=6" \
        "sphinx-rtd-theme>=2"
fi

# The notebook kernel ("python3") runs this interpreter (jupyter_client substitutes
# sys.executable for "python"); make the checkout importable even without an editable install.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export SCOREVI_TUTORIAL_SCALE="${SCOREVI_TUTORIAL_SCALE:-small}"
export SCOREVI_NB_EXECUTION="${SCOREVI_NB_EXECUTION:-force}"
export MPLBACKEND="${MPLBACKEND:-Agg}"
# The tutorials are small: one thread each avoids oversubscribing shared CI cores.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export MKL_NUM_THREADS="${MKL_NUM_THREADS:-1}"
export PYDEVD_DISABLE_FILE_VALIDATION=1

start=$(date +%s)
"$PYTHON" -m sphinx -W --keep-going -E -b html docs docs/_build/html "$@"
echo "build-docs.sh: docs built in docs/_build/html in $(( $(date +%s) - start )) s" \
    "(tutorials: SCOREVI_TUTORIAL_SCALE=$SCOREVI_TUTORIAL_SCALE, execution: $SCOREVI_NB_EXECUTION)"
