"""Shared test fixtures.

Kept minimal on purpose: the NumPyro and ArviZ tests must not pay for importing torch, so the
Pyro reset below acts only once some test module has imported Pyro.
"""

from __future__ import annotations

import sys

import pytest


@pytest.fixture(autouse=True)
def _reset_pyro():
    """Clears Pyro's global param store and seeds torch, numpy and random before each test."""
    pyro = sys.modules.get("pyro")
    if pyro is not None:
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
    yield
