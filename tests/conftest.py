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


@pytest.fixture
def frozen_case():
    """The frozen-fit case of ``test_frozen_fit.py`` and its NumPyro mirror: Poisson counts on a
    raw time index 0-59 (the hold-out probe's ``growth-poisson``), the far start ``far`` (seed
    0's ``init_to_uniform`` draw in NumPyro), the budget, and a filter for the warning."""
    import types

    import numpy as np

    rng = np.random.default_rng(26)
    t = np.arange(60.0)

    def frozen_warnings(caught) -> list[str]:
        text = "largest step the trust region"
        return [str(w.message) for w in caught if text in str(w.message)]

    return types.SimpleNamespace(
        t=t,
        y=rng.poisson(np.exp(0.5 + 0.05 * t)).astype(float),
        far={"a": 0.178, "b": 1.265},
        steps=1500,
        frozen_warnings=frozen_warnings,
    )
