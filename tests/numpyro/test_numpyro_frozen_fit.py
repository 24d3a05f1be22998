"""The NumPyro mirror of ``tests/test_frozen_fit.py``: a fit frozen far from the mode warns.

An exp link on a raw time index, started at b = 1.265 (seed 0's draw of ``init_to_uniform`` on
the hold-out probe's ``growth-poisson``): the scales follow the local curvature down to ~1e-8
and the mean crawls at the trust region's largest step. ``run`` must warn; from
``init_to_feasible`` the fit converges and must not.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

jax = pytest.importorskip("jax")
pytest.importorskip("numpyro")

import jax.numpy as jnp  # noqa: E402
import numpyro  # noqa: E402
import numpyro.distributions as dist  # noqa: E402
from numpyro.infer.autoguide import AutoNormal  # noqa: E402
from numpyro.infer.initialization import init_to_feasible, init_to_value  # noqa: E402

from pyro_scorevi.numpyro import ScoreProximalSVI  # noqa: E402

FAR = {"a": 0.178, "b": 1.265}
STEPS = 1500


def _data():
    rng = np.random.default_rng(26)
    t = np.arange(60.0)
    return t, rng.poisson(np.exp(0.5 + 0.05 * t)).astype(float)


def _frozen_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if "largest step the trust region" in str(w.message)]


def test_numpyro_frozen_fit_warns():
    t, y = (jnp.asarray(v) for v in _data())

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
            result = svi.run(jax.random.PRNGKey(0), STEPS, progress_bar=False)
        return _frozen_warnings(caught), float(result.params["b_auto_loc"])

    frozen, b = fit(init_to_value(values=FAR))
    assert abs(b - 0.05) > 0.5
    assert len(frozen) == 1, frozen
    frozen, b = fit(init_to_feasible)
    assert abs(b - 0.0515) < 0.01
    assert frozen == []
