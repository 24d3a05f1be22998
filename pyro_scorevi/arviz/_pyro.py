"""Pyro backend of the ArviZ export: a fitted guide (params in Pyro's param store) to ArviZ."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from pyro_scorevi.arviz import _common

logger = logging.getLogger(__name__)

_INSTALL = 'pip install "pyro_scorevi[arviz]" (torch and pyro-ppl are core dependencies)'


def _frames(site: Mapping[str, Any]) -> list[tuple[str, int | None]]:
    return [(f.name, f.dim) for f in site["cond_indep_stack"] if f.vectorized]


def _check_no_subsampling(trace) -> None:
    for site in trace.nodes.values():
        for frame in site.get("cond_indep_stack", ()):
            if frame.full_size is not None and frame.full_size != frame.size:
                raise ValueError(
                    f"plate {frame.name!r} subsamples {frame.size} of {frame.full_size} "
                    "points, so each draw would see different observations; call the export "
                    "with model arguments that use the full data (e.g. subsample_size=None)"
                )


def _is_deterministic(site: Mapping[str, Any]) -> bool:
    return bool(site["infer"].get("_deterministic", False))


def _event_ndim(site: Mapping[str, Any]) -> int:
    """Event dims of a site's value. ``pyro.deterministic`` declares its whole value an event
    (``event_dim = value.ndim``) even inside plates; there the fewest trailing axes that leave
    every plate's axis with the plate's size are taken as the event."""
    declared = len(site["fn"].event_shape)
    if not _is_deterministic(site):
        return declared
    shape = tuple(site["value"].shape)
    plates = [
        (f.dim, f.size) for f in site["cond_indep_stack"] if f.vectorized and f.dim is not None
    ]
    if not plates:
        return declared
    for event in range(len(shape) + 1):
        batch = len(shape) - event
        if all(-dim <= batch and shape[batch + dim] == size for dim, size in plates):
            return event
    return declared


def _uncondition_observations(model: Callable) -> Callable:
    """``pyro.poutine.uncondition`` for the observed sites only: ``pyro.deterministic`` sites
    (observed ``Delta`` sites in Pyro) keep their computed value. Unconditioning those too makes
    ``Predictive`` redraw a ``Delta`` whose batch shape no longer matches its plate."""
    from pyro.poutine.uncondition_messenger import UnconditionMessenger

    class _UnconditionObservations(UnconditionMessenger):
        def _pyro_sample(self, msg) -> None:
            if not _is_deterministic(msg):
                super()._pyro_sample(msg)

    return _UnconditionObservations()(model)


def _numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy()


def from_pyro_guide(
    model: Callable,
    guide: Callable,
    *args: Any,
    num_draws: int = 1000,
    dims: Mapping[str, Sequence[str]] | None = None,
    coords: Mapping[str, Any] | None = None,
    posterior_predictive: bool = True,
    svi: Any = None,
    losses: Sequence[float] | None = None,
    hyperparameters: Mapping[str, Any] | None = None,
    **kwargs: Any,
):
    r"""Turn a fitted Pyro guide into ArviZ's data structure.

    Draws :math:`\theta_s \sim q`, ``s = 1..num_draws``, by tracing ``guide(*args, **kwargs)``
    and replaying ``model`` on each draw (``pyro.poutine.trace`` / ``replay`` and
    ``Trace.compute_log_prob``, as ``Trace_ELBO`` does). Groups, each with ``chain = 1`` and
    ``draw = num_draws``:

    - ``posterior``: every latent site of the model and every ``pyro.deterministic`` site;
      its attributes carry the hyper-parameters and ``inference_library``/``guide`` names;
    - ``posterior_predictive``: the observed sites redrawn at each :math:`\theta_s` by
      ``pyro.infer.Predictive`` on ``pyro.poutine.uncondition(model)`` (deterministic sites
      stay deterministic);
    - ``log_likelihood``: :math:`\log p(y_i \mid \theta_s)` per observation (for LOO);
    - ``observed_data``: the observed sites' values;
    - ``sample_stats``: ``lp`` = :math:`\log p(\theta_s, y)` and ``log_q`` =
      :math:`\log q(\theta_s)` per draw (for :func:`vi_pareto_khat` and :func:`vi_loo`);
    - ``vi``: ``loss`` over ``vi_step`` (the run's loss history, if known) and the
      hyper-parameters as attributes.

    Dims come from the model's plates (a plate names the axis it indexes; other axes are
    ``{site}_dim_{i}``); ``dims`` overrides them per variable and ``coords`` sets coordinates.

    Args:
        model: the Pyro model, called as ``model(*args, **kwargs)`` with the observed data.
        guide: the fitted guide (e.g. ``AutoNormal``); its parameters are read from the param
            store, exactly as ``pyro.infer.Predictive`` would.
        *args: model/guide arguments.
        num_draws: number of draws S from the guide.
        dims: ``{variable: [dim names]}`` overriding the plate-derived names.
        coords: ``{dim name: coordinate values}``.
        posterior_predictive: set False to skip the ``posterior_predictive`` group.
        svi: optionally the inference object (``ScoreProximalSVI``/``SVI``): its loss history
            and hyper-parameters are picked up when it exposes them.
        losses: per-step losses (overrides what ``svi`` exposes).
        hyperparameters: ``{name: value}`` (merged over what ``svi`` exposes).
        **kwargs: model/guide keyword arguments.

    Returns:
        ``arviz.InferenceData`` on ArviZ 0.x, ``xarray.DataTree`` on ArviZ 1.x.
    """
    _common.require_arviz()
    torch = _common.require_backend("torch", _INSTALL)
    _common.require_backend("pyro", _INSTALL)
    import pyro.poutine as poutine
    from pyro.infer import Predictive
    from pyro.poutine.util import prune_subsample_sites

    num_draws = _common.check_num_draws(num_draws)
    coords = _common.check_coords(coords)
    loss_arr, hp = _common.collect_run_info(svi, losses, hyperparameters)

    latent: dict[str, list[np.ndarray]] = {}
    loglik: dict[str, list[np.ndarray]] = {}
    lp, log_q = [], []
    latent_tensors: dict[str, list[Any]] = {}
    first_model_trace = None
    with torch.no_grad():
        for s in range(num_draws):
            guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
            model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
                *args, **kwargs
            )
            if s == 0:
                _check_no_subsampling(model_trace)
                first_model_trace = model_trace
            guide_trace = prune_subsample_sites(guide_trace)
            model_trace = prune_subsample_sites(model_trace)
            guide_trace.compute_log_prob()
            model_trace.compute_log_prob()
            for name, site in model_trace.nodes.items():
                if site["type"] != "sample":
                    continue
                if site["is_observed"] and not _is_deterministic(site):
                    loglik.setdefault(name, []).append(_numpy(site["log_prob"]))
                    continue
                if not site["is_observed"]:
                    if s == 0 and name not in guide_trace.nodes:
                        raise ValueError(
                            f"model site {name!r} is latent but the guide does not sample it, "
                            "so log q and the importance ratios p/q would be wrong; use a "
                            "guide that covers every latent site (e.g. AutoNormal(model))"
                        )
                    latent_tensors.setdefault(name, []).append(site["value"])
                latent.setdefault(name, []).append(_numpy(site["value"]))
            lp.append(float(model_trace.log_prob_sum()))
            log_q.append(float(guide_trace.log_prob_sum()))

    assert first_model_trace is not None
    sites = prune_subsample_sites(first_model_trace).nodes
    obs_names = list(loglik)
    if not obs_names:
        raise ValueError(
            "the model has no observed site when called with these arguments; pass the data "
            "the guide was fitted on (e.g. from_pyro_guide(model, guide, x, y))"
        )

    groups: dict[str, dict[str, np.ndarray]] = {
        "posterior": {k: np.stack(v)[None] for k, v in latent.items()},
        "log_likelihood": {k: np.stack(v)[None] for k, v in loglik.items()},
        "observed_data": {k: _numpy(sites[k]["value"]) for k in obs_names},
        "sample_stats": {
            _common.LOG_P_VAR: np.asarray(lp)[None],
            _common.LOG_Q_VAR: np.asarray(log_q)[None],
        },
    }
    if posterior_predictive:
        samples = {k: torch.stack(v) for k, v in latent_tensors.items()}
        predictive = Predictive(
            _uncondition_observations(model), posterior_samples=samples, return_sites=obs_names
        )
        with torch.no_grad():
            pred = predictive(*args, **kwargs)
        groups["posterior_predictive"] = {
            k: _numpy(pred[k]).reshape((1, num_draws) + tuple(sites[k]["value"].shape))
            for k in obs_names
        }

    default_dims = {}
    for name in list(latent) + obs_names:
        site = sites[name]
        default_dims[name] = _common.site_dims(
            name, site["value"].dim(), _event_ndim(site), _frames(site)
        )
    all_dims = _common.merge_dims(default_dims, dims, known_vars=default_dims)
    logger.debug("from_pyro_guide: %d draws, dims %s", num_draws, all_dims)
    return _common.build(
        groups,
        dims=all_dims,
        coords=coords,
        losses=loss_arr,
        hyperparameters=hp,
        attrs={"inference_library": "pyro", "guide": type(guide).__name__},
    )
