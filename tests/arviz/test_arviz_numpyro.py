"""ArviZ export of fitted NumPyro guides: runs on both legs (ArviZ 0.23 / Python 3.11 and
ArviZ 1.x / Python 3.12 without torch)."""

from __future__ import annotations

import math

import numpy as np
import pytest

pytest.importorskip("arviz")
jax = pytest.importorskip("jax")
numpyro = pytest.importorskip("numpyro")

import jax.numpy as jnp  # noqa: E402
import numpyro.distributions as dist  # noqa: E402
from numpyro.infer import (  # noqa: E402
    SVI,
    Trace_ELBO,
    init_to_value,  # noqa: E402
)
from numpyro.infer.autoguide import AutoDiagonalNormal, AutoNormal  # noqa: E402

from pyro_scorevi.arviz import (  # noqa: E402
    KHAT_THRESHOLD,
    VI_GROUP,
    from_numpyro_guide,
    vi_loo,
    vi_pareto_khat,
)

N, P = 30, 3


def regression(x, y=None):
    with numpyro.plate("feature", x.shape[1]):
        beta = numpyro.sample("beta", dist.Normal(0.0, 1.0))
    sigma = numpyro.sample("sigma", dist.HalfNormal(1.0))
    mu = numpyro.deterministic("mu", x @ beta)
    with numpyro.plate("data", x.shape[0]):
        numpyro.sample("y", dist.Normal(mu, sigma), obs=y)


def fit(model, *args, steps, lr=0.02, guide_cls=AutoNormal, seed=0):
    guide = guide_cls(model)
    # exponential decay to lr/100 over the run: the final iterate sits near the optimum.
    optim = numpyro.optim.Adam(lambda t: lr * 0.01 ** (t / steps))
    svi = SVI(model, guide, optim, Trace_ELBO())
    result = svi.run(jax.random.PRNGKey(seed), steps, *args, progress_bar=False)
    return guide, svi, result


@pytest.fixture(scope="module")
def regression_export():
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    x = jax.random.normal(k1, (N, P))
    y = x @ jnp.array([1.0, -0.5, 0.3]) + 0.5 * jax.random.normal(k2, (N,))
    guide, svi, result = fit(regression, x, y, steps=2000)
    data = from_numpyro_guide(
        regression,
        guide,
        result,
        x,
        y,
        rng_key=jax.random.PRNGKey(1),
        num_draws=300,
        svi=svi,
        hyperparameters={"lr": 0.02},
        coords={"feature": ["a", "b", "c"]},
    )
    return data, x, y, result


def test_groups_shapes_dims(regression_export, azh):
    data, x, y, _ = regression_export
    assert {
        "posterior",
        "posterior_predictive",
        "log_likelihood",
        "observed_data",
        "sample_stats",
        VI_GROUP,
    } <= azh.group_names(data)
    post = azh.group(data, "posterior")
    assert post["beta"].dims == ("chain", "draw", "feature")
    assert post["beta"].shape == (1, 300, P)
    assert list(post["feature"].values) == ["a", "b", "c"]
    assert post["sigma"].shape == (1, 300) and bool((post["sigma"] > 0).all())
    assert post["mu"].dims == ("chain", "draw", "mu_dim_0")
    ll = azh.group(data, "log_likelihood")["y"]
    assert ll.dims == ("chain", "draw", "data") and ll.shape == (1, 300, N)
    pp = azh.group(data, "posterior_predictive")["y"]
    assert pp.dims == ("chain", "draw", "data") and pp.shape == (1, 300, N)
    assert not np.allclose(pp.values[0, 0], np.asarray(y))
    obs = azh.group(data, "observed_data")["y"]
    assert obs.dims == ("data",)
    np.testing.assert_array_equal(obs.values, np.asarray(y))
    # draws differ from one another (one key per draw)
    assert np.unique(post["sigma"].values).size == 300


def test_loglik_is_pointwise_normal_logpdf(regression_export, azh):
    data, x, y, _ = regression_export
    post = azh.group(data, "posterior")
    ll = azh.group(data, "log_likelihood")["y"].values[0]
    mu, sigma = post["mu"].values[0], post["sigma"].values[0][:, None]
    ref = -0.5 * ((np.asarray(y) - mu) / sigma) ** 2 - np.log(sigma) - 0.5 * math.log(2 * math.pi)
    np.testing.assert_allclose(ll, ref, rtol=1e-4, atol=1e-4)  # float32 tier


def test_run_info_from_run_result(regression_export, azh):
    data, _, _, result = regression_export
    vi = azh.group(data, VI_GROUP)
    np.testing.assert_allclose(vi["loss"].values, np.asarray(result.losses))
    assert vi.attrs["lr"] == 0.02 and vi.attrs["algorithm"] == "SVI"
    attrs = azh.group(data, "posterior").attrs
    assert attrs["inference_library"] == "numpyro" and attrs["guide"] == "AutoNormal"


def test_arviz_functions_run(regression_export, azh):
    data, *_ = regression_export
    summary, _ = azh.run(data, ["beta", "sigma"])
    assert summary.shape[0] == P + 1
    res = vi_loo(data, pointwise=True)
    assert np.isfinite(azh.elpd(res))
    assert np.asarray(res.pareto_k).shape == (N,)


def test_params_dict_dims_override_and_other_autoguide(azh):
    k1, k2 = jax.random.split(jax.random.PRNGKey(3))
    x, y = jax.random.normal(k1, (N, P)), jax.random.normal(k2, (N,))
    guide, svi, result = fit(regression, x, y, steps=10, guide_cls=AutoDiagonalNormal)
    data = from_numpyro_guide(
        regression,
        guide,
        result.params,
        x,
        y,
        num_draws=20,
        posterior_predictive=False,
        dims={"y": ["obs_id"], "mu": ["obs_id"]},
        losses=[1.0, 0.5],
    )
    assert azh.group(data, "log_likelihood")["y"].dims == ("chain", "draw", "obs_id")
    assert azh.group(data, "posterior")["beta"].dims == ("chain", "draw", "feature")
    assert "posterior_predictive" not in azh.group_names(data)
    np.testing.assert_array_equal(azh.group(data, VI_GROUP)["loss"].values, [1.0, 0.5])
    with pytest.raises(ValueError, match="'gamma'"):
        from_numpyro_guide(regression, guide, result.params, x, y, dims={"gamma": ["g"]})
    with pytest.raises(TypeError, match="params must be the dict"):
        from_numpyro_guide(regression, guide, [1, 2], x, y)


def _gaussian_model(tau, n):
    def model(y):
        mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
        numpyro.sample("sigma", dist.LogNormal(0.0, tau))  # unobserved: posterior = prior
        with numpyro.plate("data", n):
            numpyro.sample("y", dist.Normal(mu, 1.0), obs=y)

    return model


def test_exact_guide_gives_constant_weights_equal_to_evidence():
    # See the Pyro twin: q = posterior exactly, so log p - log q = log p(y) for every draw.
    n = 20
    tau = 1.0 / math.sqrt(n + 1)
    model = _gaussian_model(tau, n)
    y = jax.random.normal(jax.random.PRNGKey(0), (n,)) + 0.7
    init = {"mu": jnp.sum(y) / (n + 1), "sigma": jnp.array(1.0)}
    guide = AutoNormal(model, init_loc_fn=init_to_value(values=init), init_scale=tau)
    svi = SVI(model, guide, numpyro.optim.Adam(1e-3), Trace_ELBO())
    params = svi.get_params(svi.init(jax.random.PRNGKey(1), y))
    data = from_numpyro_guide(model, guide, params, y, num_draws=200)
    lw = vi_pareto_khat(data).log_weights
    cov = jnp.eye(n) + jnp.ones((n, n))
    log_evidence = float(dist.MultivariateNormal(jnp.zeros(n), cov).log_prob(y))
    np.testing.assert_allclose(lw, log_evidence, atol=1e-4)  # float32 identity tier


@pytest.mark.slow
def test_khat_separates_good_from_bad_fit():
    n = 20
    y = jax.random.normal(jax.random.PRNGKey(0), (n,)) + 0.5
    good_model = _gaussian_model(0.5, n)
    guide, _, result = fit(good_model, y, steps=3000, lr=0.05)
    good = vi_pareto_khat(
        from_numpyro_guide(good_model, guide, result, y, rng_key=jax.random.PRNGKey(2))
    )

    # y_i ~ N(z_1 + ... + z_8, 0.5): a thin ridge out of mean-field's reach (see the Pyro twin).
    def bad_model(y):
        z = numpyro.sample("z", dist.Normal(jnp.zeros(8), 1.0).to_event(1))
        with numpyro.plate("data", y.shape[0]):
            numpyro.sample("y", dist.Normal(z.sum(-1), 0.5), obs=y)

    yb = jax.random.normal(jax.random.PRNGKey(1), (n,)) * 0.5 + 1.0
    guide_b, _, result_b = fit(bad_model, yb, steps=3000, lr=0.05)
    bad = vi_pareto_khat(
        from_numpyro_guide(bad_model, guide_b, result_b, yb, rng_key=jax.random.PRNGKey(3))
    )
    print(f"numpyro k-hat: good fit {good.khat:.3f}, mean-field on correlated {bad.khat:.3f}")
    assert good.khat < KHAT_THRESHOLD and good.ok
    assert bad.khat > KHAT_THRESHOLD and not bad.ok


def test_subsampled_plate_is_rejected():
    def model(y):
        mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
        with numpyro.plate("data", y.shape[0], subsample_size=5) as idx:
            numpyro.sample("y", dist.Normal(mu, 1.0), obs=y[idx])

    y = jnp.ones(20)
    guide = AutoNormal(model)
    svi = SVI(model, guide, numpyro.optim.Adam(1e-3), Trace_ELBO())
    params = svi.get_params(svi.init(jax.random.PRNGKey(0), y))
    with pytest.raises(ValueError, match="plate 'data' subsamples 5 of 20"):
        from_numpyro_guide(model, guide, params, y, num_draws=10)


def test_guide_must_cover_latents():
    def model(y):
        a = numpyro.sample("a", dist.Normal(0.0, 1.0))
        b = numpyro.sample("b", dist.Normal(0.0, 1.0))
        numpyro.sample("y", dist.Normal(a + b, 1.0), obs=y)

    def guide(y):
        loc = numpyro.param("a_loc", 0.0)
        numpyro.sample("a", dist.Normal(loc, 1.0))

    with pytest.raises(ValueError, match="model site 'b' is latent"):
        from_numpyro_guide(model, guide, {"a_loc": jnp.array(0.0)}, jnp.array(0.3), num_draws=10)
