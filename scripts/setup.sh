#!/usr/bin/env bash
# Creates .venv (if absent) and installs the package with its extras.
# The CPU build of torch is installed first, so the package's own range requirement
# (torch>=2.1) does not pull a multi-GB CUDA build. Override with TORCH_SPEC.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${EXTRAS:-all,test}"
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null
if ! python -c "import torch" 2>/dev/null; then
  python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
fi
python -m pip install -q -e ".[${EXTRAS}]"
