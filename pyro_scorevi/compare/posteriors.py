"""A registry of small, realistic posteriors with cached NUTS references (issue 11).

Each :class:`Posterior` is a frozen dataclass: a name, a description, why it is in the suite, a
data builder (data sets that scikit-learn and statsmodels ship, or data generated from a fixed
seed; nothing is downloaded), one model written once against a small backend shim, and the names
of the data arrays the model takes. :attr:`Posterior.pyro_model` and
:attr:`Posterior.numpyro_model` are the same density with the same site names in each backend
(``tests/test_posterior_suite.py`` checks that their log densities agree at the same
unconstrained point). Subsampled posteriors have a ``batch_size``: their likelihood plate is
``pyro.plate(..., subsample_size=B)`` / ``numpyro.plate(..., subsample_size=B)``.

The NUTS references (``benchmarks/make_posterior_references.py``) live in
``pyro_scorevi/data/posterior_references.json``: per latent site, the mean and sd of every
coordinate in the unconstrained space that ``AutoNormal`` fits (``<site>_unconstrained`` in Pyro,
``biject_to(support).inv`` in NumPyro), and the constrained means and sds.

:func:`flat_target` turns a posterior into the flat ``score_fn(theta (B, d), key) -> (log_p (B,),
grad (B, d))`` over the unconstrained vector that dense fitters (GSM, BaM) take.

Only NumPy is imported at module level; torch/Pyro and JAX/NumPyro are imported when a model of
that backend is asked for.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from types import SimpleNamespace
from typing import Any

import numpy as np

__all__ = [
    "Posterior",
    "POSTERIORS",
    "get_posterior",
    "references",
    "reference",
    "latent_sites",
    "pyro_log_density",
    "numpyro_log_density",
    "FlatTarget",
    "flat_target",
    "REFERENCE_FILE",
]

logger = logging.getLogger(__name__)

#: File of the cached NUTS references, in ``pyro_scorevi/data``.
REFERENCE_FILE = "posterior_references.json"


# ---------------------------------------------------------------------------------------------
# Backend shim: the same model code for Pyro and NumPyro
# ---------------------------------------------------------------------------------------------


@functools.cache
def _backend(name: str) -> SimpleNamespace:
    """``sample``, ``plate``, ``dist`` (distributions module) and ``xp`` (torch or jax.numpy)."""
    if name == "pyro":
        import pyro
        import pyro.distributions as dist
        import torch

        return SimpleNamespace(name=name, sample=pyro.sample, plate=pyro.plate, dist=dist, xp=torch)
    if name == "numpyro":
        import jax.numpy as jnp
        import numpyro
        import numpyro.distributions as dist

        return SimpleNamespace(
            name=name, sample=numpyro.sample, plate=numpyro.plate, dist=dist, xp=jnp
        )
    raise ValueError(f"unknown backend {name!r}; choose 'pyro' or 'numpyro'")


# ---------------------------------------------------------------------------------------------
# The registry
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Posterior:
    """One benchmark posterior.

    Attributes:
        name: registry key (command-line name).
        description: one line for tables.
        why: what it tests (the failure mode it stands for).
        build: ``build() -> dict`` of NumPy arrays (float64, or int64 for indices), cached.
        model: ``model(backend, *arrays, batch_size=None)``, written once against the backend
            shim; use :attr:`pyro_model` / :attr:`numpyro_model`.
        args: keys of the ``build()`` dict passed to the model, in order.
        batch_size: ``subsample_size`` of the likelihood plate (``None``: full batch).
        source: where the data come from.
    """

    name: str
    description: str
    why: str
    build: Callable[[], dict[str, np.ndarray]]
    model: Callable
    args: tuple[str, ...]
    batch_size: int | None = None
    source: str = "generated, fixed seed"

    def data(self) -> dict[str, np.ndarray]:
        """The arrays of the posterior (built once per process)."""
        return _data(self.name)

    @property
    def pyro_model(self) -> Callable:
        """The Pyro model: ``pyro_model(*arrays, batch_size=None)``."""
        return functools.partial(self.model, _backend("pyro"))

    @property
    def numpyro_model(self) -> Callable:
        """The NumPyro model of the same density and site names."""
        return functools.partial(self.model, _backend("numpyro"))

    def pyro_model_and_args(self, full_batch: bool = False, dtype: Any = None):
        """``(model, args, kwargs)`` with the data as torch tensors (float32 unless ``dtype``)."""
        import torch

        dtype = dtype or torch.float32
        args = tuple(_as_torch(self.data()[k], dtype) for k in self.args)
        return self.pyro_model, args, {"batch_size": None if full_batch else self.batch_size}

    def numpyro_model_and_args(self, full_batch: bool = False):
        """``(model, args, kwargs)`` with the data as ``jax.numpy`` arrays (JAX's default float
        precision: float32 unless x64 is enabled)."""
        import jax.numpy as jnp

        args = tuple(jnp.asarray(self.data()[k]) for k in self.args)
        return self.numpyro_model, args, {"batch_size": None if full_batch else self.batch_size}


def _as_torch(a: np.ndarray, dtype):
    import torch

    if np.issubdtype(a.dtype, np.integer):
        return torch.as_tensor(a, dtype=torch.long)
    return torch.as_tensor(a, dtype=dtype)


@functools.cache
def _data(name: str) -> dict[str, np.ndarray]:
    post = POSTERIORS[name]
    logger.debug("building the data of posterior %s", name)
    out = {}
    for k, v in post.build().items():
        v = np.asarray(v)
        out[k] = v.astype(np.int64) if np.issubdtype(v.dtype, np.integer) else v.astype(float)
    return out


POSTERIORS: dict[str, Posterior] = {}


def _register(posterior: Posterior) -> None:
    if posterior.name in POSTERIORS:
        raise ValueError(f"posterior {posterior.name!r} registered twice")
    POSTERIORS[posterior.name] = posterior


def get_posterior(name: str) -> Posterior:
    """The registered posterior called ``name``; ``KeyError`` lists the valid names."""
    try:
        return POSTERIORS[name]
    except KeyError:
        raise KeyError(
            f"unknown posterior {name!r}; choose from: {', '.join(POSTERIORS)}"
        ) from None


# ---------------------------------------------------------------------------------------------
# Models (one code path, two backends)
# ---------------------------------------------------------------------------------------------


def _noise(be, kind: str, scale: float):
    d = be.dist.HalfCauchy(scale) if kind == "halfcauchy" else be.dist.HalfNormal(scale)
    return be.sample("sigma", d)


def _linreg(be, x, y, batch_size=None, *, intercept_sd, coef_sd, noise=("halfnormal", 1.0)):
    """y ~ Normal(b0 + x @ w, sigma); x (N, p) on whatever scale the data come."""
    b0 = be.sample("intercept", be.dist.Normal(0.0, intercept_sd))
    w = be.sample("w", be.dist.Normal(0.0, coef_sd).expand([x.shape[1]]).to_event(1))
    sigma = _noise(be, *noise)
    with be.plate("data", x.shape[0], subsample_size=batch_size) as idx:
        be.sample("y", be.dist.Normal(b0 + x[idx] @ w, sigma), obs=y[idx])


def _simple_linreg(be, x, y, batch_size=None):
    """The issue's case (1): a, b ~ Normal(0, 100), s ~ HalfCauchy(2.5), y ~ Normal(a + b x, s)."""
    a = be.sample("a", be.dist.Normal(0.0, 100.0))
    b = be.sample("b", be.dist.Normal(0.0, 100.0))
    s = be.sample("s", be.dist.HalfCauchy(2.5))
    with be.plate("data", x.shape[0], subsample_size=batch_size) as idx:
        be.sample("y", be.dist.Normal(a + b * x[idx], s), obs=y[idx])


def _logreg(be, x, y, batch_size=None, *, intercept_sd, coef_sd):
    b0 = be.sample("intercept", be.dist.Normal(0.0, intercept_sd))
    w = be.sample("w", be.dist.Normal(0.0, coef_sd).expand([x.shape[1]]).to_event(1))
    with be.plate("data", x.shape[0], subsample_size=batch_size) as idx:
        be.sample("y", be.dist.Bernoulli(logits=b0 + x[idx] @ w), obs=y[idx])


def _poisson_glm(be, x, y, batch_size=None, *, intercept_sd, coef_sd):
    b0 = be.sample("intercept", be.dist.Normal(0.0, intercept_sd))
    w = be.sample("w", be.dist.Normal(0.0, coef_sd).expand([x.shape[1]]).to_event(1))
    with be.plate("data", x.shape[0], subsample_size=batch_size) as idx:
        be.sample("y", be.dist.Poisson(be.xp.exp(b0 + x[idx] @ w)), obs=y[idx])


def _eight_schools(be, sigma, y, batch_size=None):
    """Non-centred eight schools: theta_j = mu + tau * theta_raw_j."""
    mu = be.sample("mu", be.dist.Normal(0.0, 5.0))
    tau = be.sample("tau", be.dist.HalfCauchy(5.0))
    raw = be.sample("theta_raw", be.dist.Normal(0.0, 1.0).expand([y.shape[0]]).to_event(1))
    with be.plate("schools", y.shape[0]):
        be.sample("y", be.dist.Normal(mu + tau * raw, sigma), obs=y)


def _hier_regression(be, x, group, y, batch_size=None, *, num_groups):
    """Centred varying intercepts: alpha_j ~ Normal(mu_alpha, tau), y ~ Normal(alpha_g + beta x)."""
    mu_a = be.sample("mu_alpha", be.dist.Normal(0.0, 5.0))
    tau = be.sample("tau", be.dist.HalfNormal(2.0))
    alpha = be.sample("alpha", be.dist.Normal(mu_a, tau).expand([num_groups]).to_event(1))
    beta = be.sample("beta", be.dist.Normal(0.0, 5.0))
    sigma = be.sample("sigma", be.dist.HalfNormal(2.0))
    with be.plate("data", x.shape[0], subsample_size=batch_size) as idx:
        be.sample("y", be.dist.Normal(alpha[group[idx]] + beta * x[idx], sigma), obs=y[idx])


def _autoregressive(be, lags, y, batch_size=None, *, const_sd, noise_scale):
    """AR(p) on the raw series, conditional on the first p values: lags (T - p, p)."""
    c = be.sample("c", be.dist.Normal(0.0, const_sd))
    phi = be.sample("phi", be.dist.Normal(0.0, 1.0).expand([lags.shape[1]]).to_event(1))
    sigma = be.sample("sigma", be.dist.HalfNormal(noise_scale))
    with be.plate("time", y.shape[0], subsample_size=batch_size) as idx:
        be.sample("y", be.dist.Normal(c + lags[idx] @ phi, sigma), obs=y[idx])


def _garch(be, r, r_sq, expo, mask, t, h0, batch_size=None):
    """GARCH(1, 1): h_t = omega + alpha r_{t-1}^2 + beta h_{t-1}, h_0 fixed; r_t ~ N(mu, h_t).

    alpha + beta = persistence ~ Beta(2, 1) in (0, 1) (stationarity), alpha = persistence *
    alpha_share, alpha_share ~ Beta(2, 5); omega > 0. The recursion is unrolled as a matrix
    P[t, s] = beta^(t - 1 - s) for s < t (``expo`` holds t - 1 - s, 0 elsewhere, ``mask`` the
    lower triangle): h_t = omega sum_s P[t, s] + alpha sum_s P[t, s] r_s^2 + beta^t h_0.
    """
    mu = be.sample("mu", be.dist.Normal(0.0, 1.0))
    omega = be.sample("omega", be.dist.HalfNormal(1.0))
    persistence = be.sample("persistence", be.dist.Beta(2.0, 1.0))
    share = be.sample("alpha_share", be.dist.Beta(2.0, 5.0))
    alpha = persistence * share
    beta = persistence * (1.0 - share)
    log_beta = be.xp.log(beta)
    p = be.xp.exp(expo * log_beta) * mask
    h = omega * p.sum(-1) + alpha * (p @ r_sq) + be.xp.exp(t * log_beta) * h0
    with be.plate("time", r.shape[0]):
        be.sample("r", be.dist.Normal(mu, be.xp.sqrt(h)), obs=r)


def _gp_poisson(be, scale_tril, log_offset, y, batch_size=None):
    """Latent GP (fixed squared-exponential kernel) with Poisson counts: f ~ MVN(0, K)."""
    f = be.sample(
        "f", be.dist.MultivariateNormal(be.xp.zeros_like(log_offset), scale_tril=scale_tril)
    )
    with be.plate("bins", y.shape[0]):
        be.sample("y", be.dist.Poisson(be.xp.exp(log_offset + f)), obs=y)


# ---------------------------------------------------------------------------------------------
# Data builders
# ---------------------------------------------------------------------------------------------


def _issue_linreg() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(11)
    x = 100 + 15 * rng.standard_normal(400)
    y = 25 + 0.6 * x + 18 * rng.standard_normal(400)
    return {"x": x, "y": y}


def _subsampled_linreg() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(12)
    n, w = 3000, np.array([3.0, -2.0, 1.5, 0.5, -1.0])
    x = rng.standard_normal((n, len(w)))
    y = 1.0 + x @ w + 0.5 * rng.standard_normal(n)
    return {"x": x, "y": y}


def _diabetes_raw() -> dict[str, np.ndarray]:
    from sklearn.datasets import load_diabetes

    x, y = load_diabetes(return_X_y=True, scaled=False)
    # Columns: age, sex (1/2), bmi, bp, s1 (tc), s2 (ldl), s3 (hdl), s4 (tch), s5 (ltg), s6 (glu);
    # s1 and s2 correlate at 0.9. Interactions bmi * bp (order 2500) and age * sex.
    age, sex, bmi, bp = x[:, 0], x[:, 1], x[:, 2], x[:, 3]
    xs = np.column_stack([x, bmi * bp, age * sex])
    return {"x": xs, "y": y}


def _stackloss() -> dict[str, np.ndarray]:
    import statsmodels.api as sm

    d = sm.datasets.stackloss.load_pandas().data
    air, water, acid = d["AIRFLOW"], d["WATERTEMP"], d["ACIDCONC"]
    x = np.column_stack([air, water, acid, air * water])
    return {"x": x, "y": d["STACKLOSS"].to_numpy()}


def _statecrime() -> dict[str, np.ndarray]:
    import statsmodels.api as sm

    d = sm.datasets.statecrime.load_pandas().data
    cols = ["hs_grad", "poverty", "single", "white", "urban"]
    x = np.column_stack([d[c] for c in cols] + [d["poverty"] * d["single"]])
    return {"x": x, "y": d["violent"].to_numpy()}


def _ccard() -> dict[str, np.ndarray]:
    import statsmodels.api as sm

    d = sm.datasets.ccard.load_pandas().data
    x = np.column_stack(
        [d["AGE"], d["INCOME"], d["INCOMESQ"], d["OWNRENT"], d["AGE"] * d["INCOME"]]
    )
    return {"x": x, "y": d["AVGEXP"].to_numpy()}


#: Raw breast-cancer columns of the logistic regression (scales 0.01 to 1000).
CANCER_COLUMNS = (
    "mean radius",
    "mean texture",
    "mean perimeter",
    "mean area",
    "mean smoothness",
    "mean concave points",
)


def _cancer_raw() -> dict[str, np.ndarray]:
    from sklearn.datasets import load_breast_cancer

    b = load_breast_cancer()
    names = list(b.feature_names)
    x = np.column_stack([b.data[:, names.index(c)] for c in CANCER_COLUMNS])
    return {"x": x, "y": b.target.astype(float)}


def _poisson_raw() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(14)
    n = 500
    age = rng.uniform(20, 80, n)
    income = np.exp(rng.normal(np.log(40), 0.35, n))  # thousands
    bmi = rng.normal(27, 4, n)
    x = np.column_stack([age, income, bmi])
    eta = -1.5 + 0.03 * age - 0.01 * income + 0.03 * bmi
    return {"x": x, "y": rng.poisson(np.exp(eta)).astype(float)}


def _cpunish() -> dict[str, np.ndarray]:
    import statsmodels.api as sm

    d = sm.datasets.cpunish.load_pandas().data
    # As statsmodels' GLM example, with the log of the violent-crime rate; income in $1000.
    x = np.column_stack(
        [
            d["INCOME"] / 1000,
            d["PERPOVERTY"],
            d["PERBLACK"],
            np.log(d["VC100k96"]),
            d["SOUTH"],
            d["DEGREE"],
        ]
    )
    return {"x": x, "y": d["EXECUTIONS"].to_numpy()}


def _eight_schools_data() -> dict[str, np.ndarray]:
    y = np.array([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0])
    sigma = np.array([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0])
    return {"sigma": sigma, "y": y}


HIER_GROUPS = 12


def _hier_regression_data() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(16)
    sizes = rng.integers(8, 45, HIER_GROUPS)
    group = np.repeat(np.arange(HIER_GROUPS), sizes)
    alpha = 1.5 + 0.6 * rng.standard_normal(HIER_GROUPS)
    x = rng.binomial(1, 0.4, len(group)).astype(float)  # radon-like floor indicator
    y = alpha[group] - 0.7 * x + 0.8 * rng.standard_normal(len(group))
    return {"x": x, "group": group, "y": y}


def _sunspots_ar2() -> dict[str, np.ndarray]:
    import statsmodels.api as sm

    v = sm.datasets.sunspots.load_pandas().data["SUNACTIVITY"].to_numpy(dtype=float)
    lags = np.column_stack([v[1:-1], v[:-2]])  # (y_{t-1}, y_{t-2})
    return {"lags": lags, "y": v[2:]}


GARCH_T = 400


def _garch_data() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(17)
    omega, alpha, beta, mu = 0.1, 0.12, 0.83, 0.05
    t_len = GARCH_T
    r = np.empty(t_len)
    h = omega / (1 - alpha - beta)
    for t in range(t_len):
        if t > 0:
            h = omega + alpha * (r[t - 1] - mu) ** 2 + beta * h
        r[t] = mu + np.sqrt(h) * rng.standard_normal()
    tt = np.arange(t_len)
    diff = tt[:, None] - 1 - tt[None, :]
    mask = (diff >= 0).astype(float)
    # The model's alpha multiplies r^2 (mean mu estimated separately): centre at the data mean.
    r_sq = (r - r.mean()) ** 2
    return {
        "r": r,
        "r_sq": r_sq,
        "expo": np.where(mask > 0, diff, 0).astype(float),
        "mask": mask,
        "t": tt.astype(float),
        "h0": np.array(np.var(r)),
    }


GP_POINTS = 40


def _gp_data() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(18)
    t = np.linspace(0, 10, GP_POINTS)
    k = np.exp(-0.5 * (t[:, None] - t[None, :]) ** 2 / 1.5**2) + 1e-3 * np.eye(GP_POINTS)
    chol = np.linalg.cholesky(k)
    f = chol @ rng.standard_normal(GP_POINTS)
    log_offset = np.full(GP_POINTS, np.log(4.0))
    return {
        "scale_tril": chol,
        "log_offset": log_offset,
        "y": rng.poisson(np.exp(log_offset + f)).astype(float),
    }


# ---------------------------------------------------------------------------------------------
# Registrations
# ---------------------------------------------------------------------------------------------

_p = functools.partial

_register(
    Posterior(
        "raw-linreg-issue",
        "y = 25 + 0.6 x + noise, x ~ 100 +/- 15 (N = 400); a, b ~ N(0, 100), s ~ HalfCauchy(2.5)",
        "the issue's case (1): raw-scale predictor, intercept and slope correlated at -0.99",
        _issue_linreg,
        _simple_linreg,
        ("x", "y"),
    )
)
_register(
    Posterior(
        "subsampled-linreg",
        "linear regression N = 3000, 5 coefficients up to 3, N(0, 10^2) priors, batch 64",
        "the issue's case (2): heavy subsampling (N/B = 47) of a well-determined posterior",
        _subsampled_linreg,
        _p(_linreg, intercept_sd=10.0, coef_sd=10.0, noise=("halfnormal", 5.0)),
        ("x", "y"),
        batch_size=64,
    )
)
_register(
    Posterior(
        "diabetes-raw",
        "diabetes (442 x 10, unscaled) + bmi*bp, age*sex; linear regression, N(0, 10^2) coefs",
        "raw-scale columns (1 to 4700), s1/s2 correlated at 0.90, interaction terms",
        _diabetes_raw,
        _p(_linreg, intercept_sd=200.0, coef_sd=10.0, noise=("halfnormal", 100.0)),
        ("x", "y"),
        source="sklearn load_diabetes(scaled=False)",
    )
)
_register(
    Posterior(
        "stackloss-interact",
        "stack loss (21 x 3, raw) + airflow*watertemp; linear regression",
        "tiny N, raw columns with their product (order 1300), collinear airflow/watertemp",
        _stackloss,
        _p(_linreg, intercept_sd=100.0, coef_sd=10.0, noise=("halfcauchy", 5.0)),
        ("x", "y"),
        source="statsmodels stackloss",
    )
)
_register(
    Posterior(
        "statecrime-raw",
        "US state violent crime (51 states) on 5 raw percentages + poverty*single",
        "raw percentages (10 to 90) and their product, collinear poverty/single/white",
        _statecrime,
        _p(_linreg, intercept_sd=1000.0, coef_sd=50.0, noise=("halfnormal", 300.0)),
        ("x", "y"),
        source="statsmodels statecrime",
    )
)
_register(
    Posterior(
        "ccard-quadratic",
        "credit-card spending (72) on age, income, income^2, owner, age*income",
        "income and its square (r = 0.97) plus an interaction, target of order 300",
        _ccard,
        _p(_linreg, intercept_sd=500.0, coef_sd=100.0, noise=("halfcauchy", 100.0)),
        ("x", "y"),
        source="statsmodels ccard",
    )
)
_register(
    Posterior(
        "cancer-logreg-raw",
        "logistic regression, breast cancer (569) on 6 unstandardised columns (0.01 to 2500)",
        "unstandardised inputs (0.05 to 2500); radius and perimeter correlated at 0.998",
        _cancer_raw,
        _p(_logreg, intercept_sd=10.0, coef_sd=5.0),
        ("x", "y"),
        source="sklearn load_breast_cancer",
    )
)
_register(
    Posterior(
        "poisson-raw",
        "Poisson GLM, exp link, N = 500 on raw age (20-80), income (k$), bmi",
        "the issue's case (4): a steep GLM, far from its mode under the wide default guide",
        _poisson_raw,
        _p(_poisson_glm, intercept_sd=5.0, coef_sd=1.0),
        ("x", "y"),
    )
)
_register(
    Posterior(
        "cpunish-poisson",
        "Poisson GLM of US executions (17 states) on income (k$), %poverty, %black, ...",
        "a steep GLM on real raw-scale covariates with few observations",
        _cpunish,
        _p(_poisson_glm, intercept_sd=10.0, coef_sd=1.0),
        ("x", "y"),
        source="statsmodels cpunish",
    )
)
_register(
    Posterior(
        "eight-schools",
        "eight schools, non-centred (mu, tau ~ HalfCauchy(5), 8 raw effects)",
        "hierarchical model: a scale with a heavy-tailed prior, a prior-dominated posterior",
        _eight_schools_data,
        _eight_schools,
        ("sigma", "y"),
        source="Rubin (1981), the classic eight numbers",
    )
)
_register(
    Posterior(
        "hier-regression",
        f"centred varying-intercept regression, {HIER_GROUPS} groups (8-44 points each)",
        "hierarchical regression with group effects and a group-level scale",
        _hier_regression_data,
        _p(_hier_regression, num_groups=HIER_GROUPS),
        ("x", "group", "y"),
    )
)
_register(
    Posterior(
        "ar2-sunspots",
        "AR(2) on raw yearly sunspots (309 years, values 0-190), conditional likelihood",
        "autoregressive time series on the raw scale: phi1, phi2 strongly correlated",
        _sunspots_ar2,
        _p(_autoregressive, const_sd=50.0, noise_scale=50.0),
        ("lags", "y"),
        source="statsmodels sunspots",
    )
)
_register(
    Posterior(
        "garch11",
        f"GARCH(1, 1) on {GARCH_T} generated returns; persistence ~ Beta, omega > 0",
        "volatility model: Beta/positive constraints, a long recursion, a ridge in (alpha, beta)",
        _garch_data,
        _garch,
        ("r", "r_sq", "expo", "mask", "t", "h0"),
    )
)
_register(
    Posterior(
        "gp-poisson",
        f"latent GP (SE kernel, lengthscale 1.5) with Poisson counts on {GP_POINTS} bins",
        "latent Gaussian process: 40 strongly correlated latents, the latent f as one site",
        _gp_data,
        _gp_poisson,
        ("scale_tril", "log_offset", "y"),
    )
)


# ---------------------------------------------------------------------------------------------
# References and sites
# ---------------------------------------------------------------------------------------------


@functools.cache
def references() -> dict[str, Any]:
    """The cached NUTS references of every posterior (the parsed JSON file)."""
    text = resources.files("pyro_scorevi.data").joinpath(REFERENCE_FILE).read_text()
    return json.loads(text)


def reference(name: str) -> dict[str, Any]:
    """The NUTS reference of one posterior: ``sites`` (in model order), and per site under
    ``latents[site]``: ``shape`` (constrained), ``unconstrained_shape``, ``mean`` / ``sd``
    (unconstrained, flattened), ``constrained_mean`` / ``constrained_sd``; plus ``diagnostics``."""
    refs = references()["posteriors"]
    if name not in refs:
        raise KeyError(
            f"no NUTS reference for {name!r}; run python benchmarks/make_posterior_references.py "
            f"--posteriors {name}"
        )
    return refs[name]


def latent_sites(posterior: Posterior) -> list[tuple[str, Any]]:
    """``(name, support)`` of the latent sample sites, in model order (NumPyro trace, full
    batch)."""
    import jax
    from numpyro import handlers

    model, args, kwargs = posterior.numpyro_model_and_args(full_batch=True)
    tr = handlers.trace(handlers.seed(model, jax.random.PRNGKey(0))).get_trace(*args, **kwargs)
    return [
        (n, s["fn"].support)
        for n, s in tr.items()
        if s["type"] == "sample" and not s["is_observed"]
    ]


# ---------------------------------------------------------------------------------------------
# Log densities in unconstrained space (the mirror check) and the flat score function
# ---------------------------------------------------------------------------------------------


def pyro_log_density(posterior: Posterior, unconstrained: dict[str, Any], dtype: Any = None):
    """Log joint of the full-data Pyro model at an unconstrained point (the space of
    ``AutoNormal``'s ``<site>_unconstrained``), log-Jacobians of ``biject_to(support)``
    included. Returns a 0-d torch tensor (float64 unless ``dtype``)."""
    import torch
    from pyro import poutine
    from pyro.poutine.util import site_is_subsample
    from torch.distributions import biject_to

    dtype = dtype or torch.float64
    model, args, kwargs = posterior.pyro_model_and_args(full_batch=True, dtype=dtype)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # the priors' Python-float parameters
    try:
        tr = poutine.trace(model).get_trace(*args, **kwargs)
        values, log_det = {}, torch.zeros((), dtype=dtype)
        for name, site in tr.nodes.items():
            if site["type"] != "sample" or site["is_observed"] or site_is_subsample(site):
                continue
            z = torch.as_tensor(np.asarray(unconstrained[name]), dtype=dtype)
            t = biject_to(site["fn"].support)
            x = t(z)
            values[name] = x
            log_det = log_det + t.log_abs_det_jacobian(z, x).sum()
        tr = poutine.trace(poutine.condition(model, values)).get_trace(*args, **kwargs)
        return tr.log_prob_sum() + log_det
    finally:
        torch.set_default_dtype(previous)


def numpyro_log_density(posterior: Posterior, unconstrained: dict[str, Any], rng_key=None):
    """Log joint of the NumPyro model at an unconstrained point (minus NumPyro's
    ``potential_energy``, Jacobians included). Full batch unless ``rng_key`` is given, which
    seeds the subsample of a subsampled posterior. Precision: JAX's current default."""
    import jax
    import jax.numpy as jnp
    from numpyro import handlers
    from numpyro.infer.util import potential_energy

    model, args, kwargs = posterior.numpyro_model_and_args(full_batch=rng_key is None)
    key = jax.random.PRNGKey(0) if rng_key is None else rng_key
    params = {k: jnp.asarray(v) for k, v in unconstrained.items()}
    return -potential_energy(handlers.seed(model, key), args, kwargs, params)


@dataclass(frozen=True)
class FlatTarget:
    """A posterior as a flat unconstrained vector, for dense fitters (GSM, BaM).

    Attributes:
        score_fn: ``score_fn(theta (B, d), key) -> (log_p (B,), grad (B, d))``; one mini-batch
            (drawn from ``key``) shared by the ``B`` rows when the posterior is subsampled.
        init_loc: ``(d,)`` the start (``init_strategy``; default NumPyro ``AutoNormal``'s
            ``init_to_uniform``).
        unravel: flat ``(d,)`` -> per-site dict of unconstrained arrays.
        ravel: per-site dict -> flat ``(d,)``.
        dim: ``d``.
    """

    score_fn: Callable
    init_loc: Any
    unravel: Callable
    ravel: Callable
    dim: int


def flat_target(
    posterior: Posterior, seed: int = 0, full_batch: bool = False, init_strategy=None
) -> FlatTarget:
    """The flat score function of ``posterior``'s NumPyro model (``initialize_model`` for the
    start and the sites, ``potential_energy`` for the density, ``ravel_pytree`` for the
    vector). Subsampled posteriors draw their mini-batch from the key passed to ``score_fn``
    unless ``full_batch``. ``init_strategy``: NumPyro's ``init_to_*`` for ``init_loc``
    (default ``init_to_uniform``, as NumPyro's ``AutoNormal``)."""
    import jax
    from jax.flatten_util import ravel_pytree
    from numpyro import handlers
    from numpyro.infer.util import initialize_model, potential_energy

    model, args, kwargs = posterior.numpyro_model_and_args(full_batch=full_batch)
    from numpyro.infer import init_to_uniform

    info = initialize_model(
        jax.random.PRNGKey(seed),
        model,
        init_strategy=init_strategy or init_to_uniform,
        model_args=args,
        model_kwargs=kwargs,
    )
    z0 = info.param_info.z
    flat0, unravel = ravel_pytree(z0)

    def ravel(tree):
        return ravel_pytree({k: tree[k] for k in z0})[0]

    def log_p(theta, key):
        return -potential_energy(handlers.seed(model, key), args, kwargs, unravel(theta))

    value_and_grad = jax.vmap(jax.value_and_grad(log_p), in_axes=(0, None))

    def score_fn(theta, key):
        return value_and_grad(theta, key)

    return FlatTarget(score_fn, flat0, unravel, ravel, int(flat0.shape[0]))
