"""Backend-free pieces of the ArviZ export: version detection, ``from_dict`` builders for both
ArviZ lines, the run-information group, and the PSIS-based VI diagnostics.

Imports neither torch nor jax. ArviZ itself is imported lazily, so that a missing ``arviz``
raises an ``ImportError`` naming the extra to install.
"""

from __future__ import annotations

import logging
import math
import numbers
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

logger = logging.getLogger(__name__)

#: Name of the group holding the run's loss history and hyper-parameters.
VI_GROUP = "vi"
#: Variable of :data:`VI_GROUP` holding the loss (negative ELBO) per optimisation step.
LOSS_VAR = "loss"
#: Dimension of :data:`LOSS_VAR`.
STEP_DIM = "vi_step"
#: ``sample_stats`` variable with log p(theta_s, y) (the model's log joint) per draw.
LOG_P_VAR = "lp"
#: ``sample_stats`` variable with log q(theta_s) (the guide's log density) per draw.
LOG_Q_VAR = "log_q"

#: Yao et al. (2018): with k-hat above 0.7 the importance ratios p/q have so heavy a right tail
#: that neither the VI approximation nor PSIS-corrected estimates from it can be trusted.
KHAT_THRESHOLD = 0.7

_KNOWN_HYPERPARAMETERS = (
    "num_particles",
    "prox_weight",
    "scale_prox_weight",
    "antithetic",
    "num_alternations",
    "num_inner_steps",
    "inner_lr",
    "num_steps",
    "schedule",
    "prox_schedule",
    "subsample_size",
)

_INSTALL_ARVIZ = 'pip install "pyro_scorevi[arviz]"'


# ----------------------------------------------------------------------------------------------
# Optional dependencies and version detection
# ----------------------------------------------------------------------------------------------


def require_arviz():
    """Import and return :mod:`arviz`, or raise an ``ImportError`` naming the extra."""
    try:
        import arviz
    except ImportError as err:  # pragma: no cover - exercised only without arviz
        raise ImportError(
            f"pyro_scorevi.arviz needs ArviZ, which is not installed; install it with "
            f"{_INSTALL_ARVIZ}"
        ) from err
    return arviz


def require_backend(module: str, install: str):
    """Import ``module`` or raise an ``ImportError`` with the install command ``install``."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f"this function needs {module!r}, which is not installed; install it with {install}"
        ) from err


def arviz_version() -> tuple[int, int]:
    """The installed ArviZ ``(major, minor)``."""
    version = require_arviz().__version__
    parts = []
    for piece in version.split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    while len(parts) < 2:
        parts.append(0)
    return parts[0], parts[1]


def uses_datatree() -> bool:
    """True for ArviZ >= 1 (``xarray.DataTree``), False for ArviZ 0.x (``InferenceData``)."""
    return arviz_version()[0] >= 1


# ----------------------------------------------------------------------------------------------
# Dims from plates
# ----------------------------------------------------------------------------------------------


def site_dims(
    name: str, ndim: int, event_ndim: int, frames: Iterable[tuple[str, int | None]]
) -> list[str]:
    """Dimension names of one site's value (without the sample dims).

    A plate with ``dim = -k`` (counted from the right of the batch shape) names axis
    ``ndim - event_ndim - k``; every other axis gets ArviZ's default name ``{name}_dim_{i}``.
    """
    names = [f"{name}_dim_{i}" for i in range(ndim)]
    for plate_name, dim in frames:
        if dim is None:
            continue
        axis = ndim - event_ndim + dim
        if 0 <= axis < ndim - event_ndim:
            names[axis] = plate_name
    return names


def merge_dims(
    default_dims: Mapping[str, list[str]],
    dims: Mapping[str, Sequence[str]] | None,
    known_vars: Iterable[str],
) -> dict[str, list[str]]:
    """Defaults from the plates, overridden per variable by the user's ``dims``."""
    out = {k: list(v) for k, v in default_dims.items()}
    if dims is None:
        return out
    if not isinstance(dims, Mapping):
        raise TypeError(
            f"dims must be a mapping from variable name to a list of dimension names "
            f"(got dims = {dims!r} of type {type(dims).__name__})"
        )
    known = set(known_vars)
    unknown = sorted(set(dims) - known)
    if unknown:
        raise ValueError(
            f"dims names variables that the export does not hold: {unknown}; "
            f"the exported variables are {sorted(known)}"
        )
    for var, var_dims in dims.items():
        if isinstance(var_dims, str) or not isinstance(var_dims, Sequence):
            raise TypeError(
                f"dims[{var!r}] must be a list of dimension names (got {var_dims!r}); "
                f"e.g. dims={{{var!r}: ['obs_id']}}"
            )
        out[var] = list(var_dims)
    return out


def check_coords(coords: Mapping[str, Any] | None) -> dict[str, Any]:
    if coords is None:
        return {}
    if not isinstance(coords, Mapping):
        raise TypeError(
            f"coords must be a mapping from dimension name to coordinate values "
            f"(got coords = {coords!r} of type {type(coords).__name__})"
        )
    return dict(coords)


def check_num_draws(num_draws: Any) -> int:
    if isinstance(num_draws, bool) or not isinstance(num_draws, numbers.Integral):
        raise TypeError(f"num_draws must be an int (got num_draws = {num_draws!r})")
    if num_draws < 2:
        raise ValueError(
            f"num_draws must satisfy num_draws >= 2 (got num_draws = {num_draws}); "
            "PSIS needs hundreds of draws, the default 1000 is a good start"
        )
    return int(num_draws)


# ----------------------------------------------------------------------------------------------
# Run information: loss history and hyper-parameters
# ----------------------------------------------------------------------------------------------


def _attr_value(value: Any) -> Any:
    """A netCDF-safe attribute value: numbers and strings as they are, bools as 0/1,
    flat numeric/str sequences as lists, anything else as its ``repr``."""
    if isinstance(value, (bool, np.bool_)):
        return int(value)
    if isinstance(value, (numbers.Number, str)) and not isinstance(value, complex):
        return value.item() if isinstance(value, np.generic) else value
    if isinstance(value, (list, tuple, np.ndarray)):
        arr = np.asarray(value)
        if arr.ndim == 1 and arr.dtype.kind in "iuf":
            return arr.tolist()
    return repr(value)


def collect_run_info(
    svi: Any = None,
    losses: Any = None,
    hyperparameters: Mapping[str, Any] | None = None,
) -> tuple[np.ndarray | None, dict[str, Any]]:
    """Loss history and hyper-parameters, from explicit arguments or duck-typed from ``svi``.

    ``svi`` may be a fitted inference object (``ScoreProximalSVI``, ``SVI``) or a NumPyro
    run result: ``losses`` is read from its ``losses`` / ``loss_history`` attribute,
    hyper-parameters from a ``hyperparameters`` attribute or method, else from the known
    attribute names (``num_particles``, ``prox_weight``, ...). Explicit arguments win.
    """
    hp: dict[str, Any] = {}
    if svi is not None:
        found = getattr(svi, "hyperparameters", None)
        if callable(found):
            found = found()
        if isinstance(found, Mapping):
            hp.update(found)
        else:
            for name in _KNOWN_HYPERPARAMETERS:
                if hasattr(svi, name):
                    val = getattr(svi, name)
                    if not callable(val) or hasattr(val, "__dataclass_fields__"):
                        hp[name] = val
        hp.setdefault("algorithm", type(svi).__name__)
        if losses is None:
            for attr in ("losses", "loss_history"):
                val = getattr(svi, attr, None)
                if val is not None and not callable(val):
                    losses = val
                    break
    if hyperparameters is not None:
        if not isinstance(hyperparameters, Mapping):
            raise TypeError(
                f"hyperparameters must be a dict of name -> value "
                f"(got hyperparameters = {hyperparameters!r})"
            )
        hp.update(hyperparameters)
    loss_arr = None
    if losses is not None:
        loss_arr = np.asarray(
            [float(v) for v in losses] if isinstance(losses, (list, tuple)) else losses,
            dtype=float,
        )
        if loss_arr.ndim != 1:
            raise ValueError(
                f"losses must be a 1-d sequence of per-step losses "
                f"(got an array of shape {loss_arr.shape})"
            )
    return loss_arr, hp


# ----------------------------------------------------------------------------------------------
# Building the ArviZ object
# ----------------------------------------------------------------------------------------------


def build(
    groups: Mapping[str, Mapping[str, np.ndarray]],
    *,
    dims: Mapping[str, list[str]],
    coords: Mapping[str, Any],
    losses: np.ndarray | None,
    hyperparameters: Mapping[str, Any],
    attrs: Mapping[str, Any],
):
    """Build an ``InferenceData`` (ArviZ 0.x) or a ``DataTree`` (ArviZ 1.x) with ``from_dict``.

    ``groups`` maps group name to ``{var: array}``, arrays in ArviZ's layout (``(chain, draw,
    ...)`` for sampled groups, no sample dims for ``observed_data``). The loss history and
    hyper-parameters go to the :data:`VI_GROUP` group (variable :data:`LOSS_VAR` over
    :data:`STEP_DIM`; hyper-parameters as that group's attributes), and ``attrs`` plus the
    hyper-parameters to the ``posterior`` group's attributes and the top-level attributes.
    """
    az = require_arviz()
    import xarray as xr

    groups = {g: dict(v) for g, v in groups.items() if v}
    hp_attrs = {str(k): _attr_value(v) for k, v in hyperparameters.items()}
    post_attrs = {**{str(k): _attr_value(v) for k, v in attrs.items()}, **hp_attrs}
    vi_ds = xr.Dataset(
        {LOSS_VAR: ((STEP_DIM,), losses)} if losses is not None else {},
        coords={STEP_DIM: np.arange(len(losses))} if losses is not None else None,
        attrs={
            **hp_attrs,
            "loss_definition": "negative ELBO per step, as returned by step() / run()",
        },
    )
    # Each dims entry must also fit the observed_data value (no sample dims) and the
    # log-likelihood (ArviZ skips trailing event dims there itself).
    if uses_datatree():
        tree = az.from_dict(
            groups,
            dims=dict(dims),
            coords=dict(coords),
            attrs={"/": post_attrs, "posterior": post_attrs},
        )
        tree[VI_GROUP] = xr.DataTree(dataset=vi_ds)
        return tree
    idata = az.from_dict(
        **groups,
        dims=dict(dims),
        coords=dict(coords),
        attrs=post_attrs,
        posterior_attrs=post_attrs,
    )
    # ArviZ 0.x warns that a group outside its schema is "not defined in the InferenceData
    # scheme"; that is the point of a documented extra group, so the warning is silenced here.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*InferenceData scheme.*")
        idata.add_groups({VI_GROUP: vi_ds})
    return idata


# ----------------------------------------------------------------------------------------------
# Diagnostics
# ----------------------------------------------------------------------------------------------


class VIParetoKhat(NamedTuple):
    """Result of :func:`vi_pareto_khat`.

    Attributes:
        khat: Pareto shape estimate k-hat of the right tail of ``exp(log_weights)``.
        log_weights: raw log importance ratios ``log p(theta_s, y) - log q(theta_s)``, one per
            draw (``(num_draws,)``).
        smoothed_log_weights: PSIS-smoothed, self-normalised log weights (``(num_draws,)``).
        good_k: sample-size dependent threshold ``min(1 - 1/log10(S), 0.7)`` (Vehtari et al.
            2024); ``khat <= good_k`` means the fit is usable.
        ok: ``khat <= good_k``.
    """

    khat: float
    log_weights: np.ndarray
    smoothed_log_weights: np.ndarray
    good_k: float
    ok: bool


def _group_var(data: Any, group: str, var: str) -> np.ndarray:
    try:
        node = data[group]
    except (KeyError, AttributeError, TypeError):
        node = getattr(data, group, None)
    if node is None:
        raise ValueError(
            f"data has no {group!r} group; export the fitted guide with from_pyro_guide / "
            f"from_numpyro_guide, or pass log_weights= directly"
        )
    try:
        return np.asarray(node[var].values)
    except KeyError as err:
        raise ValueError(
            f"data[{group!r}] has no variable {var!r}; export the fitted guide with "
            f"from_pyro_guide / from_numpyro_guide, which stores it"
        ) from err


def _psislw(log_weights: np.ndarray) -> tuple[np.ndarray, float]:
    """ArviZ's own PSIS on a 1-d vector of log importance ratios (right tail)."""
    az = require_arviz()
    if uses_datatree():
        from arviz_stats.base import array_stats

        # arviz_stats' psislw takes log-likelihood-like values and smooths their negation
        # (loo passes log p(y_i | theta)); ArviZ 0.x's takes the log weights themselves.
        lw, khat = array_stats.psislw(-log_weights, r_eff=1.0, axis=-1)
    else:
        lw, khat = az.psislw(log_weights, reff=1.0)
    return np.asarray(lw), float(np.asarray(khat))


def vi_pareto_khat(data: Any = None, *, log_weights: Any = None) -> VIParetoKhat:
    r"""Pareto k-hat of the importance ratios p/q: "did the variational fit work?".

    For draws :math:`\theta_s \sim q` the log ratios are

    .. math:: \log r_s = \log p(\theta_s, y) - \log q(\theta_s),

    and k-hat is the shape of a generalised Pareto fitted to their largest
    :math:`M = \min(S/5, 3\sqrt{S})` values by ArviZ's PSIS (``arviz.psislw`` on ArviZ 0.x,
    ``arviz_stats`` on ArviZ 1.x). Below 0.5 the approximation is close to the posterior;
    between 0.5 and 0.7 PSIS-corrected estimates are still usable; above 0.7 the guide family
    misses the posterior (Yao et al. 2018) and neither it nor importance-corrected estimates
    can be trusted. Exactly equal ratios (q = p up to normalisation) give k-hat = -inf.

    Args:
        data: an object from :func:`from_pyro_guide` / :func:`from_numpyro_guide`; its
            ``sample_stats`` holds ``lp`` (log joint) and ``log_q`` per draw.
        log_weights: alternatively, the raw log ratios directly (any shape, flattened).

    Returns:
        :class:`VIParetoKhat` with ``khat``, the raw and the smoothed log weights.

    References:
        Yao, Vehtari, Simpson, Gelman, "Yes, but Did It Work?: Evaluating Variational
        Inference" <https://arxiv.org/abs/1802.02538>, ICML 2018.
        Vehtari, Simpson, Gelman, Yao, Gabry, "Pareto Smoothed Importance Sampling"
        <https://jmlr.org/papers/v25/19-556.html>, JMLR 2024.
    """
    if (data is None) == (log_weights is None):
        raise ValueError(
            "pass exactly one of data (the exported ArviZ object) and log_weights "
            f"(got data = {type(data).__name__}, log_weights = {type(log_weights).__name__})"
        )
    if log_weights is None:
        lw = (
            _group_var(data, "sample_stats", LOG_P_VAR)
            - _group_var(data, "sample_stats", LOG_Q_VAR)
        ).reshape(-1)
    else:
        lw = np.asarray(log_weights, dtype=float).reshape(-1)
    if lw.size < 5:
        raise ValueError(
            f"log_weights must hold at least 5 draws for a Pareto fit (got {lw.size}); "
            "use num_draws >= 100 (1000 recommended)"
        )
    if not np.all(np.isfinite(lw)):
        raise ValueError(
            f"log_weights holds {int(np.sum(~np.isfinite(lw)))} non-finite values; a draw of "
            "the guide has zero density under the model (check supports/constraints)"
        )
    if np.ptp(lw) == 0.0:
        # All ratios equal: q = p up to normalisation and the weights have no tail at all.
        # ArviZ 0.x reports k = inf and ArviZ 1.x raises here, so answer directly.
        smoothed, khat = np.full_like(lw, -math.log(lw.size)), -math.inf
    else:
        smoothed, khat = _psislw(lw)
    good_k = min(1.0 - 1.0 / math.log10(lw.size), KHAT_THRESHOLD)
    logger.debug("vi_pareto_khat: k-hat = %.3f over %d draws", khat, lw.size)
    return VIParetoKhat(
        khat=khat,
        log_weights=lw,
        smoothed_log_weights=smoothed,
        good_k=good_k,
        ok=bool(khat <= good_k),
    )


def vi_loo(data: Any, *, pointwise: bool | None = None, var_name: str | None = None):
    r"""PSIS-LOO-CV for variational draws, with the approximate-posterior correction.

    Draws come from q, not from the posterior, so each leave-one-out ratio carries the
    correction p/q (Magnusson et al. 2019):

    .. math:: \log r_{is} = -\log p(y_i \mid \theta_s) + \log p(\theta_s, y) - \log q(\theta_s).

    On ArviZ 1.x this is ``arviz.loo_approximate_posterior`` itself. ArviZ 0.x has no such
    function, so the same ratios are smoothed with ``arviz.psislw`` and summarised as
    ``arviz.loo`` does; the result is an ``arviz.ELPDData`` with the same fields.

    Args:
        data: an object from :func:`from_pyro_guide` / :func:`from_numpyro_guide`.
        pointwise: return ``loo_i`` / ``pareto_k`` per observation (default: ArviZ rcParam).
        var_name: the log-likelihood variable when the model has several observed sites.

    References:
        Magnusson, Andersen, Jonasson, Vehtari, "Bayesian Leave-One-Out Cross-Validation for
        Large Data" <https://proceedings.mlr.press/v97/magnusson19a.html>, ICML 2019.
        Vehtari, Gelman, Gabry, "Practical Bayesian model evaluation using leave-one-out
        cross-validation and WAIC" <https://arxiv.org/abs/1507.04544>, 2017.
    """
    az = require_arviz()
    log_p = _group_var(data, "sample_stats", LOG_P_VAR)
    log_q = _group_var(data, "sample_stats", LOG_Q_VAR)
    if uses_datatree():
        return az.loo_approximate_posterior(
            data,
            log_p=data["sample_stats"][LOG_P_VAR],
            log_q=data["sample_stats"][LOG_Q_VAR],
            pointwise=pointwise,
            var_name=var_name,
        )
    return _loo_approximate_posterior_v0(az, data, log_p, log_q, pointwise, var_name)


def _loo_approximate_posterior_v0(az, data, log_p, log_q, pointwise, var_name):
    """ArviZ 0.x: the approximate-posterior PSIS-LOO with ``az.psislw``, laid out as az.loo."""
    import xarray as xr
    from arviz.stats.stats_utils import get_log_likelihood
    from scipy.special import logsumexp

    pointwise = az.rcParams["stats.ic_pointwise"] if pointwise is None else pointwise
    loglik = get_log_likelihood(data, var_name=var_name).stack(__sample__=("chain", "draw"))
    n_samples = loglik.sizes["__sample__"]
    n_data_points = int(np.prod([s for d, s in loglik.sizes.items() if d != "__sample__"]))
    correction = (log_p - log_q).reshape(-1)
    correction = correction - correction.max()
    log_ratios = -loglik + xr.DataArray(correction, dims=["__sample__"])
    log_weights, pareto_k = az.psislw(log_ratios, reff=1.0)
    good_k = min(1 - 1 / np.log10(n_samples), KHAT_THRESHOLD)
    warn = bool(np.any(pareto_k > good_k))
    if warn:
        warnings.warn(
            f"Estimated shape parameter of Pareto distribution is greater than {good_k:.2f} "
            "for one or more observations: the importance-corrected LOO is unreliable there.",
            UserWarning,
            stacklevel=3,
        )
    axis = loglik.get_axis_num("__sample__")
    loo_i = logsumexp(log_weights.values + loglik.values, axis=axis)
    lppd_i = logsumexp(loglik.values, axis=axis, b=1.0 / n_samples)
    elpd = float(loo_i.sum())
    se = float((n_data_points * np.var(loo_i)) ** 0.5)
    p_loo = float(lppd_i.sum() - elpd)
    ELPDData = az.ELPDData
    if not pointwise:
        return ELPDData(
            data=[elpd, se, p_loo, n_samples, n_data_points, warn, "log", good_k],
            index=[
                "elpd_loo",
                "se",
                "p_loo",
                "n_samples",
                "n_data_points",
                "warning",
                "scale",
                "good_k",
            ],
        )
    obs = loglik.isel(__sample__=0, drop=True)
    return ELPDData(
        data=[
            elpd,
            se,
            p_loo,
            n_samples,
            n_data_points,
            warn,
            obs.copy(data=loo_i).rename("loo_i"),
            pareto_k,
            "log",
            good_k,
        ],
        index=[
            "elpd_loo",
            "se",
            "p_loo",
            "n_samples",
            "n_data_points",
            "warning",
            "loo_i",
            "pareto_k",
            "scale",
            "good_k",
        ],
    )
