"""Shared test fixtures.

Kept minimal on purpose: the NumPyro and ArviZ tests must not pay for importing torch, so the
Pyro reset below acts only once some test module has imported Pyro.
"""

from __future__ import annotations

import os
import sys

import pytest

# One OpenMP thread per test process (set before torch is imported). The suite's tensors are
# tiny, and on a shared 2-core machine torch's default two OpenMP threads spin at barriers: a
# 6 x 6 ``tril`` measured 40 ms with two threads under load against 2 us with one. ``pytest -n``
# gives the parallelism instead. An explicit OMP_NUM_THREADS in the environment wins.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True)
def _reset_pyro():
    """Clears Pyro's global param store and seeds torch, numpy and random before each test."""
    pyro = sys.modules.get("pyro")
    if pyro is not None:
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
    yield


@pytest.fixture
def jax_x64():
    """float64 JAX for one test, restored after it (the flag is process-global: left on, it
    changed the dtypes of later NumPyro tests in the same worker)."""
    jax = pytest.importorskip("jax")
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield jax
    jax.config.update("jax_enable_x64", previous)
