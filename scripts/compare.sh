#!/usr/bin/env bash
# The main job: sets up .venv, then runs the side-by-side comparison of ScoreProximalSVI and
# SVI + Trace_ELBO on the embedded default problem (a Bayesian MLP on scikit-learn's digits).
# Extra arguments go to the command line tool (see `python -m pyro_scorevi --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="all" bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pyro_scorevi "$@"
