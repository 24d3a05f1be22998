"""The dense metric of small guides (``AdaptiveStep.dense_max_dim``), both backends.

A diagonal step crawls along the ridge of a correlated posterior: its Newton step uses each
coordinate's own curvature, so on a correlation rho it gains a fraction ~(1 - rho) of the
distance per step. The dense metric estimates the target's curvature from the draws (Stein's
identity, exact on a Gaussian) and steps along the ridge.
"""

from __future__ import annotations

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.autoguide import AutoNormal

from pyro_scorevi import AdaptiveStep, ScoreProximalSVI

RHO = 0.998


MEAN = (3.0, -2.0)


def _ridge_cov():
    return np.array([[1.0, RHO], [RHO, 1.0]])


def _pyro_ridge():
    loc = torch.tensor(MEAN)
    cov = torch.tensor(_ridge_cov(), dtype=torch.float32)

    def model():
        pyro.sample("theta", dist.MultivariateNormal(loc, cov))

    return model


def _fit_pyro(rule, steps, seed=0):
    model = _pyro_ridge()
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    guide = AutoNormal(model)
    svi = ScoreProximalSVI(model, guide, step_rule=rule)
    for _ in range(steps):
        svi.step()
    return pyro.param("AutoNormal.locs.theta").detach().numpy(), svi


def _fit_numpyro(rule, steps, seed=0):
    pytest.importorskip("numpyro")
    import jax
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as ndist
    from numpyro.infer.autoguide import AutoNormal as NAutoNormal

    from pyro_scorevi.numpyro import ScoreProximalSVI as NScoreProximalSVI

    def model():
        numpyro.sample(
            "theta", ndist.MultivariateNormal(jnp.asarray(MEAN), jnp.asarray(_ridge_cov()))
        )

    svi = NScoreProximalSVI(model, NAutoNormal(model), step_rule=rule)
    result = svi.run(jax.random.PRNGKey(seed), steps, progress_bar=False)
    return np.asarray(result.params["theta_auto_loc"]), result


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_dense_metric_walks_the_ridge_of_a_correlated_gaussian(backend):
    """Marginal sds 1, correlation 0.998 (mean-field sd 0.063), the mean 3.6 sds from the
    start: in 200 steps the default ends within 0.05 sd of it, the diagonal metric
    (``dense_max_dim=0``) is still 0.18-0.53 sd away (measured, seeds 0-2, both backends; the
    dense metric 0.000-0.002)."""
    fit = _fit_pyro if backend == "torch" else _fit_numpyro
    dense, _ = fit(AdaptiveStep(), 200)
    diagonal, _ = fit(AdaptiveStep(dense_max_dim=0), 200)
    assert np.abs(dense - MEAN).max() < 0.05
    assert np.abs(diagonal - MEAN).max() > 0.1


def _dense_score_fn(backend, request, scale, g):
    """``score(cross, spread, count, rule)``: the dense mean score of running moments, through
    the backend's ``refresh_curvature`` and ``dense_mean_score`` (the diagonal ``g`` where it
    is not used)."""
    d = len(scale)
    if backend == "torch":
        from pyro_scorevi import adaptive as ad

        def score(cross, spread, count, rule):
            curvature = ad.init_curvature(torch.zeros(d, dtype=torch.float64))._replace(
                cross=torch.tensor(cross), spread=torch.tensor(spread), count=float(count)
            )
            curvature = ad.refresh_curvature(curvature, torch.tensor(scale), rule)
            out = ad.dense_mean_score(curvature, torch.tensor(g))
            return g if out is None else out.numpy()

        return score
    request.getfixturevalue("jax_x64")
    import jax.numpy as jnp

    from pyro_scorevi.numpyro import adaptive as ad

    def score(cross, spread, count, rule):
        curvature = ad.init_curvature(jnp.zeros(d))._replace(
            cross=jnp.asarray(cross), spread=jnp.asarray(spread), count=jnp.asarray(count * 1.0)
        )
        curvature = ad.refresh_curvature(curvature, jnp.asarray(scale), rule)
        out, _ = ad.dense_mean_score(curvature, jnp.asarray(g))
        return np.asarray(out)

    return score


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_dense_mean_score_is_the_newton_step_on_a_quadratic(backend, request):
    """With the moments of a quadratic log density, s^2 * dense_mean_score(g) is H^-1 g (the
    Newton step) where H's whitened eigenvalues lie above the floor, and the floor caps the
    step along a flatter direction."""
    rng = np.random.default_rng(0)
    d = 4
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    scale = np.exp(0.3 * rng.standard_normal(d))
    g = rng.standard_normal(d)
    score = _dense_score_fn(backend, request, scale, g)
    rule = AdaptiveStep(dense_min_eigenvalue=1e-3)
    for eigenvalues in ([0.5, 1.0, 2.0, 4.0], [0.01, 1.0, 2.0, 4.0]):
        # H with whitened (D^1/2 H D^1/2) eigenvalues as given.
        whitened = q @ np.diag(eigenvalues) @ q.T
        hessian = whitened / np.outer(scale, scale)
        cross = np.zeros((d, d))
        spread = np.zeros((d, d))
        for _ in range(200):
            eps = rng.standard_normal(d)
            offsets = np.stack([scale * eps, -scale * eps])
            scores = -offsets @ hessian.T + 0.3
            cross += scores.T @ offsets / 2 / 200
            spread += offsets.T @ offsets / 2 / 200
        step = scale**2 * score(cross, spread, 200, rule)
        # rtol 3e-3: the solve regularises Cov(delta) by 1e-3 of its diagonal.
        np.testing.assert_allclose(step, np.linalg.solve(hessian, g), rtol=3e-3, atol=1e-8)
    # A floor of 0.1 raises the smallest whitened eigenvalue (0.01) to 0.1.
    capped = q @ np.diag([0.1, 1.0, 2.0, 4.0]) @ q.T / np.outer(scale, scale)
    step = scale**2 * score(cross, spread, 200, AdaptiveStep(dense_min_eigenvalue=0.1))
    np.testing.assert_allclose(step, np.linalg.solve(capped, g), rtol=3e-3, atol=1e-8)


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_float32_factors_of_badly_scaled_moments_match_float64(backend, request):
    """Scales over five decades (a raw-scale regression's intercept against its slopes) and
    whitened eigenvalues over four: the float32 factors are within 1e-4 (relative) of the
    float64 ones. The unscaled solve of Cov(delta) was off by 4e-4 here, and on a raw-scale
    collinear regression (d = 51, float32) its error let the loss climb to 2e11 on the way."""
    rng = np.random.default_rng(0)
    d = 40
    scale = 10.0 ** np.linspace(-4, 1, d)
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    hessian = q @ np.diag(10.0 ** np.linspace(-2, 2, d)) @ q.T / np.outer(scale, scale)
    offsets = rng.standard_normal((400, d)) * scale
    cross = (-offsets @ hessian).T @ offsets / 400
    spread = offsets.T @ offsets / 400
    rule = AdaptiveStep()
    if backend == "torch":
        from pyro_scorevi.adaptive import dense_factors, init_curvature

        def factors(dtype):
            t = lambda a: torch.as_tensor(a, dtype=dtype)  # noqa: E731
            cur = init_curvature(t(scale))._replace(spread=t(spread), cross=t(cross), count=500.0)
            _, eigenvalues, _, _, diagonal = dense_factors(cur, t(scale), rule)
            return eigenvalues.double().numpy(), diagonal.double().numpy()

        exact, single = factors(torch.float64), factors(torch.float32)
    else:
        request.getfixturevalue("jax_x64")  # float64 arrays next to the float32 ones
        import jax.numpy as jnp

        from pyro_scorevi.numpyro.adaptive import dense_factors, init_curvature

        def factors(dtype):
            t = lambda a: jnp.asarray(a, dtype=dtype)  # noqa: E731
            cur = init_curvature(t(scale))._replace(spread=t(spread), cross=t(cross), count=500.0)
            (_, eigenvalues, _, _, diagonal), ok = dense_factors(cur, t(scale), rule)
            assert bool(ok)
            return np.asarray(eigenvalues, float), np.asarray(diagonal, float)

        exact, single = factors(jnp.float64), factors(jnp.float32)
    for a, b in zip(single, exact):
        np.testing.assert_allclose(a, b, rtol=1e-4)


def test_dense_metric_torch_jax_parity(jax_x64):
    """The running moments and the dense score agree between the backends (float64)."""
    import jax.numpy as jnp

    from pyro_scorevi import adaptive as tad
    from pyro_scorevi.numpyro import adaptive as jad
    from pyro_scorevi.numpyro.proximal import ScoreStatistics as JStats
    from pyro_scorevi.proximal import ScoreStatistics

    rng = np.random.default_rng(1)
    d = 6
    rule = AdaptiveStep(dense_min_memory=3.0, dense_memory=0.5)
    t_curv = tad.init_curvature(torch.zeros(d, dtype=torch.float64))
    j_curv = jad.init_curvature(jnp.zeros(d))
    scale = np.exp(rng.standard_normal(d))
    for _ in range(5):
        offsets = rng.standard_normal((2, d))
        scores = rng.standard_normal((2, d)) - offsets
        stats = [offsets.mean(0), (offsets**2).mean(0), (offsets * scores).mean(0)]
        stats.append(scores.mean(0))
        moments = np.concatenate([scores.T @ offsets, offsets.T @ offsets]) / 2
        t_curv = tad.update_curvature(
            t_curv,
            torch.tensor(moments),
            ScoreStatistics(*map(torch.tensor, stats)),
            rule,
        )
        j_curv = jad.update_curvature(
            j_curv, jnp.asarray(moments), JStats(*map(jnp.asarray, stats)), rule, True
        )
        np.testing.assert_allclose(t_curv.cross.numpy(), np.asarray(j_curv.cross), rtol=1e-12)
        np.testing.assert_allclose(t_curv.spread.numpy(), np.asarray(j_curv.spread), rtol=1e-12)
        g = rng.standard_normal(d)
        t_curv = tad.refresh_curvature(t_curv, torch.tensor(scale), rule)
        j_curv = jad.refresh_curvature(j_curv, jnp.asarray(scale), rule)
        assert t_curv.refreshed == float(j_curv.refreshed)
        t_score = tad.dense_mean_score(t_curv, torch.tensor(g))
        j_score, used = jad.dense_mean_score(j_curv, jnp.asarray(g))
        assert (t_score is not None) == bool(used)
        expected = g if t_score is None else t_score.numpy()
        np.testing.assert_allclose(expected, np.asarray(j_score), rtol=1e-8, atol=1e-10)
    assert t_curv.count == 5 and bool(used)
    # A non-finite step leaves the JAX moments as they were (torch skips it in core.update).
    same = jad.update_curvature(
        j_curv, jnp.full((2 * d, d), jnp.nan), JStats(*map(jnp.asarray, stats)), rule, False
    )
    np.testing.assert_array_equal(np.asarray(same.cross), np.asarray(j_curv.cross))


def test_dense_restart_starts_the_moments_again_and_keeps_the_factors(jax_x64):
    """``restart``: the moments become this step's (weight 1), the count 1; the last factors
    stay in use (the dense score is unchanged) and are refreshed once the memory is full
    again; the settled precision waits for that refresh. Both backends, float64."""
    import jax.numpy as jnp

    from pyro_scorevi import adaptive as tad
    from pyro_scorevi.numpyro import adaptive as jad
    from pyro_scorevi.numpyro.proximal import ScoreStatistics as JStats
    from pyro_scorevi.proximal import ScoreStatistics

    rng = np.random.default_rng(2)
    d = 3
    rule = AdaptiveStep(dense_min_memory=4.0, dense_memory=0.5)  # memory 4, refresh every 1
    scale = np.exp(rng.standard_normal(d))
    steps = []
    for _ in range(12):
        offsets = rng.standard_normal((2, d))
        scores = rng.standard_normal((2, d)) - offsets
        stats = [offsets.mean(0), (offsets**2).mean(0), (offsets * scores).mean(0)]
        stats.append(scores.mean(0))
        steps.append((np.concatenate([scores.T @ offsets, offsets.T @ offsets]) / 2, stats))
    curvatures = {}
    for name, ad, array, statistics, extra in (
        ("torch", tad, torch.tensor, ScoreStatistics, ()),
        ("jax", jad, jnp.asarray, JStats, (True,)),
    ):
        curvature = ad.init_curvature(array(np.zeros(d)))
        history = []
        for k, (moments, stats) in enumerate(steps):
            curvature = ad.update_curvature(
                curvature,
                array(moments),
                statistics(*map(array, stats)),
                rule,
                *extra,
                **({"restart": True} if k == 8 else {}),
            )
            if k == 8:
                fresh = moments[:d] - np.outer(stats[3], stats[0])
                np.testing.assert_allclose(np.asarray(curvature.cross), fresh, rtol=1e-12)
                assert float(curvature.count) == 1
                before = ad.dense_mean_score(curvature, array(np.ones(d)))
            curvature = ad.refresh_curvature(curvature, array(scale), rule)
            history.append(float(curvature.refreshed))
            if k == 8:
                after = ad.dense_mean_score(curvature, array(np.ones(d)))
                if name == "jax":
                    before, after = before[0], after[0]
                np.testing.assert_array_equal(np.asarray(before), np.asarray(after))
                precision = ad.settled_precision(curvature)
                assert precision is None or not np.any(np.asarray(precision) > 0)
        # Refreshed from step 4 on (count 4), then again only once the memory is full again.
        assert history == [-1, -1, -1, 4, 5, 6, 7, 8, 0, 0, 0, 4], history
        curvatures[name] = curvature
    np.testing.assert_allclose(
        curvatures["torch"].cross.numpy(), np.asarray(curvatures["jax"].cross), rtol=1e-12
    )


@pytest.mark.parametrize("xp_name", ["numpy", "jax.numpy"])
def test_the_restart_comes_once_at_a_release_with_the_trust_recovered(xp_name):
    """``should_restart``: only with ``dense_restart``, only while not yet restarted, only at a
    step with ``release > 0`` and the trust at 1 (an overflowing start reads as flat while its
    steps are rejected)."""
    import importlib

    from pyro_scorevi.step_rules import should_restart

    if xp_name == "jax.numpy":
        pytest.importorskip("jax")
    xp = importlib.import_module(xp_name)
    rule = AdaptiveStep()
    assert bool(should_restart(rule, False, 0.3, 1.0, xp))
    assert not bool(should_restart(rule, True, 0.3, 1.0, xp))
    assert not bool(should_restart(rule, False, 0.0, 1.0, xp))
    assert not bool(should_restart(rule, False, 0.3, 0.5, xp))
    assert not bool(should_restart(AdaptiveStep(dense_restart=False), False, 1.0, 1.0, xp))


def test_dense_state_is_carried_by_state_dict_and_resumes_exactly():
    """The running curvature is part of the step's state: a fit resumed from ``state_dict``
    continues bit for bit."""
    from pyro.util import get_rng_state, set_rng_state

    model = _pyro_ridge()
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    svi = ScoreProximalSVI(model, AutoNormal(model))
    for _ in range(60):
        svi.step()
    state = svi.state_dict()
    curvature = state["diagonal_state"]["curvature"]
    assert curvature is not None and curvature[2] == 60
    params = {k: v.detach().clone() for k, v in pyro.get_param_store().items()}
    rng = get_rng_state()
    expected = [svi.step() for _ in range(20)]

    pyro.clear_param_store()
    resumed = ScoreProximalSVI(model, AutoNormal(model))
    resumed.guide()  # creates the params
    for k, v in params.items():
        pyro.get_param_store()[k] = v.clone()
    resumed.load_state_dict(state)
    set_rng_state(rng)
    assert [resumed.step() for _ in range(20)] == expected


def test_large_guides_and_dense_max_dim_zero_keep_the_diagonal_metric():
    model = _pyro_ridge()
    for rule, dense in ((AdaptiveStep(), True), (AdaptiveStep(dense_max_dim=1), False)):
        pyro.clear_param_store()
        svi = ScoreProximalSVI(model, AutoNormal(model), step_rule=rule)
        svi.step()
        assert (svi.state_dict()["diagonal_state"]["curvature"] is not None) == dense


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_a_wide_standardised_regression_past_the_dense_size_is_exact(backend, wide_regression):
    """251 coordinates (past ``dense_max_dim``: the diagonal step) on collinear standardised
    columns: the defaults reach the exact posterior means within 1e-3 sds in 1500 steps in
    both backends (measured 1e-6 to 3e-6; ``Trace_ELBO`` + Adam(0.01) ends 2.9 sds off), and
    never report the fit as diverging. The raw-scale version of this design diverges, and
    says so (``tests/test_diverging_fit.py``; ``docs/pitfalls.md``, "Correlated posteriors")."""
    x, y, mean, sd = wide_regression.design()
    loc, _, caught = wide_regression.fit(backend, x, y, 1500)
    np.testing.assert_array_less(np.abs(loc - mean) / sd, 1e-3)
    assert not [m for m in caught if "the fit is diverging" in m]


def test_dense_options_are_validated():
    with pytest.raises(ValueError, match="dense_max_dim"):
        AdaptiveStep(dense_max_dim=-1)
    with pytest.raises(ValueError, match="dense_max_dim"):
        AdaptiveStep(dense_max_dim=2.5)
    with pytest.raises(ValueError, match="dense_min_eigenvalue"):
        AdaptiveStep(dense_min_eigenvalue=0.0)
    with pytest.raises(ValueError, match="dense_min_memory"):
        AdaptiveStep(dense_min_memory=0.5)
    with pytest.raises(ValueError, match="dense_memory"):
        AdaptiveStep(dense_memory=-1.0)
    with pytest.raises(TypeError, match="dense_restart"):
        AdaptiveStep(dense_restart=1)


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_non_finite_curvature_keeps_the_diagonal_step(backend, request):
    """Overflowing running moments (inf or NaN) never reach the eigendecomposition (torch's
    raises on NaN) and never crash the step: the mean's score stays the diagonal one."""
    d = 3
    g = np.array([1.0, -2.0, 0.5])
    score = _dense_score_fn(backend, request, np.ones(d), g)
    for entry in (np.nan, np.inf):  # a NaN row is uncurved; an inf one is caught before eigh
        # Positive curvature on the diagonal (so the coordinates are coupled), entry off it.
        cross = np.full((d, d), entry)
        np.fill_diagonal(cross, -1.0)
        np.testing.assert_allclose(score(cross, np.eye(d), 100, AdaptiveStep()), g, rtol=1e-6)


def test_refresh_interval_reuses_the_factors_between_eigendecompositions():
    """Past 64 coordinates the factors are recomputed every ``d // 32`` averaged steps and
    reused in between; below, every step."""
    from pyro_scorevi import adaptive as ad

    rule = AdaptiveStep()
    assert rule.dense_refresh_steps(63) == 1 and rule.dense_refresh_steps(100) == 3
    d = 100
    curvature = ad.init_curvature(torch.zeros(d, dtype=torch.float64))._replace(
        spread=torch.eye(d, dtype=torch.float64),
        cross=-torch.eye(d, dtype=torch.float64),
        count=rule.dense_memory_steps(d),
    )
    scale = torch.ones(d, dtype=torch.float64)
    first = ad.refresh_curvature(curvature, scale, rule)
    assert first.refreshed == curvature.count
    for k in (1, 2):  # not due: the same factors, even at another scale
        later = ad.refresh_curvature(first._replace(count=first.count + k), 2 * scale, rule)
        assert later.refreshed == first.refreshed and torch.equal(later.root, first.root)
    due = ad.refresh_curvature(first._replace(count=first.count + 3), 2 * scale, rule)
    assert due.refreshed == first.count + 3 and torch.equal(due.root, 2 * scale)


def test_numpyro_dense_state_resumes_exactly():
    """NumPyro: the curvature lives in the state, so 30 + 30 steps with ``init_state`` equal 60
    steps in one run, bit for bit (the dense metric is on from step 10)."""
    pytest.importorskip("numpyro")
    import jax
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as ndist
    from numpyro.infer.autoguide import AutoNormal as NAutoNormal

    from pyro_scorevi.numpyro import ScoreProximalSVI as NScoreProximalSVI

    def model():
        numpyro.sample(
            "theta", ndist.MultivariateNormal(jnp.asarray(MEAN), jnp.asarray(_ridge_cov()))
        )

    svi = NScoreProximalSVI(model, NAutoNormal(model))
    whole = svi.run(jax.random.PRNGKey(0), 60, progress_bar=False)
    first = svi.run(jax.random.PRNGKey(0), 30, progress_bar=False)
    assert int(first.state.rule.curvature.refreshed) >= 0  # the factors are in use
    rest = svi.run(None, 30, progress_bar=False, init_state=first.state)
    for k in whole.params:
        np.testing.assert_array_equal(np.asarray(whole.params[k]), np.asarray(rest.params[k]))
