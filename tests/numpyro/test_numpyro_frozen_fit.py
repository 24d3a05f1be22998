"""The NumPyro mirror of ``tests/test_frozen_fit.py``: a fit frozen far from the mode warns.

An exp link on a raw time index, started at b = 1.265 (seed 0's draw of ``init_to_uniform`` on
the hold-out probe's ``growth-poisson``): the scales follow the local curvature down to ~1e-8
and the mean crawls at the trust region's largest step. ``run`` must warn; from
``init_to_feasible`` the fit converges and must not.
"""

from __future__ import annotations

import warnings

import pytest

jax = pytest.importorskip("jax")
pytest.importorskip("numpyro")

import jax.numpy as jnp  # noqa: E402
import numpyro  # noqa: E402
import numpyro.distributions as dist  # noqa: E402
from numpyro.infer.autoguide import AutoNormal  # noqa: E402
from numpyro.infer.initialization import init_to_feasible, init_to_value  # noqa: E402

from pyro_scorevi.numpyro import ScoreProximalSVI  # noqa: E402


def test_numpyro_frozen_fit_warns(frozen_case):
    t, y = jnp.asarray(frozen_case.t), jnp.asarray(frozen_case.y)

    def model():
        a = numpyro.sample("a", dist.Normal(0.0, 5.0))
        b = numpyro.sample("b", dist.Normal(0.0, 1.0))
        with numpyro.plate("data", t.shape[0]):
            numpyro.sample("y", dist.Poisson(jnp.exp(a + b * t)), obs=y)

    def fit(init_loc_fn):
        guide = AutoNormal(model, init_loc_fn=init_loc_fn)
        svi = ScoreProximalSVI(model, guide)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = svi.run(jax.random.PRNGKey(0), frozen_case.steps, progress_bar=False)
        return frozen_case.frozen_warnings(caught), float(result.params["b_auto_loc"])

    frozen, b = fit(init_to_value(values=frozen_case.far))
    assert abs(b - 0.05) > 0.5
    assert len(frozen) == 1, frozen
    frozen, b = fit(init_to_feasible)
    assert abs(b - 0.0515) < 0.01
    assert frozen == []
