"""The settled precision of small guides (``AdaptiveStep.settled_scale_rate``), both backends.

On by default (``settled_scale_rate=0.02``, with ``settled_band`` and ``dense_restart``). A
mean-field guide's fixed point has precision :math:`\\mathbb E_q[-\\partial_j^2 \\log p]`.
Each step's Stein estimate :math:`-\\mathrm{Cov}(\\delta_j, \\hat g_j)/\\mathrm{Var}\\,\\delta_j`
carries the noise of every other coordinate (:math:`\\sum_{k\\ne j} H_{jk}\\delta_k/\\delta_j`);
once the loss has stopped falling, a guide in the dense metric steps its log-precisions toward
the running curvature's diagonal instead, which the regression on all the offsets leaves
without that noise.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.autoguide import AutoNormal

from pyro_scorevi import AdaptiveStep, ScoreProximalSVI


def _correlated_gaussian():
    """The comparison's ``gaussian`` target: 20 coordinates, covariance eigenvalues
    log-uniform on [0.1, 10]; the mean-field optimum's sds are ``1 / sqrt(P_jj)``."""
    d = 20
    rng = np.random.default_rng(20)
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    eig = np.exp(rng.uniform(np.log(0.1), np.log(10.0), d))
    precision = np.linalg.inv((q * eig) @ q.T)
    precision = 0.5 * (precision + precision.T)
    return rng.standard_normal(d), precision


def _log_sd_error(scale, precision):
    return float(np.sqrt(np.mean((np.log(scale) + 0.5 * np.log(np.diag(precision))) ** 2)))


def _fit_torch(rule, steps):
    mu, precision = _correlated_gaussian()

    def model():
        pyro.sample(
            "x",
            dist.MultivariateNormal(
                torch.tensor(mu, dtype=torch.float32),
                precision_matrix=torch.tensor(precision, dtype=torch.float32),
            ),
        )

    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    svi = ScoreProximalSVI(model, AutoNormal(model), step_rule=rule)
    for _ in range(steps):
        svi.step()
    return pyro.param("AutoNormal.scales.x").detach().double().numpy()


def _fit_jax(rule, steps):
    pytest.importorskip("numpyro")
    import jax
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as ndist
    from numpyro.infer.autoguide import AutoNormal as NAutoNormal

    from pyro_scorevi.numpyro import ScoreProximalSVI as NScoreProximalSVI

    mu, precision = _correlated_gaussian()

    def model():
        numpyro.sample(
            "x", ndist.MultivariateNormal(jnp.asarray(mu), precision_matrix=jnp.asarray(precision))
        )

    svi = NScoreProximalSVI(model, NAutoNormal(model), step_rule=rule)
    result = svi.run(jax.random.PRNGKey(0), steps, progress_bar=False)
    return np.asarray(result.params["x_auto_scale"], dtype=float)


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_settled_scales_reach_the_mean_field_optimum_of_a_correlated_gaussian(backend):
    """500 steps (the issue's 1000 evaluations): the scales' log-error against the mean-field
    optimum is at most 0.03 with the defaults (``settled_scale_rate=0.02``) and over 1.5x that
    with each step's own target, the previous release's step (``settled_scale_rate=0``); seed 0
    measured 0.012 against 0.049 (torch) and 0.013 against 0.044 (JAX)."""
    fit = _fit_torch if backend == "torch" else _fit_jax
    _, precision = _correlated_gaussian()
    settled = _log_sd_error(fit(AdaptiveStep(), 500), precision)
    own = _log_sd_error(fit(AdaptiveStep(settled_scale_rate=0.0), 500), precision)
    assert settled < 0.03
    assert own > 1.5 * settled


def _curvature_of(backend, hessian, scale):
    """The backend's curvature state after a refresh, for running moments of a quadratic log
    density with Hessian ``-hessian`` (``cross = -H spread``)."""
    d = len(scale)
    spread = np.diag(scale**2)
    cross = -hessian @ spread
    if backend == "torch":
        from pyro_scorevi import adaptive as ad

        curvature = ad.init_curvature(torch.zeros(d, dtype=torch.float64))._replace(
            cross=torch.tensor(cross), spread=torch.tensor(spread), count=100.0
        )
        return ad, ad.refresh_curvature(curvature, torch.tensor(scale), AdaptiveStep())
    import jax.numpy as jnp

    from pyro_scorevi.numpyro import adaptive as ad

    curvature = ad.init_curvature(jnp.zeros(d))._replace(
        cross=jnp.asarray(cross), spread=jnp.asarray(spread), count=jnp.asarray(100.0)
    )
    return ad, ad.refresh_curvature(curvature, jnp.asarray(scale), AdaptiveStep())


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_settled_precision_is_the_running_curvature_diagonal(backend, request):
    """``settled_precision`` is :math:`\\hat H_{jj}` of the last refresh, 0 on a coordinate
    with no positive curvature (no target: the step's own) and before the first refresh."""
    if backend == "jax":
        request.getfixturevalue("jax_x64")
    hessian = np.array([[2.0, 0.9, 0.0], [0.9, 1.0, 0.0], [0.0, 0.0, -0.5]])
    scale = np.array([0.5, 1.5, 1.0])
    ad, curvature = _curvature_of(backend, hessian, scale)
    # rtol 3e-3: the solve regularises Cov(delta) by 1e-3 of its diagonal.
    np.testing.assert_allclose(
        np.asarray(ad.settled_precision(curvature)), [2.0, 1.0, 0.0], rtol=3e-3
    )
    fresh = ad.init_curvature(curvature.root)
    before = ad.settled_precision(fresh)
    assert before is None if backend == "torch" else not np.any(np.asarray(before))


def test_settled_target_blends_by_release_and_is_off_while_the_loss_falls(jax_x64):
    """With ``release`` r the Stein precision target is (1 - r) times the step's own plus r
    times the settled precision, in both backends (float64, to 1e-8); r = 0 is, bit for bit, the
    step without it."""
    import jax.numpy as jnp

    from pyro_scorevi import adaptive as tad
    from pyro_scorevi.numpyro import adaptive as jad
    from pyro_scorevi.numpyro.proximal import ScoreStatistics as JStats
    from pyro_scorevi.proximal import ScoreStatistics

    rng = np.random.default_rng(3)
    d = 5
    loc, scale = rng.standard_normal(d), np.exp(0.3 * rng.standard_normal(d))
    offsets = scale * rng.standard_normal((2, d))
    scores = -2.0 * offsets + rng.standard_normal((2, d))
    raw = [offsets.mean(0), (offsets**2).mean(0), (offsets * scores).mean(0), scores.mean(0)]
    precision = np.array([3.0, 0.5, 0.0, 2.0, 1.0])  # 0: no target on coordinate 2
    rule = AdaptiveStep(settled_scale_rate=0.02)
    backends = {
        "torch": (tad, torch.tensor, ScoreStatistics, lambda x: x.numpy()),
        "jax": (jad, jnp.asarray, JStats, np.asarray),
    }

    def step(backend, release, target):
        ad, array, statistics, to_numpy = backends[backend]
        new_loc, new_scale, _, _ = ad.adaptive_update(
            array(loc),
            array(scale),
            statistics(*map(array, raw)),
            ad.init_rates(array(loc), rule),
            1.0,
            rule,
            release,
            apply_variance_ratio=False,
            precision=None if target is None else array(target),
        )
        return [to_numpy(new_loc), to_numpy(new_scale)]

    for backend in ("torch", "jax"):
        for a, b in zip(step(backend, 0.0, precision), step(backend, 0.0, None)):
            np.testing.assert_array_equal(a, b)
    for release in (0.4, 1.0):
        moved = step("torch", release, precision)
        for a, b in zip(moved, step("jax", release, precision)):
            np.testing.assert_allclose(a, b, rtol=1e-8)
        unchanged = step("torch", release, None)
        assert not np.allclose(moved[1], unchanged[1])
        np.testing.assert_array_equal(moved[1][2], unchanged[1][2])  # no target there
    spread = raw[1] - raw[0] ** 2
    cross = raw[2] - raw[0] * raw[3]
    stats, blended, where = tad._settled_statistics(
        ScoreStatistics(*map(torch.tensor, raw)),
        torch.tensor(spread),
        torch.tensor(cross),
        torch.tensor(precision),
        0.25,
        torch.tensor(scale**2),
        float("inf"),
    )
    expected = np.where(precision > 0, 0.75 * (-cross / spread) + 0.25 * precision, -cross / spread)
    np.testing.assert_allclose(-blended.numpy() / spread, expected, rtol=1e-12)
    assert where.tolist() == [True, True, False, True, True]


def test_settled_band_keeps_the_own_target_far_from_the_guides_precision():
    """``settled_band`` b: a settled precision outside [1/b, 1/b^-1] times the guide's 1/s^2 (a
    stale memory of the start) is no target; inside, it is."""
    from pyro_scorevi import adaptive as tad
    from pyro_scorevi.proximal import ScoreStatistics

    w = torch.tensor([1.0, 1.0, 1.0, 4.0, 0.25])
    precision = torch.tensor([1.9, 2.1, 0.45, 1.0, 1e5])  # times w: 1.9, 2.1, 0.45, 4, 2.5e4
    zeros = torch.zeros(5)
    stats = ScoreStatistics(zeros, w, -zeros, zeros)
    _, _, where = tad._settled_statistics(stats, w, -zeros, precision, 0.5, w, 2.0)
    assert where.tolist() == [True, False, False, False, False]
    _, _, where = tad._settled_statistics(stats, w, -zeros, precision, 0.5, w, float("inf"))
    assert where.all()


def test_the_settled_precision_and_its_guards_are_the_default():
    """On by default since it has its guards (the band, the restart, the uncapped growth of a
    too narrow guide); ``settled_scale_rate=0`` is the previous release's step."""
    rule = AdaptiveStep()
    assert rule.settled_scale_rate > 0 and rule.settled_band < math.inf and rule.dense_restart


def test_settled_scale_rate_is_validated():
    for bad in (-0.1, 0.6, True, "0.1", math.nan):
        with pytest.raises(ValueError, match="settled_scale_rate"):
            AdaptiveStep(settled_scale_rate=bad)
    assert AdaptiveStep(settled_scale_rate=0.0).settled_scale_rate == 0.0


def test_settled_band_is_validated():
    for bad in (0.5, 0.0, True, "2", math.nan):
        with pytest.raises(ValueError, match="settled_band"):
            AdaptiveStep(settled_band=bad)
    assert AdaptiveStep(settled_band=math.inf).settled_band == math.inf


@functools.cache
def _nile_fit(rule, seed):
    """The NumPyro fit (1500 steps) of a non-centred local level model of the Nile's flow:
    ``(sds of log sigma_level and log sigma_obs, H_jj s_j^2 of the running curvature's last
    refresh over every coordinate, whether the curvature restarted)``."""
    pytest.importorskip("numpyro")
    sm = pytest.importorskip("statsmodels.api")
    import jax
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as ndist
    from numpyro.infer.autoguide import AutoNormal as NAutoNormal

    from pyro_scorevi.numpyro import ScoreProximalSVI as NScoreProximalSVI

    y = jnp.asarray(sm.datasets.nile.load_pandas().data["volume"].to_numpy(float))
    names = ("level0", "sigma_level", "sigma_obs", "z")

    def model():
        level0 = numpyro.sample("level0", ndist.Normal(900.0, 300.0))
        s_level = numpyro.sample("sigma_level", ndist.HalfNormal(100.0))
        s_obs = numpyro.sample("sigma_obs", ndist.HalfNormal(200.0))
        z = numpyro.sample("z", ndist.Normal(0.0, 1.0).expand([y.shape[0] - 1]).to_event(1))
        level = jnp.concatenate([level0[None], level0 + jnp.cumsum(s_level * z)])
        numpyro.sample("y", ndist.Normal(level, s_obs).to_event(1), obs=y)

    svi = NScoreProximalSVI(model, NAutoNormal(model), step_rule=rule)
    state = svi.init(jax.random.PRNGKey(seed))
    state, _ = jax.jit(lambda s: jax.lax.scan(lambda a, _: svi.update(a), s, None, length=1500))(
        state
    )
    params = svi.get_params(state)
    scale = np.concatenate([np.ravel(np.asarray(params[f"{n}_auto_scale"])) for n in names])
    curvature = state.rule.curvature
    whitened = np.asarray(curvature.diagonal) * scale**2
    return scale[1:3], whitened, bool(curvature.restarted)


def _nile_scales(rule, seed):
    return _nile_fit(rule, seed)[0]


@pytest.mark.slow
def test_dense_restart_leaves_no_stale_curvature_on_a_local_level_model():
    """The running curvature of this model remembers its start: after 1500 steps without the
    restart, H_jj s_j^2 is 6729 and 86324 on the variance parameters (seed 2; 174 on seed 1),
    a memory of steps whose loss was 2e5. Restarted at the first release with the trust
    recovered, every coordinate's is within a factor 2 of 1 (the guide at the running
    curvature's fixed point; measured within 4%). The default fit is shared with the test
    above (cached)."""
    _, whitened, restarted = _nile_fit(AdaptiveStep(), 2)
    assert restarted
    assert np.max(np.abs(np.log(np.abs(whitened)))) < math.log(2)
    _, stale, restarted = _nile_fit(AdaptiveStep(dense_restart=False), 2)
    assert not restarted
    assert np.max(np.abs(stale[1:3])) > 10


@pytest.mark.slow
def test_settled_band_keeps_the_variance_parameters_of_a_local_level_model():
    """The failure that kept the settled precision opt-in: on this model (seed 2) the running
    curvature of log sigma_level remembered the start (3.6e5 times its mean-field precision
    near the end) and, without the band or the restart, the sds of both variance parameters
    collapsed to 0.04% and 0.1% of the previous release's. With the defaults they end within
    30% of that release's step, whose sds are within 5% of the mean-field ideal."""
    previous = AdaptiveStep(settled_scale_rate=0.0, progress_bound=math.inf, dense_restart=False)
    default = _nile_scales(AdaptiveStep(), seed=2)
    np.testing.assert_allclose(default, _nile_scales(previous, seed=2), rtol=0.3)


def test_a_state_dict_saved_before_the_settled_precision_loads():
    """A curvature saved without the ``diagonal`` field (8 entries) loads with no settled
    target until the next refresh."""
    from pyro_scorevi import adaptive as ad
    from pyro_scorevi import core

    loc = torch.zeros(3)
    state = core.init(loc, torch.ones(3), AdaptiveStep(), dense=True)
    fields = state._asdict()
    fields["rates"] = tuple(fields["rates"])
    fields["curvature"] = tuple(fields["curvature"])[:8]
    loaded = core.state_from_dict(fields)
    assert loaded.curvature.diagonal is None
    assert ad.settled_precision(loaded.curvature._replace(refreshed=5.0)) is None
