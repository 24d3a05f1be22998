"""``ScoreProximalSVI`` as a citizen of ``pyro.infer``: its loss, its interplay with Pyro's tools,
its handling of non-finite scores, determinism, checkpointing, dtypes and devices.

Tolerance tiers (``/work/shared/STYLE.md``): identities 1e-6 or bitwise, Monte Carlo comparisons
within ``K_SE`` standard errors, float64 device parity 1e-5.
"""

from __future__ import annotations

import copy
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Predictive, Trace_ELBO
from pyro.infer.autoguide import (
    AutoDiagonalNormal,
    AutoLowRankMultivariateNormal,
    AutoMultivariateNormal,
    AutoNormal,
)
from pyro.util import get_rng_state, set_rng_state

from pyro_scorevi import PolynomialGrowth, ScoreProximalSVI

ALL_GUIDES = [AutoNormal, AutoDiagonalNormal, AutoMultivariateNormal, AutoLowRankMultivariateNormal]
K_SE = 4.0  # Monte Carlo tier: a correct implementation fails 1 run in ~16000 (two-sided normal)


def _data(n=40, seed=0, dtype=torch.float32):
    return 2.0 + 1.5 * torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def model(y):
    loc = pyro.sample("loc", dist.Normal(torch.tensor(0.0, dtype=y.dtype), 10.0))
    scale = pyro.sample("scale", dist.LogNormal(torch.tensor(0.0, dtype=y.dtype), 1.0))
    with pyro.plate("data", len(y)):
        pyro.sample("obs", dist.Normal(loc, scale), obs=y)


def _store_snapshot() -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in pyro.get_param_store().items()}


def _assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


# ---------------------------------------------------------------------------- the loss


@pytest.mark.parametrize("Guide", [AutoNormal, AutoMultivariateNormal])
def test_step_returns_the_loss_of_the_frozen_guide(Guide):
    # Identity: under the same RNG state, step() draws the particles evaluate_loss() draws and
    # returns the same -ELBO estimate of q_t (the guide before the update).
    y = _data()
    svi = ScoreProximalSVI(model, Guide(model))
    for _ in range(3):
        svi.step(y)
    rng = get_rng_state()
    expected = svi.evaluate_loss(y)
    set_rng_state(rng)
    loss = svi.step(y)
    assert isinstance(loss, float)
    assert loss == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("Guide", [AutoNormal, AutoDiagonalNormal, AutoMultivariateNormal])
def test_loss_is_unbiased_for_trace_elbo(Guide):
    # Same guide, same model (with a constrained site, so the log-Jacobian must be accounted for
    # the same way): the mean of many evaluate_loss() calls equals the mean of many
    # Trace_ELBO().loss() calls within K_SE combined standard errors.
    y = _data()
    guide = Guide(model)
    svi = ScoreProximalSVI(
        model, guide, num_particles=2, prox_weight=10.0, inner_optim=pyro.optim.Adam({"lr": 0.05})
    )
    for _ in range(150):  # near the optimum, where the loss has a small variance
        svi.step(y)
    evaluator = ScoreProximalSVI(model, guide, num_particles=16)
    ours = torch.tensor([evaluator.evaluate_loss(y) for _ in range(200)], dtype=torch.float64)
    elbo = Trace_ELBO(num_particles=100, vectorize_particles=True)
    theirs = torch.tensor([elbo.loss(model, guide, y) for _ in range(32)], dtype=torch.float64)
    se = (ours.var() / len(ours) + theirs.var() / len(theirs)).sqrt()
    assert (ours.mean() - theirs.mean()).abs() < K_SE * se
    # The test must be able to fail: a loss missing the log-Jacobian of the scale site (about
    # log 1.5 = 0.4 nats here) or the entropy (several nats) falls outside the band.
    assert K_SE * se < 0.4


def test_evaluate_loss_changes_nothing():
    y = _data()
    guide = AutoNormal(model)
    svi = ScoreProximalSVI(model, guide)
    svi.step(y)
    before, counters = _store_snapshot(), svi.state_dict()
    for _ in range(5):
        assert isinstance(svi.evaluate_loss(y), float)
    _assert_bitwise_equal(before, _store_snapshot())
    assert svi.num_steps == counters["num_steps"] == 1


# ---------------------------------------------------------------------------- Pyro's tools


def test_fitted_guide_works_with_predictive_median_and_quantiles():
    y = _data(200)
    guide = AutoNormal(model)
    svi = ScoreProximalSVI(model, guide, prox_weight=PolynomialGrowth(10.0, 20.0, 1.0))
    for _ in range(300):
        svi.step(y)
    median = guide.median(y)
    quantiles = guide.quantiles([0.05, 0.5, 0.95], y)
    for name in ("loc", "scale"):
        lo, mid, hi = quantiles[name]
        assert lo < mid < hi
        # Identity: the median is the 0.5 quantile.
        assert torch.allclose(mid, median[name], rtol=1e-6)
    # Conjugate-fit tier: the fitted location is within a few percent of the sample mean.
    assert median["loc"].item() == pytest.approx(y.mean().item(), rel=0.03)
    assert median["scale"].item() == pytest.approx(y.std().item(), rel=0.1)

    samples = Predictive(model, guide=guide, num_samples=1000)(y)
    assert samples["obs"].shape == (1000, 200)
    loc_draws = samples["loc"].reshape(-1)  # Predictive may keep a singleton plate dim
    assert loc_draws.shape == (1000,)
    # Monte Carlo tier: the sample mean of loc within K_SE standard errors of the guide's mean.
    se = loc_draws.std() / len(loc_draws) ** 0.5
    assert (loc_draws.mean() - median["loc"]).abs() < K_SE * se


# ---------------------------------------------------------------------------- non-finite scores


def _bad_model_factory():
    """A model whose log density (or score) turns non-finite while ``mode[0]`` is set."""
    mode = [None]

    def bad_model(y):
        loc = pyro.sample("loc", dist.Normal(0.0, 10.0))
        scale = pyro.sample("scale", dist.LogNormal(0.0, 1.0))
        if mode[0] == "nan":
            # an overflowing rate: log_prob = 1 * log(inf) - inf = NaN (passes Pyro's validation)
            pyro.sample("bad", dist.Poisson(loc.exp() * float("inf")), obs=torch.tensor(1.0))
        elif mode[0] == "inf":
            pyro.factor("bad", loc.abs() * float("inf"))
        elif mode[0] == "worse":  # finite and sharply worse: a revert, not a failure
            pyro.factor("bad", torch.tensor(-1e4))
        elif mode[0] == "nan_score":
            # log density finite (0), gradient 0.5 / sqrt(0) * 0 = NaN
            pyro.factor("bad", torch.sqrt(loc - loc))
        with pyro.plate("data", len(y)):
            pyro.sample("obs", dist.Normal(loc, scale), obs=y)

    return bad_model, mode


@pytest.mark.parametrize("Guide", ALL_GUIDES)
@pytest.mark.parametrize("kind", ["nan", "inf", "nan_score"])
def test_non_finite_step_is_rejected(Guide, kind):
    y = _data()
    bad_model, mode = _bad_model_factory()
    guide = Guide(bad_model)
    svi = ScoreProximalSVI(bad_model, guide)
    svi.step(y)
    previous = _store_snapshot()
    svi.step(y)
    before = _store_snapshot()
    mode[0] = kind
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            svi.step(y)
    runtime_warnings = [w for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(runtime_warnings) == 1
    assert "rejected" in str(runtime_warnings[0].message)
    assert svi.num_rejected_steps == 3
    assert svi.num_steps == 2
    # AdaptiveStep (diagonal guides) reverts the first failed step to the previous iterate and
    # rejects the next ones (no backup left); the inner-step guides keep the current one.
    reverts = Guide in (AutoNormal, AutoDiagonalNormal)
    _assert_bitwise_equal(previous if reverts else before, _store_snapshot())
    before = _store_snapshot()
    # The run recovers once the scores are finite again.
    mode[0] = None
    svi.step(y)
    assert svi.num_steps == 3 and svi.num_rejected_steps == 3
    after = _store_snapshot()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_a_revert_of_a_finite_worse_step_is_counted_and_logged_not_warned(caplog):
    # Reverts are the adaptive rule at work (1 in 800 steps of a well-posed model): no
    # RuntimeWarning that calls them non-finite, but counted and logged at INFO.
    y = _data()
    bad_model, mode = _bad_model_factory()
    svi = ScoreProximalSVI(bad_model, AutoNormal(bad_model))
    for _ in range(3):
        svi.step(y)
    mode[0] = "worse"
    with warnings.catch_warnings(record=True) as caught, caplog.at_level("INFO"):
        warnings.simplefilter("always")
        svi.step(y)
    assert svi.num_rejected_steps == 1
    assert not [w for w in caught if issubclass(w.category, RuntimeWarning)]
    assert any("reverted step" in r.getMessage() for r in caplog.records)
    mode[0] = "nan"  # a numerical failure afterwards still warns once
    with pytest.warns(RuntimeWarning, match="not finite"):
        svi.step(y)


def test_a_stuck_fit_is_named_once_and_a_recovered_one_resets(monkeypatch):
    import pyro_scorevi.svi as svi_module

    monkeypatch.setattr(svi_module, "STUCK_AFTER", 4)
    y = _data()
    bad_model, mode = _bad_model_factory()
    svi = ScoreProximalSVI(bad_model, AutoNormal(bad_model))
    svi.step(y)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mode[0] = "nan"
        for _ in range(3):
            svi.step(y)
        mode[0] = None
        svi.step(y)  # accepted: the streak starts again
        mode[0] = "nan"
        for _ in range(3):
            svi.step(y)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "rejected a step" in messages[0]  # 3 in a row < 4: not stuck
    with pytest.warns(RuntimeWarning, match="the last 4 steps were all rejected.*init_scale"):
        svi.step(y)
    assert svi.num_rejected_steps == 7


def test_rejected_step_leaves_model_params_and_optimiser_alone():
    y = _data()
    bad_model, mode = _bad_model_factory()

    def model_with_param(y):
        pyro.param("offset", torch.tensor(0.5))
        bad_model(y)

    guide = AutoNormal(model_with_param)
    svi = ScoreProximalSVI(model_with_param, guide, optim=pyro.optim.Adam({"lr": 0.1}))
    svi.step(y)
    before = _store_snapshot()
    optim_before = copy.deepcopy(svi.optim.get_state())
    mode[0] = "nan"
    with pytest.warns(RuntimeWarning, match="rejected"):
        svi.step(y)
    # The guide is reverted to its previous iterate (AdaptiveStep); the model's own param and
    # its optimiser are not stepped on a failed step.
    assert torch.equal(before["offset"], _store_snapshot()["offset"])
    after = svi.optim.get_state()
    for name, state in optim_before.items():
        for key, value in state.items():
            if isinstance(value, dict):
                for k, v in value.items():
                    if torch.is_tensor(v):
                        assert torch.equal(v, after[name][key][k]), (name, key, k)


# ---------------------------------------------------------------------------- determinism


def _run(Guide, seed, steps=5, **kwargs):
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    y = _data()
    svi = ScoreProximalSVI(model, Guide(model), **kwargs)
    losses = [svi.step(y) for _ in range(steps)]
    return losses, _store_snapshot()


@pytest.mark.parametrize("Guide", ALL_GUIDES)
def test_same_seed_same_result(Guide):
    losses_a, params_a = _run(Guide, seed=3)
    losses_b, params_b = _run(Guide, seed=3)
    assert losses_a == losses_b
    _assert_bitwise_equal(params_a, params_b)
    losses_c, _ = _run(Guide, seed=4)
    assert losses_c != losses_a


def test_prebuilt_guide_gives_the_same_run():
    # Setting the guide up inside the first step draws nothing from the RNG, so calling the
    # guide beforehand (e.g. to inspect it) does not change the run.
    losses_a, params_a = _run(AutoNormal, seed=5)
    pyro.clear_param_store()
    pyro.set_rng_seed(5)
    y = _data()
    guide = AutoNormal(model)
    with pyro.poutine.block():
        guide(y)
    pyro.set_rng_seed(5)
    svi = ScoreProximalSVI(model, guide)
    losses_b = [svi.step(y) for _ in range(5)]
    assert losses_a == losses_b
    _assert_bitwise_equal(params_a, _store_snapshot())


@pytest.mark.parametrize("Guide", ALL_GUIDES)
@pytest.mark.parametrize("with_optim", [False, True])
def test_checkpoint_resumes_exactly(Guide, with_optim, tmp_path):
    y = _data()

    def model_with_param(y):
        shift = pyro.param("shift", torch.tensor(0.0))
        loc = pyro.sample("loc", dist.Normal(0.0, 10.0))
        scale = pyro.sample("scale", dist.LogNormal(0.0, 1.0))
        with pyro.plate("data", len(y), subsample_size=16) as idx:
            pyro.sample("obs", dist.Normal(loc + shift, scale), obs=y[idx])

    def make_svi():
        optim = pyro.optim.Adam({"lr": 0.05}) if with_optim else None
        return ScoreProximalSVI(
            model_with_param,
            Guide(model_with_param),
            optim,
            prox_weight=PolynomialGrowth(10.0, 2.0, 1.0),  # so that the step count matters
        )

    svi = make_svi()
    for _ in range(4):
        svi.step(y)
    path = tmp_path / "params.pt"
    pyro.get_param_store().save(path)
    state, rng = svi.state_dict(), get_rng_state()
    expected_losses = [svi.step(y) for _ in range(4)]
    expected = _store_snapshot()

    pyro.clear_param_store()
    pyro.set_rng_seed(123)  # anything in between must not matter
    pyro.get_param_store().load(path)
    resumed = make_svi()
    resumed.load_state_dict(state)
    set_rng_state(rng)
    losses = [resumed.step(y) for _ in range(4)]
    assert losses == expected_losses
    _assert_bitwise_equal(expected, _store_snapshot())
    assert resumed.state_dict()["num_steps"] == svi.num_steps == 8


# ---------------------------------------------------------------------------- dtypes, devices


@pytest.mark.parametrize("Guide", ALL_GUIDES)
def test_float64_model_keeps_float64_params(Guide):
    y = _data(dtype=torch.float64)
    guide = Guide(model)
    svi = ScoreProximalSVI(model, guide)
    for _ in range(3):
        assert isinstance(svi.step(y), float)
    store = pyro.get_param_store()
    assert len(store) > 0
    for name, value in store.items():
        assert value.dtype == torch.float64, name
    assert guide.median(y)["loc"].dtype == torch.float64


def _device_run(device):
    """A float64 run whose particles are drawn on the CPU, so that both devices see the same
    random numbers."""
    pyro.clear_param_store()
    cpu = torch.Generator().manual_seed(0)
    original = torch.randn_like

    def randn_like(t, **kwargs):
        return torch.randn(t.shape, dtype=t.dtype, generator=cpu).to(t.device)

    y = _data(dtype=torch.float64).to(device)
    guide = AutoNormal(model)
    svi = ScoreProximalSVI(model, guide, num_particles=3)
    torch.randn_like = randn_like
    try:
        for _ in range(20):
            svi.step(y)
    finally:
        torch.randn_like = original
    return {k: v.detach() for k, v in pyro.get_param_store().items()}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_params_stay_on_device_and_agree_with_cpu():
    on_cuda = _device_run("cuda")
    for name, value in on_cuda.items():
        assert value.is_cuda, name
    on_cpu = _device_run("cpu")
    for name in on_cpu:
        # float64 device parity tier: same arithmetic, different kernels
        torch.testing.assert_close(on_cuda[name].cpu(), on_cpu[name], rtol=1e-5, atol=1e-8)


# ---------------------------------------------------------------------------- particle options


@pytest.mark.parametrize(
    "antithetic, num_particles", [(True, 1), (True, 2), (False, 2), (True, 3), (False, 3)]
)
def test_antithetic_and_particle_counts_fit(antithetic, num_particles):
    # Conjugate (known-scale normal mean) posterior N(mean_n, sd_n^2); conjugate-fit tier: the
    # mean within 0.1 posterior sd, the sd within 10% (measured over 5 seeds at 1000 steps:
    # mean errors <= 0.03 sd for S = 1 antithetic; at 400 steps S = 1 was still 0.7 sd away).
    y = _data(100)

    def normal_mean(y):
        loc = pyro.sample("loc", dist.Normal(0.0, 10.0))
        with pyro.plate("data", len(y)):
            pyro.sample("obs", dist.Normal(loc, 1.5), obs=y)

    prec = 1 / 10.0**2 + len(y) / 1.5**2
    post_mean, post_sd = (y.sum() / 1.5**2 / prec).item(), prec**-0.5
    guide = AutoNormal(normal_mean)
    svi = ScoreProximalSVI(
        normal_mean,
        guide,
        num_particles=num_particles,
        antithetic=antithetic,
        prox_weight=PolynomialGrowth(10.0, 20.0, 1.0),
    )
    for _ in range(1000):
        svi.step(y)
    loc, sd = pyro.param("AutoNormal.locs.loc").item(), pyro.param("AutoNormal.scales.loc").item()
    assert abs(loc - post_mean) < 0.1 * post_sd
    assert sd == pytest.approx(post_sd, rel=0.1)


def test_averaged_context_swaps_in_the_running_mean_and_restores():
    def model(y):
        mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
        with pyro.plate("data", len(y), subsample_size=5):
            pyro.sample("y", dist.Normal(mu, 1.0), obs=y[:5])

    y = torch.randn(50) + 1.0
    guide = AutoNormal(model)
    svi = ScoreProximalSVI(model, guide, average_after=3)
    svi.step(y)
    with pytest.raises(ValueError, match="no averaged iterates yet"):
        with svi.averaged():
            pass
    history = []
    for _ in range(6):
        svi.step(y)
        history.append(guide._get_loc_and_scale("mu")[0].detach().clone())
    assert svi.num_averaged == 4  # steps 4..7 are averaged (identity tier)
    current = guide._get_loc_and_scale("mu")[0].detach().clone()
    with svi.averaged():
        averaged = pyro.get_param_store()["AutoNormal.locs.mu"].detach().clone()
    assert torch.allclose(averaged, torch.stack(history[-4:]).mean(0), atol=1e-6)
    assert torch.equal(pyro.get_param_store()["AutoNormal.locs.mu"].detach(), current)
    state = svi.state_dict()
    resumed = ScoreProximalSVI(model, guide, average_after=3)
    resumed.load_state_dict(state)
    with resumed.averaged():
        assert torch.allclose(pyro.get_param_store()["AutoNormal.locs.mu"], averaged)


def test_average_after_is_validated():
    def model():
        pyro.sample("x", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match="average_after >= 0"):
        ScoreProximalSVI(model, AutoNormal(model), average_after=-1)


# ---------------------------------------------------------------------------- user errors


@pytest.mark.parametrize(
    "data, distribution",
    [
        (torch.tensor([1.0, -1.0, 2.0]), lambda lam: dist.Poisson(lam)),
        (torch.tensor([0.5, float("nan"), 1.0]), lambda lam: dist.Normal(lam, 1.0)),
    ],
)
def test_observed_data_outside_the_support_raises_naming_the_site(data, distribution):
    # As Trace_ELBO (with validation on): bad data is the user's to fix, not a rejected step
    # that leaves the guide at its start with every step rejected.
    def poisson_model(y):
        lam = pyro.sample("lam", dist.Gamma(2.0, 1.0))
        with pyro.plate("d", y.shape[0]):
            pyro.sample("y", distribution(lam), obs=y)

    svi = ScoreProximalSVI(poisson_model, AutoNormal(poisson_model))
    with pytest.raises(ValueError, match="observed data of site 'y' lie outside the support"):
        svi.step(data)
    assert svi.num_rejected_steps == 0


@pytest.mark.parametrize("Guide", [AutoNormal, AutoMultivariateNormal])
def test_clearing_the_param_store_between_steps_continues_as_svi_does(Guide):
    # pyro.infer.SVI continues from the values an autoguide's PyroModule holds.
    y = _data()
    guide = Guide(model)
    svi = ScoreProximalSVI(model, guide)
    for _ in range(50):
        svi.step(y)
    before = _store_snapshot()
    pyro.clear_param_store()
    svi.step(y)
    after = _store_snapshot()
    assert after.keys() == before.keys()
    for name in before:  # one step on from the held values, not a fresh initialisation
        assert torch.allclose(after[name], before[name], atol=0.5), name
    fresh = _store_snapshot()
    pyro.clear_param_store()
    Guide(model)(y)  # what a fresh guide would hold
    assert any(not torch.allclose(fresh[k], _store_snapshot()[k]) for k in fresh)


def test_step_under_inference_mode_raises_a_clear_error():
    y = _data()
    svi = ScoreProximalSVI(model, AutoNormal(model))
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        svi.step(y)


def test_one_particle_warns_with_the_fix():
    with pytest.warns(
        UserWarning, match=r"from loss=Trace_ELBO\(\), one particle.*num_particles=2"
    ):
        ScoreProximalSVI(model, AutoNormal(model), loss=Trace_ELBO())
    with pytest.warns(UserWarning, match="num_particles=1: one draw"):
        ScoreProximalSVI(model, AutoNormal(model), num_particles=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        ScoreProximalSVI(model, AutoNormal(model))
        ScoreProximalSVI(model, AutoNormal(model), loss=Trace_ELBO(num_particles=2))
