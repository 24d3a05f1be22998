#!/usr/bin/env bash
# The test command: sets up .venv, then runs the default test suite (slow tests excluded).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pytest -m "not slow" -n 2 --dist loadfile -q "$@"
