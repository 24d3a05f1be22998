"""ArviZ export and VI diagnostics for fitted Pyro and NumPyro guides.

One call turns a fitted guide into ArviZ's data structure (``arviz.InferenceData`` on ArviZ
0.x, ``xarray.DataTree`` on ArviZ 1.x)::

    data = pyro_scorevi.arviz.from_pyro_guide(model, guide, x, y, svi=svi)
    data = pyro_scorevi.arviz.from_numpyro_guide(model, guide, result, x, y)  # result of .run
    pyro_scorevi.arviz.vi_pareto_khat(data).khat   # < 0.7: the guide family fits
    pyro_scorevi.arviz.vi_loo(data)                # PSIS-LOO with the p/q correction

Layout of the exported object (``chain = 1``, ``draw = num_draws``):

- ``posterior``: latent and deterministic sites; attributes: ``inference_library``,
  ``guide`` and the run's hyper-parameters;
- ``posterior_predictive``, ``log_likelihood`` (pointwise), ``observed_data``;
- ``sample_stats``: ``lp`` = log p(theta, y) and ``log_q`` = log q(theta) per draw;
- ``vi``: ``loss`` over ``vi_step`` (negative ELBO per step, when known) with the
  hyper-parameters as the group's attributes.

Dims come from the model's plates and can be overridden with ``dims=``/``coords=``.
Importing this module imports neither torch nor jax (the backends are imported inside
the export functions); ArviZ is needed
(``pip install "pyro_scorevi[arviz]"``).
"""

from __future__ import annotations

from pyro_scorevi.arviz._common import (
    KHAT_THRESHOLD,
    LOG_P_VAR,
    LOG_Q_VAR,
    LOSS_VAR,
    STEP_DIM,
    VI_GROUP,
    VIParetoKhat,
    uses_datatree,
    vi_loo,
    vi_pareto_khat,
)
from pyro_scorevi.arviz._numpyro import from_numpyro_guide
from pyro_scorevi.arviz._pyro import from_pyro_guide

__all__ = [
    "from_pyro_guide",
    "from_numpyro_guide",
    "vi_pareto_khat",
    "vi_loo",
    "VIParetoKhat",
    "uses_datatree",
    "KHAT_THRESHOLD",
    "VI_GROUP",
    "LOSS_VAR",
    "STEP_DIM",
    "LOG_P_VAR",
    "LOG_Q_VAR",
]
