#!/usr/bin/env bash
# Second CI leg: Python 3.12, no torch, NumPyro + ArviZ 1.x (DataTree API).
#
# Creates .venv312 (if absent) with Python >= 3.12, installs numpy/jax/numpyro/"arviz>=1"/
# pytest/matplotlib and this package with ``--no-deps`` (the core dependencies pull in torch,
# which this leg must not have), then runs the ArviZ and NumPyro tests. Pyro-path tests skip
# themselves via ``pytest.importorskip("torch")``.
#
# Environment:
#   PYTHON312  interpreter to build the venv from (default: python3.12 on PATH, else pyenv's 3.12).
#   VENV312    venv directory (default: .venv312 in the repository root).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

VENV="${VENV312:-$ROOT/.venv312}"
if [[ -z "${PYTHON312:-}" ]]; then
    # A pyenv shim named python3.12 may exist without being runnable: try each candidate.
    for candidate in python3.12 "$HOME"/.pyenv/versions/3.12*/bin/python; do
        if "$candidate" -c "import sys; assert sys.version_info >= (3, 12)" >/dev/null 2>&1; then
            PYTHON312="$candidate"
            break
        fi
    done
    if [[ -z "${PYTHON312:-}" ]]; then
        echo "test-py312.sh: no Python 3.12 found; set PYTHON312=/path/to/python3.12" >&2
        exit 2
    fi
fi

if [[ ! -x "$VENV/bin/python" ]]; then
    "$PYTHON312" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    "$VENV/bin/python" -m pip install --quiet numpy jax numpyro "arviz>=1" pytest matplotlib
    "$VENV/bin/python" -m pip install --quiet --no-deps -e .
fi

# This leg must stay torch-free: fail loudly if something pulled torch in.
if "$VENV/bin/python" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is None)"; then
    echo "test-py312.sh: torch is installed in $VENV; this leg must run without it" >&2
    exit 2
fi

TARGETS=(tests/arviz)
# tests/numpyro belongs to another work stream: run it only when it holds test files.
if compgen -G "tests/numpyro/test_*.py" >/dev/null || compgen -G "tests/numpyro/*_test.py" >/dev/null; then
    TARGETS+=(tests/numpyro)
fi

exec "$VENV/bin/python" -m pytest "${TARGETS[@]}" -q "$@"
