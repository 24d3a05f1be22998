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


@pytest.fixture
def wide_regression():
    """The wide collinear regression of ``benchmarks/experiments/wide_regression.py`` for
    ``test_dense_metric.py`` and ``test_diverging_fit.py``: ``design(n, standardise)`` gives
    ``(x, y, mean, sd)`` (P = 250 columns ``50 + 15 x`` in five blocks of correlation about
    0.9, noise sd 5, and the exact posterior's means and sds of ``(a, b)``); ``fit(backend, x,
    y, steps)`` fits it with the defaults (``backend`` ``"torch"`` or ``"jax"``, seed 0) and
    gives ``(loc, running loss, warnings caught)``."""
    import types
    import warnings

    import numpy as np

    width = 250

    def design(n=2000, standardise=True):
        rng = np.random.default_rng(0)
        base = rng.standard_normal((n, width // 5))
        x = np.concatenate([base + 0.3 * rng.standard_normal(base.shape) for _ in range(5)], 1)
        x = 50 + 15 * x
        y = 10 + x @ (0.2 * rng.standard_normal(width)) + 5 * rng.standard_normal(n)
        if standardise:
            x = (x - x.mean(0)) / x.std(0)
        z = np.concatenate([np.ones((n, 1)), x], 1)
        precision = np.diag([100.0**-2] + [10.0**-2] * width) + z.T @ z / 25
        cov = np.linalg.inv(precision)
        return x, y, cov @ (z.T @ y / 25), np.sqrt(np.diag(cov))

    def fit(backend, x, y, steps):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if backend == "torch":
                loc, fast = _fit_wide_torch(x, y, steps)
            else:
                loc, fast = _fit_wide_jax(x, y, steps)
        return loc, fast, [str(w.message) for w in caught]

    return types.SimpleNamespace(design=design, fit=fit)


def _fit_wide_torch(x, y, steps):
    import pyro
    import pyro.distributions as dist
    import torch
    from pyro.infer.autoguide import AutoNormal

    from pyro_scorevi import ScoreProximalSVI

    width = x.shape[1]
    xt, yt = torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.float32)

    def model(x, y):
        a = pyro.sample("a", dist.Normal(0.0, 100.0))
        b = pyro.sample("b", dist.Normal(0.0, 10.0).expand([width]).to_event(1))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.Normal(a + x @ b, 5.0), obs=y)

    pyro.set_rng_seed(0)
    pyro.clear_param_store()
    guide = AutoNormal(model)
    svi = ScoreProximalSVI(model, guide)
    for _ in range(steps):
        svi.step(xt, yt)
    state = svi.state_dict()["diagonal_state"]
    assert state["curvature"] is None  # past dense_max_dim: the diagonal step
    loc = torch.cat([guide.locs.a.detach()[None], guide.locs.b.detach()]).numpy()
    return loc, state["loss_fast"]


def _fit_wide_jax(x, y, steps):
    import jax
    import jax.numpy as jnp
    import numpy as np
    import numpyro
    import numpyro.distributions as dist
    from numpyro.infer.autoguide import AutoNormal

    from pyro_scorevi.numpyro import ScoreProximalSVI

    width = x.shape[1]

    def model(x, y):
        a = numpyro.sample("a", dist.Normal(0.0, 100.0))
        b = numpyro.sample("b", dist.Normal(0.0, 10.0).expand([width]).to_event(1))
        numpyro.sample("y", dist.Normal(a + x @ b, 5.0), obs=y)

    svi = ScoreProximalSVI(model, AutoNormal(model))
    xj, yj = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
    result = svi.run(jax.random.PRNGKey(0), steps, xj, yj, progress_bar=False)
    p = result.params
    loc = np.concatenate([np.ravel(p["a_auto_loc"]), np.asarray(p["b_auto_loc"])])
    return loc, float(result.state.rule.loss_fast)
