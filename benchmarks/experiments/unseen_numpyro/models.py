"""12 small Bayesian models (data generated with fixed numpy seeds) for the defaults check."""

import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.distributions.transforms import OrderedTransform

MODELS = {}


def register(fn):
    MODELS[fn.__name__] = fn
    return fn


# 1. radon-style varying intercept + slope, correlated effects (LKJ), non-centred
@register
def radon_lkj():
    rng = np.random.default_rng(1)
    J, N = 12, 300
    g = rng.integers(0, J, N)
    x = rng.integers(0, 2, N).astype(float)  # floor indicator
    Om = np.array([[1, -0.5], [-0.5, 1]])
    sd = np.array([0.4, 0.3])
    ab = rng.multivariate_normal([1.4, -0.7], np.diag(sd) @ Om @ np.diag(sd), J)
    y = ab[g, 0] + ab[g, 1] * x + 0.7 * rng.standard_normal(N)
    g, x, y = jnp.array(g), jnp.array(x), jnp.array(y)

    def model(g, x, y):
        mu = numpyro.sample("mu", dist.Normal(0, 5).expand([2]).to_event(1))
        tau = numpyro.sample("tau", dist.HalfNormal(1).expand([2]).to_event(1))
        L = numpyro.sample("L_omega", dist.LKJCholesky(2, 2.0))
        z = numpyro.sample("z", dist.Normal(0, 1).expand([J, 2]).to_event(2))
        ab = mu + (z @ (tau[:, None] * L).T)
        sigma = numpyro.sample("sigma", dist.HalfNormal(2))
        numpyro.sample("y", dist.Normal(ab[g, 0] + ab[g, 1] * x, sigma), obs=y)

    return model, (g, x, y)


# 2. change point with a smooth sigmoid switch
@register
def changepoint_sigmoid():
    rng = np.random.default_rng(2)
    T = 100
    t = np.arange(T, dtype=float)
    y = np.where(t < 60, 1.0, 3.0) + 0.8 * rng.standard_normal(T)
    t, y = jnp.array(t), jnp.array(y)

    def model(t, y):
        m1 = numpyro.sample("m1", dist.Normal(0, 5))
        m2 = numpyro.sample("m2", dist.Normal(0, 5))
        cp = numpyro.sample("cp", dist.Uniform(0, T))
        sigma = numpyro.sample("sigma", dist.HalfNormal(2))
        w = 1.0 / (1.0 + jnp.exp(-(t - cp) / 2.0))
        numpyro.sample("y", dist.Normal(m1 + (m2 - m1) * w, sigma), obs=y)

    return model, (t, y)


# 3. logistic IRT 2PL
@register
def irt_2pl():
    rng = np.random.default_rng(3)
    P, I = 40, 8  # noqa: E741
    th = rng.standard_normal(P)
    a = np.exp(0.3 * rng.standard_normal(I))
    b = rng.normal(0, 1, I)
    pp, ii = np.meshgrid(np.arange(P), np.arange(I), indexing="ij")
    pp, ii = pp.ravel(), ii.ravel()
    p = 1 / (1 + np.exp(-a[ii] * (th[pp] - b[ii])))
    y = (rng.random(p.shape) < p).astype(float)
    pp, ii, y = jnp.array(pp), jnp.array(ii), jnp.array(y)

    def model(pp, ii, y):
        theta = numpyro.sample("theta", dist.Normal(0, 1).expand([P]).to_event(1))
        a = numpyro.sample("a", dist.LogNormal(0, 0.5).expand([I]).to_event(1))
        b = numpyro.sample("b", dist.Normal(0, 2).expand([I]).to_event(1))
        numpyro.sample("y", dist.Bernoulli(logits=a[ii] * (theta[pp] - b[ii])), obs=y)

    return model, (pp, ii, y)


# 4. zero-inflated Poisson regression
@register
def zip_regression():
    rng = np.random.default_rng(4)
    N = 300
    X = rng.standard_normal((N, 2))
    lam = np.exp(0.8 + X @ np.array([0.5, -0.3]))
    y = np.where(rng.random(N) < 0.3, 0, rng.poisson(lam)).astype(float)
    X, y = jnp.array(X), jnp.array(y)

    def model(X, y):
        gate = numpyro.sample("gate", dist.Beta(1, 1))
        b0 = numpyro.sample("b0", dist.Normal(0, 3))
        b = numpyro.sample("b", dist.Normal(0, 1).expand([2]).to_event(1))
        numpyro.sample("y", dist.ZeroInflatedPoisson(gate, jnp.exp(b0 + X @ b)), obs=y)

    return model, (X, y)


# 5. Weibull survival (AFT-style scale) with right censoring, via numpyro.factor
@register
def weibull_censored():
    rng = np.random.default_rng(5)
    N = 200
    X = rng.standard_normal((N, 3))
    scale = np.exp(2.0 + X @ np.array([0.5, -0.4, 0.0]))
    k = 1.5
    tt = scale * rng.weibull(k, N)
    c = rng.uniform(2, 15, N)
    obs_t = np.minimum(tt, c)
    event = (tt <= c).astype(float)
    X, obs_t, event = jnp.array(X), jnp.array(obs_t), jnp.array(event)

    def model(X, t, event):
        k = numpyro.sample("k", dist.Gamma(2, 1))
        b0 = numpyro.sample("b0", dist.Normal(0, 5))
        b = numpyro.sample("b", dist.Normal(0, 1).expand([3]).to_event(1))
        sc = jnp.exp(b0 + X @ b)
        lp = dist.Weibull(sc, k).log_prob(t)
        logS = -((t / sc) ** k)
        numpyro.factor("lik", jnp.sum(event * lp + (1 - event) * logS))

    return model, (X, obs_t, event)


# 6. beta regression on proportions
@register
def beta_regression():
    rng = np.random.default_rng(6)
    N = 200
    X = rng.standard_normal((N, 3))
    mu = 1 / (1 + np.exp(-(-0.5 + X @ np.array([0.6, -0.4, 0.2]))))
    phi = 15.0
    y = rng.beta(mu * phi, (1 - mu) * phi)
    y = np.clip(y, 1e-4, 1 - 1e-4)
    X, y = jnp.array(X), jnp.array(y)

    def model(X, y):
        b0 = numpyro.sample("b0", dist.Normal(0, 2))
        b = numpyro.sample("b", dist.Normal(0, 1).expand([3]).to_event(1))
        phi = numpyro.sample("phi", dist.Gamma(2, 0.1))
        m = jnp.clip(1 / (1 + jnp.exp(-(b0 + X @ b))), 1e-6, 1 - 1e-6)
        numpyro.sample("y", dist.Beta(m * phi, (1 - m) * phi), obs=y)

    return model, (X, y)


# 7. 2-component Gaussian mixture, well separated, ordered means
@register
def mixture2_ordered():
    rng = np.random.default_rng(7)
    N = 400
    zz = rng.random(N) < 0.35
    y = np.where(zz, rng.normal(-2.0, 0.7, N), rng.normal(3.0, 1.0, N))
    y = jnp.array(y)

    def model(y):
        w = numpyro.sample("w", dist.Dirichlet(jnp.ones(2)))
        mu = numpyro.sample(
            "mu", dist.TransformedDistribution(dist.Normal(0, 10).expand([2]), OrderedTransform())
        )
        sigma = numpyro.sample("sigma", dist.HalfNormal(3).expand([2]).to_event(1))
        mix = dist.MixtureSameFamily(dist.Categorical(w), dist.Normal(mu, sigma))
        numpyro.sample("y", mix, obs=y)

    return model, (y,)


# 8. multinomial logit, 3 classes, reference class 0
@register
def multinomial_logit():
    rng = np.random.default_rng(8)
    N, P = 500, 4
    X = rng.standard_normal((N, P))
    B = np.array([[0.5, 1.0, -0.5, 0.0, 0.3], [-0.3, -0.4, 0.8, 0.6, 0.0]])  # (2, P+1)
    Xa = np.hstack([np.ones((N, 1)), X])
    logits = np.hstack([np.zeros((N, 1)), Xa @ B.T])
    pr = np.exp(logits - logits.max(1, keepdims=True))
    pr /= pr.sum(1, keepdims=True)
    y = np.array([rng.choice(3, p=p) for p in pr])
    Xa, y = jnp.array(Xa), jnp.array(y)

    def model(Xa, y):
        B = numpyro.sample("B", dist.Normal(0, 2).expand([2, P + 1]).to_event(2))
        logits = jnp.concatenate([jnp.zeros((Xa.shape[0], 1)), Xa @ B.T], axis=1)
        numpyro.sample("y", dist.Categorical(logits=logits), obs=y)

    return model, (Xa, y)


# 9. horseshoe regression, 20 predictors, 5 non-zero (non-centred)
@register
def horseshoe20():
    rng = np.random.default_rng(9)
    N, P = 100, 20
    X = rng.standard_normal((N, P))
    beta = np.zeros(P)
    beta[:5] = [2.0, -1.5, 1.0, 0.8, -0.6]
    y = X @ beta + rng.standard_normal(N)
    X, y = jnp.array(X), jnp.array(y)

    def model(X, y):
        tau = numpyro.sample("tau", dist.HalfCauchy(1.0))
        lam = numpyro.sample("lam", dist.HalfCauchy(1.0).expand([P]).to_event(1))
        z = numpyro.sample("z", dist.Normal(0, 1).expand([P]).to_event(1))
        sigma = numpyro.sample("sigma", dist.HalfNormal(2))
        numpyro.sample("y", dist.Normal(X @ (tau * lam * z), sigma), obs=y)

    return model, (X, y)


# 10. hierarchical binomial, rats style: theta_j ~ Beta(phi*kappa, (1-phi)*kappa)
@register
def hier_binomial_beta():
    rng = np.random.default_rng(10)
    J = 30
    n = rng.integers(15, 50, J)
    th = rng.beta(2.5, 12, J)
    k = rng.binomial(n, th)
    n, k = jnp.array(n, dtype=jnp.float32), jnp.array(k, dtype=jnp.float32)

    def model(n, k):
        phi = numpyro.sample("phi", dist.Uniform(0, 1))
        kappa = numpyro.sample("kappa", dist.Pareto(1.0, 1.5))
        theta = numpyro.sample(
            "theta", dist.Beta(phi * kappa, (1 - phi) * kappa).expand([J]).to_event(1)
        )
        numpyro.sample("k", dist.Binomial(n, probs=theta), obs=k)

    return model, (n, k)


# 11. one-compartment exponential-decay PK, 10 subjects, LogNormal likelihood (non-centred)
@register
def pk_decay_hier():
    rng = np.random.default_rng(11)
    S, T = 10, 8
    times = np.array([0.25, 0.5, 1, 2, 4, 6, 8, 12])
    dose = 100.0
    logV = np.log(20) + 0.2 * rng.standard_normal(S)
    logk = np.log(0.25) + 0.3 * rng.standard_normal(S)
    conc = dose / np.exp(logV)[:, None] * np.exp(-np.exp(logk)[:, None] * times[None])
    y = conc * np.exp(0.15 * rng.standard_normal((S, T)))
    times, y = jnp.array(times), jnp.array(y)

    def model(times, y):
        mu_V = numpyro.sample("mu_logV", dist.Normal(3, 1))
        mu_k = numpyro.sample("mu_logk", dist.Normal(-1.5, 1))
        s_V = numpyro.sample("s_logV", dist.HalfNormal(0.5))
        s_k = numpyro.sample("s_logk", dist.HalfNormal(0.5))
        zV = numpyro.sample("zV", dist.Normal(0, 1).expand([S]).to_event(1))
        zk = numpyro.sample("zk", dist.Normal(0, 1).expand([S]).to_event(1))
        sigma = numpyro.sample("sigma", dist.HalfNormal(0.5))
        lV = mu_V + s_V * zV
        lk = mu_k + s_k * zk
        logc = jnp.log(dose) - lV[:, None] - jnp.exp(lk)[:, None] * times[None]
        numpyro.sample("y", dist.LogNormal(logc, sigma), obs=y)

    return model, (times, y)


# 12. B-spline regression, random-walk prior on coefficients (non-centred)
@register
def spline_rw():
    from sklearn.preprocessing import SplineTransformer

    rng = np.random.default_rng(12)
    N = 200
    x = np.sort(rng.uniform(0, 10, N))
    y = np.sin(x) + 0.3 * x + 0.3 * rng.standard_normal(N)
    Bm = SplineTransformer(n_knots=17, degree=3).fit_transform(x[:, None])  # 19 basis fns
    K = Bm.shape[1]
    Bm, y = jnp.array(Bm), jnp.array(y)

    def model(Bm, y):
        w0 = numpyro.sample("w0", dist.Normal(0, 3))
        tau = numpyro.sample("tau", dist.HalfNormal(1))
        eps = numpyro.sample("eps", dist.Normal(0, 1).expand([K - 1]).to_event(1))
        w = w0 + jnp.concatenate([jnp.zeros(1), jnp.cumsum(tau * eps)])
        sigma = numpyro.sample("sigma", dist.HalfNormal(1))
        numpyro.sample("y", dist.Normal(Bm @ w, sigma), obs=y)

    return model, (Bm, y)
