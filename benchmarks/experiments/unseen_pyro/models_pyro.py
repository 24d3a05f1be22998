"""Pyro ports of the 12 NumPyro models of ``unseen_numpyro/models.py``, on the same data.

Each ``MODELS[name]()`` returns ``(model, args)``: the data come from calling the NumPyro
builder of the same name (fixed numpy seeds there), converted to float32 torch tensors (index
and class arrays to int64). Latent site names, shapes and supports match the NumPyro models;
observed sites sit in a ``pyro.plate`` (or ``to_event``), which leaves the log density as is.
"""

import os
import sys

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.distributions.transforms import OrderedTransform

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "unseen_numpyro"))
import models as np_models  # noqa: E402

MODELS = {}


def register(fn):
    MODELS[fn.__name__] = fn
    return fn


def numpyro_args(name):
    """The NumPyro builder's data, as numpy arrays."""
    _, args = np_models.MODELS[name]()
    return [np.asarray(a) for a in args]


def f32(a):
    return torch.tensor(np.asarray(a, dtype=np.float32))


def i64(a):
    return torch.tensor(np.asarray(a, dtype=np.int64))


@register
def radon_lkj():
    g, x, y = numpyro_args("radon_lkj")
    J = 12

    def model(g, x, y):
        mu = pyro.sample("mu", dist.Normal(0.0, 5.0).expand([2]).to_event(1))
        tau = pyro.sample("tau", dist.HalfNormal(1.0).expand([2]).to_event(1))
        L = pyro.sample("L_omega", dist.LKJCholesky(2, 2.0))
        z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([J, 2]).to_event(2))
        ab = mu + (z @ (tau[:, None] * L).T)
        sigma = pyro.sample("sigma", dist.HalfNormal(2.0))
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Normal(ab[g, 0] + ab[g, 1] * x, sigma), obs=y)

    return model, (i64(g), f32(x), f32(y))


@register
def changepoint_sigmoid():
    t, y = numpyro_args("changepoint_sigmoid")
    T = 100.0

    def model(t, y):
        m1 = pyro.sample("m1", dist.Normal(0.0, 5.0))
        m2 = pyro.sample("m2", dist.Normal(0.0, 5.0))
        cp = pyro.sample("cp", dist.Uniform(0.0, T))
        sigma = pyro.sample("sigma", dist.HalfNormal(2.0))
        w = 1.0 / (1.0 + torch.exp(-(t - cp) / 2.0))
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Normal(m1 + (m2 - m1) * w, sigma), obs=y)

    return model, (f32(t), f32(y))


@register
def irt_2pl():
    pp, ii, y = numpyro_args("irt_2pl")
    P, I = 40, 8  # noqa: E741

    def model(pp, ii, y):
        theta = pyro.sample("theta", dist.Normal(0.0, 1.0).expand([P]).to_event(1))
        a = pyro.sample("a", dist.LogNormal(0.0, 0.5).expand([I]).to_event(1))
        b = pyro.sample("b", dist.Normal(0.0, 2.0).expand([I]).to_event(1))
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Bernoulli(logits=a[ii] * (theta[pp] - b[ii])), obs=y)

    return model, (i64(pp), i64(ii), f32(y))


@register
def zip_regression():
    X, y = numpyro_args("zip_regression")

    def model(X, y):
        gate = pyro.sample("gate", dist.Beta(1.0, 1.0))
        b0 = pyro.sample("b0", dist.Normal(0.0, 3.0))
        b = pyro.sample("b", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.ZeroInflatedPoisson(torch.exp(b0 + X @ b), gate=gate), obs=y)

    return model, (f32(X), f32(y))


@register
def weibull_censored():
    X, obs_t, event = numpyro_args("weibull_censored")

    def model(X, t, event):
        k = pyro.sample("k", dist.Gamma(2.0, 1.0))
        b0 = pyro.sample("b0", dist.Normal(0.0, 5.0))
        b = pyro.sample("b", dist.Normal(0.0, 1.0).expand([3]).to_event(1))
        sc = torch.exp(b0 + X @ b)
        lp = dist.Weibull(sc, k).log_prob(t)
        logS = -((t / sc) ** k)
        pyro.factor("lik", torch.sum(event * lp + (1 - event) * logS))

    return model, (f32(X), f32(obs_t), f32(event))


@register
def beta_regression():
    X, y = numpyro_args("beta_regression")

    def model(X, y):
        b0 = pyro.sample("b0", dist.Normal(0.0, 2.0))
        b = pyro.sample("b", dist.Normal(0.0, 1.0).expand([3]).to_event(1))
        phi = pyro.sample("phi", dist.Gamma(2.0, 0.1))
        m = torch.clamp(1 / (1 + torch.exp(-(b0 + X @ b))), 1e-6, 1 - 1e-6)
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Beta(m * phi, (1 - m) * phi), obs=y)

    return model, (f32(X), f32(y))


@register
def mixture2_ordered():
    (y,) = numpyro_args("mixture2_ordered")

    def model(y):
        w = pyro.sample("w", dist.Dirichlet(torch.ones(2)))
        mu = pyro.sample(
            "mu",
            dist.TransformedDistribution(dist.Normal(0.0, 10.0).expand([2]), OrderedTransform()),
        )
        sigma = pyro.sample("sigma", dist.HalfNormal(3.0).expand([2]).to_event(1))
        mix = dist.MixtureSameFamily(dist.Categorical(w), dist.Normal(mu, sigma))
        with pyro.plate("data", len(y)):
            pyro.sample("y", mix, obs=y)

    return model, (f32(y),)


@register
def multinomial_logit():
    Xa, y = numpyro_args("multinomial_logit")
    P = Xa.shape[1] - 1

    def model(Xa, y):
        B = pyro.sample("B", dist.Normal(0.0, 2.0).expand([2, P + 1]).to_event(2))
        logits = torch.cat([torch.zeros(Xa.shape[0], 1), Xa @ B.T], dim=1)
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Categorical(logits=logits), obs=y)

    return model, (f32(Xa), i64(y))


@register
def horseshoe20():
    X, y = numpyro_args("horseshoe20")
    P = X.shape[1]

    def model(X, y):
        tau = pyro.sample("tau", dist.HalfCauchy(1.0))
        lam = pyro.sample("lam", dist.HalfCauchy(1.0).expand([P]).to_event(1))
        z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([P]).to_event(1))
        sigma = pyro.sample("sigma", dist.HalfNormal(2.0))
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Normal(X @ (tau * lam * z), sigma), obs=y)

    return model, (f32(X), f32(y))


@register
def hier_binomial_beta():
    n, k = numpyro_args("hier_binomial_beta")
    J = len(n)

    def model(n, k):
        phi = pyro.sample("phi", dist.Uniform(0.0, 1.0))
        kappa = pyro.sample("kappa", dist.Pareto(1.0, 1.5))
        theta = pyro.sample(
            "theta", dist.Beta(phi * kappa, (1 - phi) * kappa).expand([J]).to_event(1)
        )
        with pyro.plate("data", J):
            pyro.sample("k", dist.Binomial(n, probs=theta), obs=k)

    return model, (f32(n), f32(k))


@register
def pk_decay_hier():
    times, y = numpyro_args("pk_decay_hier")
    S = y.shape[0]
    dose = 100.0

    def model(times, y):
        mu_V = pyro.sample("mu_logV", dist.Normal(3.0, 1.0))
        mu_k = pyro.sample("mu_logk", dist.Normal(-1.5, 1.0))
        s_V = pyro.sample("s_logV", dist.HalfNormal(0.5))
        s_k = pyro.sample("s_logk", dist.HalfNormal(0.5))
        zV = pyro.sample("zV", dist.Normal(0.0, 1.0).expand([S]).to_event(1))
        zk = pyro.sample("zk", dist.Normal(0.0, 1.0).expand([S]).to_event(1))
        sigma = pyro.sample("sigma", dist.HalfNormal(0.5))
        lV = mu_V + s_V * zV
        lk = mu_k + s_k * zk
        logc = np.log(dose) - lV[:, None] - torch.exp(lk)[:, None] * times[None]
        with pyro.plate("subjects", S):
            pyro.sample("y", dist.LogNormal(logc, sigma).to_event(1), obs=y)

    return model, (f32(times), f32(y))


@register
def spline_rw():
    Bm, y = numpyro_args("spline_rw")
    K = Bm.shape[1]

    def model(Bm, y):
        w0 = pyro.sample("w0", dist.Normal(0.0, 3.0))
        tau = pyro.sample("tau", dist.HalfNormal(1.0))
        eps = pyro.sample("eps", dist.Normal(0.0, 1.0).expand([K - 1]).to_event(1))
        w = w0 + torch.cat([torch.zeros(1), torch.cumsum(tau * eps, dim=0)])
        sigma = pyro.sample("sigma", dist.HalfNormal(1.0))
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Normal(Bm @ w, sigma), obs=y)

    return model, (f32(Bm), f32(y))
