"""The registry of comparison problems: data, model, metrics and ground truth.

A problem is a small frozen dataclass. Its data are built on first use (and cached), from data
sets that scikit-learn and statsmodels ship, so nothing is downloaded. Metrics are computed in
NumPy from the fitted mean-field Gaussian (per-site ``loc`` and ``scale`` in unconstrained space),
which both backends' ``AutoNormal`` guides expose, so one evaluation serves Pyro and NumPyro.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import numpy as np

from pyro_scorevi.compare import metrics as M
from pyro_scorevi.compare.models import (
    TORCH,
    LatentSpec,
    ModelSpec,
    mlp_spec,
    numpyro_model,
    pyro_model,
    vit_spec,
)

__all__ = ["Problem", "PROBLEMS", "DEFAULT_PROBLEM", "get_problem", "Dataset", "nuts_reference"]

#: The problem ``python -m pyro_scorevi`` runs with no argument.
DEFAULT_PROBLEM = "digits-mlp"

#: File of the cached NUTS reference (made by ``benchmarks/make_nuts_reference.py``).
NUTS_REFERENCE_FILE = "breast_cancer_nuts.json"


@dataclass(frozen=True)
class Dataset:
    """Arrays of one problem (float32 inputs; int labels or float targets).

    ``x_train``/``y_train`` are what the model is fitted to; ``x_test``/``y_test`` what the
    predictive metrics use (``None`` where the figure of merit is a ground truth instead).
    ``extra`` holds problem-specific arrays (ground truth, scaling constants, time axes).
    """

    x_train: np.ndarray | None
    y_train: np.ndarray | None
    x_test: np.ndarray | None = None
    y_test: np.ndarray | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Problem:
    """One comparison problem.

    Attributes:
        name: registry key (command-line name).
        description: one line for ``pyro-scorevi list`` and the table header.
        kind: ``"gaussian"``, ``"posterior"``, ``"classifier"`` or ``"forecaster"``; picks the
            metrics and the plots.
        headline: the metric plotted against time and gradient evaluations (lower is better).
        grad_evals: default budget of gradient evaluations per fit.
        batch_size: mini-batch size of the likelihood plate (``None``: no data or full batch).
        elbo_lr: Adam learning rate of the ELBO baseline.
        prox_weight: a fixed proximal weight for the score-proximal method (``FixedStep``);
            ``None`` (every problem): the library's default ``AdaptiveStep``.
        scale_prox_weight: its separate weight on the scale part (``None``: ``prox_weight``).
        init_scale: initial ``scale`` of the ``AutoNormal`` guide, shared by both methods.
        build: ``build() -> (ModelSpec, Dataset, prior)``, cached by :meth:`load`.
    """

    name: str
    description: str
    kind: str
    headline: str
    grad_evals: int
    batch_size: int | None
    build: Callable[[], tuple[ModelSpec, Dataset, Any]]
    elbo_lr: float = 1e-2
    prox_weight: float | None = None
    scale_prox_weight: float | None = None
    init_scale: float = 0.1

    def load(self) -> tuple[ModelSpec, Dataset, Any]:
        return _load(self.name)

    # -- models -----------------------------------------------------------------------------

    def pyro_model_and_args(self, full_batch: bool = False):
        """``(model, args, kwargs)`` of the Pyro model with its training data as tensors."""
        import torch

        spec, data, prior = self.load()
        model = pyro_model(spec, prior)
        if spec.likelihood == "none":
            return model, (), {}
        x = torch.as_tensor(data.x_train)
        y = torch.as_tensor(data.y_train)
        return model, (x, y), {"batch_size": None if full_batch else self.batch_size}

    def numpyro_model_and_args(self, full_batch: bool = False):
        """The NumPyro twin of :meth:`pyro_model_and_args` (``jax.numpy`` arrays)."""
        import jax.numpy as jnp

        spec, data, _ = self.load()
        prior = self._numpyro_prior() if spec.likelihood == "none" else None
        model = numpyro_model(spec, prior)
        if spec.likelihood == "none":
            return model, (), {}
        args = (jnp.asarray(data.x_train), jnp.asarray(data.y_train))
        return model, args, {"batch_size": None if full_batch else self.batch_size}

    def _numpyro_prior(self):
        import jax.numpy as jnp
        import numpyro.distributions as dist

        _, data, _ = self.load()
        mu = jnp.asarray(data.extra["mu"])
        prec = jnp.asarray(data.extra["precision"])
        return lambda: dist.MultivariateNormal(mu, precision_matrix=prec)

    # -- evaluation -------------------------------------------------------------------------

    def sample(
        self, loc: dict[str, np.ndarray], scale: dict[str, np.ndarray], num: int, seed: int
    ) -> dict[str, np.ndarray]:
        """``num`` draws from the fitted mean-field Gaussian, mapped to constrained space."""
        spec, _, _ = self.load()
        rng = np.random.default_rng(seed)
        out = {}
        for s in spec.latents:
            z = loc[s.name] + scale[s.name] * rng.standard_normal((num, *np.shape(loc[s.name])))
            out[s.name] = np.exp(z) if s.positive else z
        return out

    def predict(self, draws: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
        """Network outputs for each posterior draw: shape ``(K, N, out)``."""
        import torch

        spec, _, _ = self.load()
        xt = torch.as_tensor(x)
        outs = []
        with torch.no_grad():
            for k in range(len(next(iter(draws.values())))):
                values = {n: torch.as_tensor(v[k], dtype=torch.float32) for n, v in draws.items()}
                outs.append(spec.forward(values, xt, TORCH).numpy())
        return np.stack(outs)

    def evaluate(
        self,
        loc: dict[str, np.ndarray],
        scale: dict[str, np.ndarray],
        num_samples: int = 100,
        seed: int = 0,
        details: bool = False,
    ) -> dict[str, Any]:
        """The problem's figures of merit for a fitted guide (all floats; lower is better
        except ``accuracy`` and ``coverage90``, whose target is 0.9).

        With ``details=True`` also returns arrays for plots under the key ``"_plot"``.
        """
        spec, data, _ = self.load()
        out: dict[str, Any] = {}
        if self.kind == "gaussian":
            (site,) = spec.latents
            mu, prec = data.extra["mu"], data.extra["precision"]
            m, s = np.asarray(loc[site.name], float), np.asarray(scale[site.name], float)
            opt_scale = 1 / np.sqrt(np.diag(prec))
            kl = M.gaussian_kl(m, s, mu, prec)
            out["kl_gap"] = kl - data.extra["optimal_kl"]
            out["neg_elbo"] = kl  # the target is normalised: log Z = 0
            out["mean_z_rmse"] = float(np.sqrt(np.mean(((m - mu) / opt_scale) ** 2)))
            out["log_sd_rmse"] = float(np.sqrt(np.mean(np.log(s / opt_scale) ** 2)))
            return out
        if self.kind == "posterior":
            ref = nuts_reference()
            m = np.concatenate([np.ravel(loc[s.name]) for s in spec.latents])
            sd = np.concatenate([np.ravel(scale[s.name]) for s in spec.latents])
            out.update(M.moment_errors(m, sd, np.asarray(ref["mean"]), np.asarray(ref["sd"])))
            return out
        draws = self.sample(loc, scale, num_samples, seed)
        f = self.predict(draws, data.x_test)
        if self.kind == "classifier":
            logits = f - f.max(-1, keepdims=True)
            p = np.exp(logits)
            probs = (p / p.sum(-1, keepdims=True)).mean(0)
            y = data.y_test
            out.update(
                nll=M.nll(probs, y),
                accuracy=M.accuracy(probs, y),
                ece=M.ece(probs, y),
                brier=M.brier(probs, y),
            )
            if details:
                conf, acc, count = M.reliability(probs, y)
                out["_plot"] = {"confidence": conf, "accuracy": acc, "count": count}
            return out
        # Forecaster: predictive draws on the original scale (noise included).
        sd_noise = draws["sigma"][:, None]
        rng = np.random.default_rng(seed + 1)
        z = f[..., 0] + sd_noise * rng.standard_normal(f[..., 0].shape)
        scale_y, shift_y = data.extra["y_scale"], data.extra["y_shift"]
        pred = z * scale_y + shift_y
        y = data.y_test * scale_y + shift_y
        point = pred.mean(0)
        out.update(
            mse=M.mse(point, y),
            mae=M.mae(point, y),
            crps=M.crps(pred, y),
            coverage90=M.coverage(pred, y, 0.9),
        )
        if details:
            lo, hi = np.quantile(pred, [0.05, 0.95], axis=0)
            out["_plot"] = {"time": data.extra["t_test"], "y": y, "mean": point, "lo": lo, "hi": hi}
        return out

    def latent_names(self) -> list[str]:
        return [s.name for s in self.load()[0].latents]


# ---------------------------------------------------------------------------------------------
# Data and ground truth
# ---------------------------------------------------------------------------------------------


def _gaussian() -> tuple[ModelSpec, Dataset, Any]:
    # A 20-d Gaussian with correlated coordinates (the test case of ALGORITHM.md): covariance
    # Q diag(e) Q^T with eigenvalues log-uniform on [0.1, 10] (condition number 100), so the
    # mean-field optimum (scale_j = 1 / sqrt(Lambda_jj)) is much narrower than the marginals.
    d = 20
    rng = np.random.default_rng(20)
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    eig = np.exp(rng.uniform(np.log(0.1), np.log(10.0), d))
    cov = (q * eig) @ q.T
    prec = np.linalg.inv(cov)
    prec = 0.5 * (prec + prec.T)
    mu = rng.standard_normal(d)
    opt_scale = 1 / np.sqrt(np.diag(prec))
    optimal_kl = M.gaussian_kl(mu, opt_scale, mu, prec)

    def prior():
        import pyro.distributions as dist
        import torch

        return dist.MultivariateNormal(
            torch.as_tensor(mu, dtype=torch.float32),
            precision_matrix=torch.as_tensor(prec, dtype=torch.float32),
        )

    spec = ModelSpec((LatentSpec("theta", (d,)),), lambda v, x, ops: None, "none")
    extra = {"mu": mu, "precision": prec, "optimal_kl": optimal_kl}
    return spec, Dataset(None, None, extra=extra), prior


def _breast_cancer() -> tuple[ModelSpec, Dataset, Any]:
    from sklearn.datasets import load_breast_cancer

    x, y = load_breast_cancer(return_X_y=True)
    x = ((x - x.mean(0)) / x.std(0)).astype(np.float32)
    # Logistic regression = a network with no hidden layer: coefficients w0 (30, 1), intercept b0,
    # N(0, 1) priors on the standardised features.
    spec = mlp_spec((x.shape[1], 1), "bernoulli")
    return spec, Dataset(x, y.astype(np.float32)), None


def _digits_split() -> Dataset:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.2, random_state=0, stratify=y)
    return Dataset(xtr, ytr.astype(np.int64), xte, yte.astype(np.int64))


def _digits_mlp() -> tuple[ModelSpec, Dataset, Any]:
    # 64-64-10, tanh, N(0, 1) priors: the network of ALGORITHM.md.
    return mlp_spec((64, 64, 10), "categorical"), _digits_split(), None


def _digits_vit() -> tuple[ModelSpec, Dataset, Any]:
    # 8x8 images in 2x2 patches: 16 tokens, width 16, 2 heads, one block (about 2.6k weights).
    return vit_spec(side=8, patch=2, dim=16, heads=2, hidden=32, classes=10), _digits_split(), None


#: Lagged inputs of the forecaster: 12 years covers one solar cycle (about 11 years).
SUNSPOT_LAGS = 12
#: Years held out at the end of the series for the forecast metrics.
SUNSPOT_TEST_YEARS = 50


def _sunspots() -> tuple[ModelSpec, Dataset, Any]:
    import statsmodels.api as sm

    df = sm.datasets.sunspots.load_pandas().data
    years = df["YEAR"].to_numpy()
    v = df["SUNACTIVITY"].to_numpy(dtype=float)
    n_test = SUNSPOT_TEST_YEARS
    shift, scale = v[:-n_test].mean(), v[:-n_test].std()
    z = (v - shift) / scale
    lags = SUNSPOT_LAGS
    x = np.stack([z[t - lags : t] for t in range(lags, len(z))]).astype(np.float32)
    y = z[lags:].astype(np.float32)
    t = years[lags:]
    spec = mlp_spec(
        (lags, 16, 1),
        "normal",
        noise_site="sigma",
        extra_latents=(LatentSpec("sigma", (), 1.0, positive=True),),
    )
    data = Dataset(
        x[:-n_test],
        y[:-n_test],
        x[-n_test:],
        y[-n_test:],
        extra={"y_shift": shift, "y_scale": scale, "t_test": t[-n_test:]},
    )
    return spec, data, None


@functools.cache
def _load(name: str) -> tuple[ModelSpec, Dataset, Any]:
    return PROBLEMS[name].build()


def nuts_reference() -> dict[str, Any]:
    """The cached NUTS posterior moments of the breast-cancer logistic regression."""
    text = resources.files("pyro_scorevi.data").joinpath(NUTS_REFERENCE_FILE).read_text()
    return json.loads(text)


def _register(problem: Problem) -> None:
    PROBLEMS[problem.name] = problem


PROBLEMS: dict[str, Problem] = {}

_register(
    Problem(
        "gaussian",
        "20-d Gaussian target with dense precision; exact mean-field optimum",
        "gaussian",
        headline="kl_gap",
        grad_evals=2000,
        batch_size=None,
        build=_gaussian,
    ),
)
_register(
    Problem(
        "logreg",
        "Bayesian logistic regression, breast cancer (569 x 30), batch 64; vs NUTS",
        "posterior",
        headline="mean_z_rmse",
        grad_evals=4000,
        batch_size=64,
        build=_breast_cancer,
    ),
)
_register(
    Problem(
        "digits-mlp",
        "Bayesian MLP 64-64-10 (tanh, N(0,1) prior), sklearn digits, batch 64",
        "classifier",
        headline="nll",
        grad_evals=3000,
        batch_size=64,
        build=_digits_mlp,
    ),
)
_register(
    Problem(
        "digits-vit",
        "Bayesian vision transformer (1 block, 2 heads, width 16), sklearn digits, batch 64",
        "classifier",
        headline="nll",
        grad_evals=3000,
        batch_size=64,
        build=_digits_vit,
        # At AutoNormal's default 0.1 neither method leaves the uniform predictive (accuracy
        # 0.10 after 3000 evaluations, 3 seeds); at 0.01 the ELBO baseline learns.
        init_scale=0.01,
    ),
)
_register(
    Problem(
        "sunspots",
        "Bayesian MLP forecaster (12 lags, 16 tanh units), yearly sunspots, last 50 years held out",
        "forecaster",
        headline="crps",
        grad_evals=3000,
        batch_size=32,
        build=_sunspots,
    ),
)


def get_problem(name: str) -> Problem:
    """The registered problem called ``name``; ``KeyError`` lists the valid names."""
    try:
        return PROBLEMS[name]
    except KeyError:
        raise KeyError(
            f"unknown problem {name!r}; choose one of: {', '.join(PROBLEMS)} (or 'all')"
        ) from None
