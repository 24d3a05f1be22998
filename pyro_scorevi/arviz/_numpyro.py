"""NumPyro backend of the ArviZ export: a fitted guide and its params dict to ArviZ."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from pyro_scorevi.arviz import _common

logger = logging.getLogger(__name__)

_INSTALL = 'pip install "pyro_scorevi[numpyro,arviz]"'


def _frames(site: Mapping[str, Any]) -> list[tuple[str, int | None]]:
    return [(f.name, f.dim) for f in site.get("cond_indep_stack", ())]


def _check_no_subsampling(trace: Mapping[str, Any]) -> None:
    for name, site in trace.items():
        if site["type"] != "plate":
            continue
        size = site["args"][0]
        subsample = np.shape(site["value"])[0] if np.ndim(site["value"]) else size
        if subsample != size:
            raise ValueError(
                f"plate {name!r} subsamples {subsample} of {size} points, so each draw would "
                "see different observations; call the export with model arguments that use "
                "the full data (e.g. subsample_size=None)"
            )


def _split_params(params: Any) -> tuple[Any, Any]:
    """``params`` may be the params dict or a run result with ``.params`` (and ``.losses``)."""
    if isinstance(params, Mapping):
        return dict(params), None
    if hasattr(params, "params") and isinstance(params.params, Mapping):
        return dict(params.params), params
    raise TypeError(
        f"params must be the dict of fitted guide parameters (svi.get_params(state) or "
        f"run(...).params) or the run result itself (got {type(params).__name__})"
    )


def from_numpyro_guide(
    model: Callable,
    guide: Callable,
    params: Any,
    *args: Any,
    rng_key: Any = None,
    num_draws: int = 1000,
    dims: Mapping[str, Sequence[str]] | None = None,
    coords: Mapping[str, Any] | None = None,
    posterior_predictive: bool = True,
    svi: Any = None,
    losses: Sequence[float] | None = None,
    hyperparameters: Mapping[str, Any] | None = None,
    **kwargs: Any,
):
    r"""Turn a fitted NumPyro guide into ArviZ's data structure.

    Draws :math:`\theta_s \sim q` with ``numpyro.infer.util.log_density`` on the seeded guide
    (params substituted), which also gives :math:`\log q(\theta_s)`; the model's log joint
    :math:`\log p(\theta_s, y)` comes from ``log_density`` on the model, the pointwise
    log-likelihood from ``numpyro.infer.util.log_likelihood`` and the posterior predictive from
    ``numpyro.infer.Predictive`` on ``numpyro.handlers.uncondition(model)``. The groups are
    those of :func:`from_pyro_guide` (``posterior``, ``posterior_predictive``,
    ``log_likelihood``, ``observed_data``, ``sample_stats`` with ``lp`` and ``log_q``, and
    ``vi`` with the loss history and hyper-parameters), each with ``chain = 1``.

    Args:
        model: the NumPyro model, called as ``model(*args, **kwargs)`` with the observed data.
        guide: the fitted guide (e.g. ``AutoNormal``).
        params: the fitted params dict (``svi.get_params(state)``), or the run result
            ``(params, state, losses)`` of ``SVI.run`` / ``ScoreProximalSVI.run``, whose
            ``losses`` are then stored too.
        *args: model/guide arguments.
        rng_key: a ``jax.random`` key (default ``jax.random.PRNGKey(0)``).
        num_draws: number of draws S from the guide.
        dims: ``{variable: [dim names]}`` overriding the plate-derived names.
        coords: ``{dim name: coordinate values}``.
        posterior_predictive: set False to skip the ``posterior_predictive`` group.
        svi: optionally the inference object, read for hyper-parameters (and losses).
        losses: per-step losses (overrides the run result's and ``svi``'s).
        hyperparameters: ``{name: value}`` (merged over what ``svi`` exposes).
        **kwargs: model/guide keyword arguments.

    Returns:
        ``arviz.InferenceData`` on ArviZ 0.x, ``xarray.DataTree`` on ArviZ 1.x.
    """
    _common.require_arviz()
    jax = _common.require_backend("jax", _INSTALL)
    _common.require_backend("numpyro", _INSTALL)
    import jax.numpy as jnp
    from numpyro import handlers
    from numpyro.infer import Predictive
    from numpyro.infer.util import log_density, log_likelihood

    num_draws = _common.check_num_draws(num_draws)
    coords = _common.check_coords(coords)
    params, run_result = _split_params(params)
    if (
        losses is None
        and run_result is not None
        and getattr(run_result, "losses", None) is not None
    ):
        losses = np.asarray(run_result.losses)
    loss_arr, hp = _common.collect_run_info(svi, losses, hyperparameters)
    if rng_key is None:
        rng_key = jax.random.PRNGKey(0)
    key_draws, key_pred = jax.random.split(rng_key)

    # One eager pass: sets up an autoguide's prototype, reads the structure, checks coverage.
    log_q0, guide_trace = log_density(handlers.seed(guide, key_draws), args, kwargs, params)
    latent_names = [
        name
        for name, site in guide_trace.items()
        if site["type"] == "sample" and not site["infer"].get("is_auxiliary", False)
    ]
    latents0 = {k: guide_trace[k]["value"] for k in latent_names}
    model_trace = handlers.trace(
        handlers.seed(handlers.substitute(model, data=latents0), key_draws)
    ).get_trace(*args, **kwargs)
    _check_no_subsampling(model_trace)
    for name, site in model_trace.items():
        if site["type"] == "sample" and not site["is_observed"] and name not in latents0:
            raise ValueError(
                f"model site {name!r} is latent but the guide does not sample it, so log q and "
                "the importance ratios p/q would be wrong; use a guide that covers every "
                "latent site (e.g. AutoNormal(model))"
            )
    obs_names = [n for n, s in model_trace.items() if s["type"] == "sample" and s["is_observed"]]
    if not obs_names:
        raise ValueError(
            "the model has no observed site when called with these arguments; pass the data "
            "the guide was fitted on (e.g. from_numpyro_guide(model, guide, params, x, y))"
        )
    det_names = [n for n, s in model_trace.items() if s["type"] == "deterministic"]
    post_names = [n for n in model_trace if n in latents0] + det_names

    def one_draw(key):
        log_q, g_tr = log_density(handlers.seed(guide, key), args, kwargs, params)
        draws = {k: g_tr[k]["value"] for k in latent_names}
        log_p, m_tr = log_density(model, args, kwargs, draws)
        dets = {k: m_tr[k]["value"] for k in det_names}
        return draws, dets, log_p, log_q

    keys = jax.random.split(key_draws, num_draws)
    draws, dets, lp, log_q = jax.jit(jax.vmap(one_draw))(keys)
    loglik = log_likelihood(model, draws, *args, batch_ndims=1, **kwargs)

    def to_np(x):
        return np.asarray(x)

    post = {**draws, **dets}
    groups: dict[str, dict[str, np.ndarray]] = {
        "posterior": {k: to_np(post[k])[None] for k in post_names},
        "log_likelihood": {k: to_np(loglik[k])[None] for k in obs_names if k in loglik},
        "observed_data": {k: to_np(model_trace[k]["value"]) for k in obs_names},
        "sample_stats": {
            _common.LOG_P_VAR: to_np(lp)[None],
            _common.LOG_Q_VAR: to_np(log_q)[None],
        },
    }
    if posterior_predictive:
        pred = Predictive(
            handlers.uncondition(model),
            posterior_samples=draws,
            return_sites=obs_names,
            batch_ndims=1,
        )(key_pred, *args, **kwargs)
        groups["posterior_predictive"] = {
            k: to_np(jnp.reshape(pred[k], (1, num_draws) + jnp.shape(model_trace[k]["value"])))
            for k in obs_names
        }

    default_dims = {}
    for name in post_names + obs_names:
        site = model_trace[name]
        event_ndim = len(site["fn"].event_shape) if site["type"] == "sample" else 0
        default_dims[name] = _common.site_dims(
            name, jnp.ndim(site["value"]), event_ndim, _frames(site)
        )
    all_dims = _common.merge_dims(default_dims, dims, known_vars=default_dims)
    logger.debug(
        "from_numpyro_guide: %d draws (first log q %.3f), dims %s",
        num_draws,
        float(log_q0),
        all_dims,
    )
    return _common.build(
        groups,
        dims=all_dims,
        coords=coords,
        losses=loss_arr,
        hyperparameters=hp,
        attrs={"inference_library": "numpyro", "guide": type(guide).__name__},
    )
