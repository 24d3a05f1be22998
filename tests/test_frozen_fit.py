"""A fit frozen far from the mode is reported (issue 11, "silent freeze"); the NumPyro mirror is
``tests/numpyro/test_numpyro_frozen_fit.py``.

An exp link on a raw time index, started at b = 1.265 (a draw of NumPyro's ``init_to_uniform``):
the curvature there is 1e32 times the mode's, the guide's scales follow it down to ~1e-8, and
the trust region (at most ``max_mean_radius`` scales a step) lets the mean crawl, every step
accepted. The fit must warn; the same model from ``init_to_feasible`` (b = 0) converges and
must not.
"""

from __future__ import annotations

import warnings

import pyro
import pyro.distributions as dist
import torch
from pyro.infer.autoguide import AutoNormal, init_to_feasible, init_to_value

from pyro_scorevi import AdaptiveStep, ScoreProximalSVI
from pyro_scorevi.step_rules import at_largest_step


def _pyro_fit(case, init_loc_fn):
    t, y = (torch.tensor(v, dtype=torch.float32) for v in (case.t, case.y))

    def model():
        a = pyro.sample("a", dist.Normal(0.0, 5.0))
        b = pyro.sample("b", dist.Normal(0.0, 1.0))
        with pyro.plate("data", len(t)):
            pyro.sample("y", dist.Poisson(torch.exp(a + b * t)), obs=y)

    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = AutoNormal(model, init_loc_fn=init_loc_fn)
    svi = ScoreProximalSVI(model, guide)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(case.steps):
            svi.step()
    return case.frozen_warnings(caught), {k: float(v) for k, v in guide.median().items()}


def test_pyro_frozen_fit_warns(frozen_case):
    far = init_to_value(values={k: torch.tensor(v) for k, v in frozen_case.far.items()})
    frozen, median = _pyro_fit(frozen_case, far)
    assert abs(median["b"] - 0.05) > 0.5  # still far from the mode (b = 0.05) ...
    assert len(frozen) == 1, frozen  # ... and reported, once
    frozen, median = _pyro_fit(frozen_case, init_to_feasible)
    assert abs(median["b"] - 0.0515) < 0.01
    assert frozen == []


def test_at_largest_step_conditions():
    rule = AdaptiveStep()
    r = rule.max_mean_radius
    scale = torch.tensor([1e-8, 1e-8, 1e-8])
    step = torch.tensor([0.99 * r * 1e-8, 0.5 * r * 1e-8, -r * 1e-8])
    radius = torch.tensor([r, r, r / 2])
    at = at_largest_step(rule, step, radius, 1.0, scale, scale, torch)
    assert at.tolist() == [True, False, False]
    # the narrower of q_t and q_t+1 sets the bound
    at = at_largest_step(rule, step, radius, 1.0, scale, scale / 2, torch)
    assert at.tolist() == [True, True, False]
