"""ScoreProximalSVI for NumPyro: surface, errors, known answers.

Tolerance tiers: jit vs eager 1e-5 (float32, same ops); Monte Carlo fits carry their own
comment with the noise they allow.
"""

import subprocess
import sys

import numpy as np
import pytest

jax = pytest.importorskip("jax")
numpyro = pytest.importorskip("numpyro")

import jax.numpy as jnp  # noqa: E402
import numpyro.distributions as dist  # noqa: E402
from jax import random  # noqa: E402
from numpyro.infer import Predictive  # noqa: E402
from numpyro.infer.autoguide import (  # noqa: E402
    AutoDelta,
    AutoDiagonalNormal,
    AutoLowRankMultivariateNormal,
    AutoMultivariateNormal,
    AutoNormal,
)

from pyro_scorevi.numpyro import ScoreProximalState, ScoreProximalSVI  # noqa: E402
from pyro_scorevi.schedules import PolynomialGrowth  # noqa: E402

JIT_TOL = 1e-5  # jit vs eager, run with vs without progress bar (float32)

MU = jnp.array([1.0, -2.0, 0.5, 0.0])
LAMBDA = jnp.array(
    [[2.0, 0.8, 0.3, 0.1], [0.8, 1.5, -0.4, 0.2], [0.3, -0.4, 1.0, 0.0], [0.1, 0.2, 0.0, 0.5]]
)


def gaussian_model():
    numpyro.sample("x", dist.MultivariateNormal(MU, precision_matrix=LAMBDA))


def two_site_model(data):
    loc = numpyro.sample("loc", dist.Normal(0.0, 10.0))
    scale = numpyro.sample("scale", dist.LogNormal(0.0, 1.0))
    with numpyro.plate("data", data.shape[0]):
        numpyro.sample("obs", dist.Normal(loc, scale), obs=data)


DATA = random.normal(random.PRNGKey(9), (50,)) * 2.0 + 1.0


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(num_particles=0), ValueError, r"num_particles >= 1 \(got num_particles = 0\)"),
        (dict(num_particles=1.5), TypeError, "num_particles must be an int"),
        (dict(prox_weight=-1.0), ValueError, r"prox_weight > 0 \(got prox_weight = -1.0\)"),
        (dict(prox_weight="big"), TypeError, "prox_weight must be a positive float"),
        (dict(scale_prox_weight=0.0), ValueError, r"scale_prox_weight > 0 \(got"),
        (dict(average_after=-1), ValueError, r"average_after >= 0 \(got average_after = -1\)"),
        (dict(average_after=1.5), TypeError, "average_after must be an int"),
        (dict(scale_prox_weight="big"), TypeError, "scale_prox_weight must be a positive"),
        (dict(antithetic=1), TypeError, "antithetic must be a bool"),
        (dict(num_alternations=0), ValueError, "num_alternations >= 1"),
        (dict(num_inner_steps=1), ValueError, r"num_inner_steps >= 2 \(got"),
        (dict(inner_optim="adam"), TypeError, "inner_optim must be a numpyro.optim"),
    ],
)
def test_invalid_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        ScoreProximalSVI(gaussian_model, AutoNormal(gaussian_model), **kwargs)


@pytest.mark.slow
@pytest.mark.parametrize("antithetic", [True, False])
def test_odd_particles_ok(antithetic):
    # With antithetic=True, S = 3 is one pair and one plain draw (as in the Pyro class).
    svi = ScoreProximalSVI(
        gaussian_model, AutoNormal(gaussian_model), num_particles=3, antithetic=antithetic
    )
    result = svi.run(random.PRNGKey(0), 2, progress_bar=False)
    assert np.all(np.isfinite(result.losses))


def test_antithetic_particles_pair_up():
    from pyro_scorevi.numpyro.scores import standard_normal_particles

    eps = standard_normal_particles(random.PRNGKey(1), jnp.zeros(4), 5, True)
    assert eps.shape == (5, 4)
    np.testing.assert_array_equal(eps[:2], -eps[2:4])  # identity tier: exact negation
    assert not np.allclose(eps[4], -eps[0]) and not np.allclose(eps[4], -eps[1])


def test_unsupported_guide_lists_supported():
    with pytest.raises(TypeError, match="AutoNormal.*AutoDiagonalNormal.*AutoMultivariateNormal"):
        ScoreProximalSVI(gaussian_model, AutoDelta(gaussian_model))


def test_discrete_latent_names_site():
    def model():
        numpyro.sample("k", dist.Bernoulli(0.3))
        numpyro.sample("x", dist.Normal(0.0, 1.0))

    svi = ScoreProximalSVI(model, AutoNormal(model))
    with pytest.raises(ValueError, match="latent site 'k' is discrete"):
        svi.init(random.PRNGKey(0))


def test_local_latent_in_subsampled_plate_names_site():
    def model(y):
        mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
        with numpyro.plate("data", y.shape[0], subsample_size=4) as idx:
            z = numpyro.sample("z", dist.Normal(mu, 1.0))
            numpyro.sample("y", dist.Normal(z, 1.0), obs=y[idx])

    svi = ScoreProximalSVI(model, AutoNormal(model))
    with pytest.raises(NotImplementedError, match="latent site 'z' is local"):
        svi.init(random.PRNGKey(0), jnp.zeros(20))


def test_num_steps_validated():
    svi = ScoreProximalSVI(gaussian_model, AutoNormal(gaussian_model))
    with pytest.raises(ValueError, match="num_steps >= 1"):
        svi.run(random.PRNGKey(0), 0)
    with pytest.raises(TypeError, match="num_steps must be an int"):
        svi.run(random.PRNGKey(0), jnp.array(5.0))
    # An integer array scalar is a step count, as numpyro.infer.SVI.run takes it.
    result = svi.run(random.PRNGKey(0), jnp.array(3), progress_bar=False)
    assert result.losses.shape == (3,)


def test_a_guide_built_for_another_model_names_the_missing_site():
    # numpyro.infer.SVI only warns; here the site would be drawn from its prior at every
    # evaluation, a fit of another model. The Pyro class raises the same.
    def model(y):
        mu = numpyro.sample("mu", dist.Normal(0.0, 10.0))
        with numpyro.plate("d", y.shape[0]):
            numpyro.sample("y", dist.Normal(mu, 1.0), obs=y)

    def edited(y):
        mu = numpyro.sample("mu", dist.Normal(0.0, 10.0))
        b = numpyro.sample("b", dist.Normal(0.0, 10.0))
        with numpyro.plate("d", y.shape[0]):
            numpyro.sample("y", dist.Normal(mu + b, 1.0), obs=y)

    y = jnp.ones(10)
    for guide_cls in (AutoNormal, AutoMultivariateNormal):
        guide = guide_cls(model)
        ScoreProximalSVI(model, guide).init(random.PRNGKey(0), y)
        with pytest.raises(ValueError, match="site 'b' is latent but the guide has no site"):
            ScoreProximalSVI(edited, guide).init(random.PRNGKey(0), y)


def test_one_particle_warns_with_the_fix():
    from numpyro.infer import Trace_ELBO

    with pytest.warns(
        UserWarning, match=r"from loss=Trace_ELBO\(\), one particle.*num_particles=2"
    ):
        ScoreProximalSVI(gaussian_model, AutoNormal(gaussian_model), loss=Trace_ELBO())
    with pytest.warns(UserWarning, match="num_particles=1: one draw"):
        ScoreProximalSVI(gaussian_model, AutoNormal(gaussian_model), num_particles=1)


# ------------------------------------------------------------------------ surface and jit


def test_state_surface_and_params():
    guide = AutoNormal(two_site_model)
    svi = ScoreProximalSVI(two_site_model, guide)
    state = svi.init(random.PRNGKey(0), DATA)
    assert isinstance(state, ScoreProximalState)
    assert int(state.step) == 0 and state.optim_state == ()
    new_state, loss = jax.jit(svi.update)(state, DATA)
    assert int(new_state.step) == 1 and loss.shape == ()
    params = svi.get_params(new_state)
    assert set(params) == {
        "loc_auto_loc",
        "loc_auto_scale",
        "scale_auto_loc",
        "scale_auto_scale",
    }
    assert all(np.all(np.asarray(params[k]) > 0) for k in params if k.endswith("_scale"))
    # The loss is the -ELBO of the frozen q_t on the key update uses: evaluate reproduces it.
    np.testing.assert_allclose(jax.jit(svi.evaluate)(state, DATA), loss, rtol=JIT_TOL)


@pytest.mark.parametrize("guide_cls", [AutoNormal, AutoMultivariateNormal])
def test_jit_equals_eager_and_traces_once(guide_cls):
    traces = []

    def model(data):
        traces.append(1)  # runs only while JAX traces (or in eager mode)
        two_site_model(data)

    svi = ScoreProximalSVI(model, guide_cls(model))
    state = svi.init(random.PRNGKey(1), DATA)
    eager_state, eager_loss = svi.update(state, DATA)
    jit_update = jax.jit(svi.update)
    jit_state, jit_loss = jit_update(state, DATA)
    np.testing.assert_allclose(jit_loss, eager_loss, rtol=JIT_TOL)
    for a, b in zip(jax.tree.leaves(jit_state.params), jax.tree.leaves(eager_state.params)):
        np.testing.assert_allclose(a, b, rtol=JIT_TOL, atol=JIT_TOL)
    count = len(traces)
    for _ in range(4):
        jit_state, _ = jit_update(jit_state, DATA)
    assert len(traces) == count, "jit(update) re-traced on later calls"
    assert int(jit_state.step) == 5


@pytest.mark.slow
def test_run_progress_bar_matches_scan():
    guide = AutoNormal(two_site_model)
    svi = ScoreProximalSVI(two_site_model, guide)
    scan = svi.run(random.PRNGKey(2), 30, DATA, progress_bar=False)
    loop = svi.run(random.PRNGKey(2), 30, DATA, progress_bar=True)
    assert scan.losses.shape == loop.losses.shape == (30,)
    np.testing.assert_allclose(scan.losses, loop.losses, rtol=JIT_TOL)
    for k in scan.params:
        np.testing.assert_allclose(scan.params[k], loop.params[k], rtol=JIT_TOL, atol=JIT_TOL)
    # init_state continues a run: 30 more steps from the end of the first.
    more = svi.run(None, 30, DATA, progress_bar=False, init_state=scan.state)
    assert int(more.state.step) == 60


def test_stable_update_keeps_state_on_nonfinite_step():
    svi = ScoreProximalSVI(two_site_model, AutoNormal(two_site_model))
    state = svi.init(random.PRNGKey(3), DATA)
    bad = state._replace(params={**state.params, "loc_auto_loc": jnp.array(jnp.nan)})
    new_state, loss = svi.stable_update(bad, DATA)
    assert jnp.isnan(loss)
    assert int(new_state.step) == int(bad.step)
    for k in bad.params:
        np.testing.assert_array_equal(new_state.params[k], bad.params[k])
    # The key advances, so a retry draws new particles.
    assert not np.array_equal(np.asarray(new_state.rng_key), np.asarray(bad.rng_key))
    good_state, good_loss = svi.stable_update(state, DATA)
    assert jnp.isfinite(good_loss) and int(good_state.step) == 1


def test_sample_posterior_and_predictive_on_result():
    guide = AutoNormal(two_site_model)
    svi = ScoreProximalSVI(two_site_model, guide)
    result = svi.run(random.PRNGKey(4), 300, DATA, progress_bar=False)
    samples = guide.sample_posterior(random.PRNGKey(5), result.params, sample_shape=(200,))
    assert samples["loc"].shape == (200,) and np.all(np.asarray(samples["scale"]) > 0)
    pred = Predictive(two_site_model, guide=guide, params=result.params, num_samples=50)
    out = pred(random.PRNGKey(6), DATA)
    assert out["obs"].shape == (50, DATA.shape[0])
    # Fit sanity: posterior mean of loc near the sample mean (sd of it ~ 2/sqrt(50) = 0.28).
    assert abs(float(samples["loc"].mean()) - float(DATA.mean())) < 0.3


# ---------------------------------------------------------------------------- known answers


@pytest.mark.parametrize("guide_cls", [AutoNormal, AutoDiagonalNormal])
def test_dense_gaussian_diagonal_fixed_point(guide_cls):
    # Exact scores of N(mu, Lambda^-1): the fixed point is m = mu, s_j^2 = 1/Lambda_jj.
    svi = ScoreProximalSVI(
        gaussian_model,
        guide_cls(gaussian_model),
        num_particles=8,
        prox_weight=PolynomialGrowth(10.0, 100.0),
    )
    result = svi.run(random.PRNGKey(0), 2000, progress_bar=False)
    name = "x_auto" if guide_cls is AutoNormal else "auto"
    loc, scale = result.params[f"{name}_loc"], result.params[f"{name}_scale"]
    # Antithetic pairs make the mean step noise-free for a Gaussian target.
    np.testing.assert_allclose(loc, MU, atol=1e-3)
    # Variances: Monte Carlo noise of the final iterate, measured sd ~1.5% at lambda ~ 200.
    np.testing.assert_allclose(scale**2 * jnp.diag(LAMBDA), 1.0, atol=0.06)


def test_separate_scale_weight_keeps_the_fixed_point():
    # The split weights change the path, not the fixed point (m = mu, s_j^2 = 1/Lambda_jj).
    svi = ScoreProximalSVI(
        gaussian_model,
        AutoNormal(gaussian_model),
        num_particles=8,
        prox_weight=PolynomialGrowth(10.0, 100.0),
        scale_prox_weight=PolynomialGrowth(30.0, 100.0),
    )
    result = svi.run(random.PRNGKey(0), 2000, progress_bar=False)
    loc, scale = result.params["x_auto_loc"], result.params["x_auto_scale"]
    np.testing.assert_allclose(loc, MU, atol=1e-3)
    np.testing.assert_allclose(scale**2 * jnp.diag(LAMBDA), 1.0, atol=0.06)


def test_separate_scale_weight_is_for_diagonal_guides():
    svi = ScoreProximalSVI(
        gaussian_model, AutoMultivariateNormal(gaussian_model), scale_prox_weight=10.0
    )
    with pytest.raises(NotImplementedError, match="scale_prox_weight supports AutoNormal"):
        svi.init(random.PRNGKey(0))


@pytest.mark.parametrize("guide_cls", [AutoMultivariateNormal, AutoLowRankMultivariateNormal])
def test_dense_gaussian_multivariate_guides(guide_cls):
    kwargs = {"rank": 3} if guide_cls is AutoLowRankMultivariateNormal else {}
    guide = guide_cls(gaussian_model, **kwargs)
    svi = ScoreProximalSVI(gaussian_model, guide)
    result = svi.run(random.PRNGKey(0), 1000, progress_bar=False)
    post = guide.get_posterior(result.params)
    # Full-rank (and rank d-1 + diagonal) families contain the target: it is the fixed point.
    # Measured errors ~1e-4 after 1000 steps (Adam inner steps, lr 1e-2); 0.05 allows noise.
    np.testing.assert_allclose(post.loc, MU, atol=0.05)
    np.testing.assert_allclose(post.covariance_matrix, jnp.linalg.inv(LAMBDA), atol=0.05)


def test_gamma_poisson_conjugate():
    # rate ~ Gamma(a, b), y_i ~ Poisson(rate): posterior Gamma(a + sum y, b + N).
    a, b, n = 2.0, 1.0, 200
    y = random.poisson(random.PRNGKey(7), 3.0, (n,)).astype(jnp.float32)

    def model(y):
        rate = numpyro.sample("rate", dist.Gamma(a, b))
        with numpyro.plate("data", y.shape[0]):
            numpyro.sample("y", dist.Poisson(rate), obs=y)

    guide = AutoNormal(model)
    svi = ScoreProximalSVI(model, guide, prox_weight=PolynomialGrowth(10.0, 100.0))
    result = svi.run(random.PRNGKey(8), 1500, y, progress_bar=False)
    draws = guide.sample_posterior(random.PRNGKey(9), result.params, sample_shape=(20000,))
    rate = np.asarray(draws["rate"])
    shape_post, rate_post = a + float(y.sum()), b + n
    mean, sd = shape_post / rate_post, np.sqrt(shape_post) / rate_post
    # Conjugate tier (a few percent): lognormal q vs a Gamma(~600) posterior differ < 1%;
    # 20000 draws give ~0.7% Monte Carlo error on the mean/sd ratio checks below.
    assert abs(rate.mean() - mean) / mean < 0.02
    assert abs(rate.std() - sd) / sd < 0.05


def test_averaged_params_are_the_mean_of_the_iterates():
    # Identity tier: the running means equal the plain means of the iterates after step 3.
    guide = AutoNormal(two_site_model)
    svi = ScoreProximalSVI(two_site_model, guide, average_after=3)
    state = svi.init(random.PRNGKey(0), DATA)
    with pytest.raises(ValueError, match="no averaged iterates yet"):
        svi.get_averaged_params(state)
    step = jax.jit(svi.update)
    iterates = []
    for t in range(1, 11):
        state, _ = step(state, DATA)
        if t > 3:
            iterates.append(svi.get_params(state))
    averaged = svi.get_averaged_params(state)
    assert int(state.average[2]) == 7
    for site in ("loc", "scale"):
        locs = np.stack([p[f"{site}_auto_loc"] for p in iterates])
        scales = np.stack([p[f"{site}_auto_scale"] for p in iterates])
        np.testing.assert_allclose(averaged[f"{site}_auto_loc"], locs.mean(0), rtol=JIT_TOL)
        np.testing.assert_allclose(
            averaged[f"{site}_auto_scale"], np.sqrt((scales**2).mean(0)), rtol=JIT_TOL
        )
    # The current iterate is untouched, and the averaged params feed sample_posterior.
    np.testing.assert_array_equal(
        svi.get_params(state)["loc_auto_loc"], iterates[-1]["loc_auto_loc"]
    )
    draws = guide.sample_posterior(random.PRNGKey(1), averaged, sample_shape=(5,))
    assert draws["loc"].shape == (5,)


def test_averaging_run_scan_equals_progress_bar_loop():
    svi = ScoreProximalSVI(two_site_model, AutoNormal(two_site_model), average_after=20)
    scan = svi.run(random.PRNGKey(3), 60, DATA, progress_bar=False)
    loop = svi.run(random.PRNGKey(3), 60, DATA, progress_bar=True)
    a, b = svi.get_averaged_params(scan.state), svi.get_averaged_params(loop.state)
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=JIT_TOL, atol=JIT_TOL)


def test_averaging_is_for_diagonal_guides():
    svi = ScoreProximalSVI(gaussian_model, AutoMultivariateNormal(gaussian_model), average_after=10)
    with pytest.raises(NotImplementedError, match="average_after supports AutoNormal"):
        svi.init(random.PRNGKey(0))


def _minibatch_regression():
    """N = 2000 points, B = 64 per mini-batch, 3 features, known noise: the exact Gaussian
    posterior (mean, sd, precision) in float64."""
    n, d, b, sigma = 2000, 3, 64, 0.5
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, d)).astype(np.float32)
    y = (x @ np.array([1.0, -0.5, 0.25]) + sigma * rng.normal(size=n)).astype(np.float32)
    prec = np.eye(d) + x.T.astype(np.float64) @ x / sigma**2
    cov = np.linalg.inv(prec)
    mean = cov @ (x.T.astype(np.float64) @ y / sigma**2)

    def model(x, y):
        w = numpyro.sample("w", dist.Normal(0.0, 1.0).expand([d]).to_event(1))
        with numpyro.plate("data", n, subsample_size=b) as idx:
            numpyro.sample("y", dist.Normal(x[idx] @ w, sigma), obs=y[idx])

    return model, x, y, mean, np.sqrt(np.diag(cov)), prec


@pytest.mark.slow
def test_minibatch_linear_regression_with_iterate_averaging():
    # As the Pyro test of the same name: N = 2000, B = 64 (N/B ~ 31), one alternation,
    # constant lambda = 100, Polyak averaging after 500 steps. The averaged mean's error falls
    # like sqrt(N / (B T)) posterior sds. Measured (keys 0-2) at 6000 steps: max mean error
    # 0.04-0.10 sd averaged against 0.81-0.94 sd for the last iterate; variance errors
    # 0.7-1.1% averaged. The bound is 0.25 sd, as in Pyro.
    model, x, y, mean, sd, prec = _minibatch_regression()
    svi = ScoreProximalSVI(
        model, AutoNormal(model, init_scale=0.01), num_alternations=1, average_after=500
    )
    result = svi.run(random.PRNGKey(0), 6000, jnp.asarray(x), jnp.asarray(y), progress_bar=False)
    averaged = svi.get_averaged_params(result.state)
    m, s = np.asarray(averaged["w_auto_loc"]), np.asarray(averaged["w_auto_scale"])
    assert np.all(np.abs(m - mean) / sd < 0.25)
    assert np.all(np.abs(s**2 * np.diag(prec) - 1) < 0.25)


@pytest.mark.slow
def test_minibatch_linear_regression_matches_exact_posterior():
    # N = 2000, B = 64 (N/B ~ 31). Gaussian posterior: the mean-field optimum has the exact
    # means and variances 1/Lambda_jj. The last iterate's mean error is mini-batch noise of
    # sd ~ sqrt(N / (B t)) posterior sds (Robbins-Monro steps), ~0.03 at t = 30000: the
    # 0.1-sd target needs that many steps (measured max errors 0.083, 0.016, 0.047 sd over
    # 3 seeds; at t = 20000: 0.145, 0.057, 0.125).
    # num_alternations=1: with 2 alternations the early, far-from-the-mode steps shrink the
    # variances (precision ~ |g| / |m - m_t|) and the fit stalls (measured: 20-200 sds off).
    model, x, y, mean, sd, prec = _minibatch_regression()
    svi = ScoreProximalSVI(
        model,
        AutoNormal(model, init_scale=0.01),
        num_alternations=1,
        prox_weight=PolynomialGrowth(100.0, 75.0),
    )
    result = svi.run(random.PRNGKey(0), 30000, jnp.asarray(x), jnp.asarray(y), progress_bar=False)
    m, s = np.asarray(result.params["w_auto_loc"]), np.asarray(result.params["w_auto_scale"])
    assert np.all(np.abs(m - mean) / sd < 0.1)
    assert np.all(np.abs(s**2 / sd**2 - 1) < 0.25)


# ---------------------------------------------------------------------------- import guards


def _run(code):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)


def test_import_guards():
    out = _run(
        "import sys, pyro_scorevi; assert 'jax' not in sys.modules\n"
        "import pyro_scorevi.numpyro\n"
        "bad = [m for m in ('torch', 'pyro') if m in sys.modules]\n"
        "assert not bad, bad"
    )
    assert out.returncode == 0, out.stderr
    out = _run("import sys; sys.modules['jax'] = None\nimport pyro_scorevi.numpyro")
    assert out.returncode != 0
    assert 'pip install "pyro_scorevi[numpyro]"' in out.stderr


# ------------------------------------------------------------- numpyro.infer.SVI's surface


def _normal_mean_model(y):
    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    with numpyro.plate("N", y.shape[0]):
        numpyro.sample("y", dist.Normal(mu, 1.0), obs=y)


Y = 2.0 + random.normal(random.PRNGKey(11), (50,))
# Conjugate: mu | y ~ N(sum(y) / (N + 1/25), 1 / (N + 1/25)).
MU_PRECISION = 50 + 1 / 25
MU_MEAN = float(Y.sum()) / MU_PRECISION


def test_svi_constructor_surface():
    from jax.example_libraries import optimizers
    from numpyro.infer import Trace_ELBO
    from numpyro.optim import _NumPyroOptim

    guide = AutoNormal(_normal_mean_model)
    svi = ScoreProximalSVI(_normal_mean_model, guide)
    assert svi.optim is None and svi.constrain_fn is None
    assert isinstance(svi.loss, Trace_ELBO) and svi.loss.num_particles == svi.num_particles == 2
    # SVI's positional (optim, loss): the loss sets S; optim is wrapped as numpyro.infer.SVI
    # wraps it (a jax.example_libraries optimizer here).
    svi = ScoreProximalSVI(
        _normal_mean_model, guide, optimizers.adam(1e-2), Trace_ELBO(num_particles=4)
    )
    assert isinstance(svi.optim, _NumPyroOptim) and svi.num_particles == 4
    assert svi.config.num_particles == 4
    state = svi.init(random.PRNGKey(0), Y)
    assert callable(svi.constrain_fn) and svi.constrain_fn({}) == {}
    # svi.loss is NumPyro's own -ELBO estimator: it agrees with update's loss on average.
    params = svi.get_params(state)
    theirs = Trace_ELBO(num_particles=4000).loss(random.PRNGKey(1), params, svi.model, svi.guide, Y)
    ours = jnp.mean(
        jax.vmap(lambda k: svi.evaluate(state._replace(rng_key=k), Y))(
            random.split(random.PRNGKey(2), 1000)
        )
    )
    # Monte Carlo tier: both estimate -ELBO(q_0); sd of the difference ~0.1% here.
    np.testing.assert_allclose(ours, theirs, rtol=0.01)


def test_svi_constructor_errors():
    from numpyro.infer import RenyiELBO, Trace_ELBO

    guide = AutoNormal(gaussian_model)
    with pytest.raises(TypeError, match="optim must be a numpyro.optim optimizer"):
        ScoreProximalSVI(gaussian_model, guide, "adam")
    with pytest.raises(TypeError, match="loss must be a numpyro.infer ELBO"):
        ScoreProximalSVI(gaussian_model, guide, None, "elbo")
    with pytest.raises(TypeError, match=r"loss=RenyiELBO\(alpha=0\) is another objective"):
        ScoreProximalSVI(gaussian_model, guide, None, RenyiELBO())
    with pytest.raises(ValueError, match="num_particles=2 disagrees with loss.num_particles=4"):
        ScoreProximalSVI(gaussian_model, guide, None, Trace_ELBO(4), num_particles=2)


def _while_loop_model(y):
    # The mean goes through a lax.while_loop with a traced bound, which reverse mode cannot
    # differentiate (numpyro.infer.SVI needs forward_mode_differentiation=True here too).
    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    _, mean = jax.lax.while_loop(
        lambda c: c[0] < y.shape[0] // 50, lambda c: (c[0] + 1, c[1] + mu), (0, 0.0)
    )
    with numpyro.plate("N", y.shape[0]):
        numpyro.sample("y", dist.Normal(mean, 1.0), obs=y)


def test_forward_mode_differentiation():
    guide = AutoNormal(_while_loop_model, forward_mode_differentiation=True)
    svi = ScoreProximalSVI(_while_loop_model, guide)
    with pytest.raises(ValueError, match="Reverse-mode differentiation does not work"):
        svi.run(random.PRNGKey(0), 2, Y, progress_bar=False)
    # The flag goes to the scores (jax.jacfwd), not to the model (it takes no such keyword).
    result = svi.run(
        random.PRNGKey(0), 1000, Y, progress_bar=False, forward_mode_differentiation=True
    )
    # Exact scores of a Gaussian target: the mean-field fixed point is the posterior; the
    # tolerance is the last iterate's noise (0.1 sd).
    assert abs(float(result.params["mu_auto_loc"]) - MU_MEAN) * np.sqrt(MU_PRECISION) < 0.1
    assert abs(float(result.params["mu_auto_scale"]) * np.sqrt(MU_PRECISION) - 1) < 0.1


@pytest.mark.parametrize("guide_cls", [AutoNormal, AutoMultivariateNormal])
def test_forward_mode_equals_reverse_mode(guide_cls):
    # Identity tier (float32, same maths, other order of operations): jit tolerance.
    svi = ScoreProximalSVI(_normal_mean_model, guide_cls(_normal_mean_model))
    state = svi.init(random.PRNGKey(0), Y)
    rev = jax.jit(svi.update)
    fwd = jax.jit(lambda s, y: svi.update(s, y, forward_mode_differentiation=True))
    a, b = state, state
    for _ in range(5):
        (a, la), (b, lb) = rev(a, Y), fwd(b, Y)
        np.testing.assert_allclose(la, lb, rtol=JIT_TOL)
    for name in a.params:
        np.testing.assert_allclose(a.params[name], b.params[name], rtol=JIT_TOL, atol=JIT_TOL)


# ------------------------------------------------------------------ the model's param sites


def _param_model(y):
    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    sigma = numpyro.param("sigma", 1.0, constraint=numpyro.distributions.constraints.positive)
    with numpyro.plate("N", y.shape[0]):
        numpyro.sample("y", dist.Normal(mu, sigma), obs=y)


def test_model_params_held_fixed_without_optim(caplog):
    svi = ScoreProximalSVI(_param_model, AutoNormal(_param_model))
    with caplog.at_level("WARNING", logger="pyro_scorevi.numpyro.svi"):
        state = svi.init(random.PRNGKey(0), Y)
    assert "numpyro.param site(s) (sigma); they are held fixed" in caplog.text
    assert state.param_optim_state == () and float(state.params["sigma"]) == 1.0
    result = svi.run(None, 200, Y, progress_bar=False, init_state=state)
    assert float(result.params["sigma"]) == 1.0
    # With sigma = 1 the model is _normal_mean_model: its conjugate posterior (0.15 sd: noise).
    assert abs(float(result.params["mu_auto_loc"]) - MU_MEAN) * np.sqrt(MU_PRECISION) < 0.15


def test_model_params_learned_by_optim_only_on_accepted_steps():
    from numpyro.optim import Adam

    svi = ScoreProximalSVI(_param_model, AutoNormal(_param_model), Adam(0.05))
    state = svi.init(random.PRNGKey(0), Y)
    step = jax.jit(svi.update)
    new_state, _ = step(state, Y)
    assert float(new_state.params["sigma"]) != 1.0
    # A step whose scores are not finite moves neither the guide nor the model's params.
    bad = state._replace(params={**state.params, "mu_auto_loc": jnp.array(jnp.nan)})
    after, _ = step(bad, Y)
    assert int(after.num_rejected) == 1 and float(after.params["sigma"]) == 1.0
    leaves = zip(jax.tree.leaves(after.param_optim_state), jax.tree.leaves(bad.param_optim_state))
    for a, b in leaves:
        np.testing.assert_array_equal(a, b)


def test_model_with_params_only_matches_svi():
    # No latent site: each step is an Adam step on -log p, as numpyro.infer.SVI's (which here
    # optimises the same function of the same params): identical iterates (jit tier).
    from numpyro.infer import SVI, Trace_ELBO
    from numpyro.optim import Adam

    def model(y):
        mu = numpyro.param("mu", 0.0)
        with numpyro.plate("N", y.shape[0]):
            numpyro.sample("y", dist.Normal(mu, 1.0), obs=y)

    ours = ScoreProximalSVI(model, AutoNormal(model), Adam(0.05)).run(
        random.PRNGKey(0), 300, Y, progress_bar=False
    )
    theirs = SVI(model, AutoNormal(model), Adam(0.05), Trace_ELBO()).run(
        random.PRNGKey(0), 300, Y, progress_bar=False
    )
    np.testing.assert_allclose(ours.losses, theirs.losses, rtol=JIT_TOL)
    np.testing.assert_allclose(ours.params["mu"], theirs.params["mu"], rtol=JIT_TOL)
    with pytest.raises(ValueError, match=r"only the param sites \['mu'\]: without optim"):
        ScoreProximalSVI(model, AutoNormal(model)).init(random.PRNGKey(0), Y)

    def empty(y):
        with numpyro.plate("N", y.shape[0]):
            numpyro.sample("y", dist.Normal(0.0, 1.0), obs=y)

    with pytest.raises(ValueError, match="no latent sample site and no numpyro.param site"):
        ScoreProximalSVI(empty, AutoNormal(empty)).init(random.PRNGKey(0), Y)


def test_init_params_and_param_names_checked():
    svi = ScoreProximalSVI(_param_model, AutoNormal(_param_model))
    state = svi.init(random.PRNGKey(0), Y, init_params={"sigma": 2.0, "mu_auto_loc": 1.5})
    assert float(state.params["sigma"]) == 2.0 and float(state.params["mu_auto_loc"]) == 1.5
    with pytest.raises(ValueError, match=r"init_params names \['mu'\], which are not param"):
        svi.init(random.PRNGKey(0), Y, init_params={"mu": 1.0})

    def clash(y):
        numpyro.param("mu_auto_loc", 0.0)
        _normal_mean_model(y)

    with pytest.raises(ValueError, match="'mu_auto_loc' is declared by both the model and"):
        ScoreProximalSVI(clash, AutoNormal(clash)).init(random.PRNGKey(0), Y)


def test_mutable_site_is_refused_with_the_reason():
    from numpyro.primitives import mutable

    def model():
        numpyro.sample("x", dist.Normal(0.0, 1.0))
        mutable("count", {"n": jnp.zeros(())})

    svi = ScoreProximalSVI(model, AutoNormal(model))
    with pytest.raises(NotImplementedError, match="'count' is a numpyro.mutable site"):
        svi.init(random.PRNGKey(0))


# ----------------------------------------------------------------- rejected and stuck steps


def _nan_model(bad):
    numpyro.sample("x", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
    numpyro.factor("f", jnp.where(bad, jnp.nan, 0.0))


@pytest.mark.parametrize(
    "guide_cls, kwargs",
    [(AutoNormal, {}), (AutoNormal, {"prox_weight": 100.0}), (AutoMultivariateNormal, {})],
)
def test_rejected_and_stuck_counts(guide_cls, kwargs):
    from pyro_scorevi.numpyro.svi import STUCK_AFTER

    svi = ScoreProximalSVI(_nan_model, guide_cls(_nan_model), **kwargs)
    state = svi.init(random.PRNGKey(0), False)
    step = jax.jit(svi.update)
    # Two rejected steps, then an accepted one: the run of rejections resets.
    for bad, rejected, in_a_row in [(True, 1, 1), (True, 2, 2), (False, 2, 0)]:
        before = state
        state, loss = step(state, bad)
        assert (int(state.num_rejected), int(state.rejected_in_a_row)) == (rejected, in_a_row)
        assert int(state.step) == (0 if bad else 1)
        if bad:  # a rejected step leaves the guide where it was, finite
            for name in state.params:
                np.testing.assert_array_equal(state.params[name], before.params[name])
    result = svi.run(None, STUCK_AFTER, True, progress_bar=False, init_state=state)
    assert result.num_rejected_steps == 2 + STUCK_AFTER and result.stuck
    assert int(result.state.step) == 1
    assert all(np.all(np.isfinite(np.asarray(v))) for v in result.params.values())
    good = svi.run(random.PRNGKey(1), 20, False, progress_bar=False)
    assert good.num_rejected_steps == 0 and not good.stuck


def test_stable_update_counts_rejections():
    svi = ScoreProximalSVI(_nan_model, AutoMultivariateNormal(_nan_model))
    state = svi.init(random.PRNGKey(0), False)  # (the guide's set-up needs a finite density)
    result = svi.run(None, 5, True, progress_bar=False, stable_update=True, init_state=state)
    assert np.all(np.isnan(np.asarray(result.losses)))
    assert result.num_rejected_steps == 5 and int(result.state.rejected_in_a_row) == 5


def test_eager_update_compiles_nothing_after_warm_up():
    # An un-jitted update used to compile the curvature refresh's lax.cond branches at every
    # call (12 compilations in 3 steps, 280 ms a step); now its branch is Python's.
    import logging

    y = jnp.ones(20)

    def model(y):
        mu = numpyro.sample("mu", dist.Normal(0.0, 10.0))
        s = numpyro.sample("s", dist.HalfNormal(3.0))
        with numpyro.plate("d", 20):
            numpyro.sample("y", dist.Normal(mu, s), obs=y)

    svi = ScoreProximalSVI(model, AutoNormal(model))
    state = svi.init(random.PRNGKey(0), y)
    for _ in range(15):  # past the dense metric's first refresh (memory of 10 steps)
        state, _ = svi.update(state, y)
    messages = []

    class Record(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    handler = Record()
    logging.getLogger("jax").addHandler(handler)
    try:
        with jax.log_compiles():
            for _ in range(3):
                state, _ = svi.update(state, y)
    finally:
        logging.getLogger("jax").removeHandler(handler)
    assert messages == []
