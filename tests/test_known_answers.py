"""Fits against answers known in closed form.

Tolerance tiers (``/work/shared/STYLE.md``): identities 1e-6; Monte Carlo fits within a stated
multiple of the target's standard deviation; conjugate fits a few percent. Every figure quoted as
"measured" was obtained with the exact settings of the test, over the seeds named.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import (
    AutoDiagonalNormal,
    AutoLowRankMultivariateNormal,
    AutoMultivariateNormal,
    AutoNormal,
)
from pyro.infer.autoguide.initialization import init_to_feasible

from pyro_scorevi import PolynomialGrowth, ScoreProximalSVI


def _flat_diagonal(guide) -> tuple[torch.Tensor, torch.Tensor]:
    """(loc, scale) of a diagonal guide as flat vectors, in the unconstrained space."""
    store = pyro.get_param_store()
    name = guide._pyro_name
    if isinstance(guide, AutoDiagonalNormal):
        return store[f"{name}.loc"].detach(), store[f"{name}.scale"].detach()
    sites = [site for site, _ in guide.prototype_trace.iter_stochastic_nodes()]
    locs = [store[f"{name}.locs.{s}"].detach().reshape(-1) for s in sites]
    scales = [store[f"{name}.scales.{s}"].detach().reshape(-1) for s in sites]
    return torch.cat(locs), torch.cat(scales)


# ---------------------------------------------------------------------------- (a) dense Gaussian


def _dense_gaussian(d=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    precision = a @ a.T / d + 0.5 * torch.eye(d, dtype=torch.float64)  # correlations up to 0.41
    mean = torch.randn(d, generator=g, dtype=torch.float64)

    def model():
        pyro.sample("x", dist.MultivariateNormal(mean, precision_matrix=precision))

    return model, mean, precision


@pytest.mark.slow
def test_dense_gaussian_target_mean_field_fixed_point():
    # Exact scores of N(mu, Lambda^-1); the diagonal fixed point (= the mean-field ELBO optimum)
    # is m = mu, s_j^2 = 1 / Lambda_jj. Monte Carlo tier: the precision of a coordinate is
    # estimated from ~S*T products delta_j * g_j, whose relative sd is about
    # sqrt(sum_l rho_jl^2) / sqrt(S T) ~ 1.5% here, so 10% on the variances is ~6 sd (for the
    # worst of 10 coordinates); means within 0.1 sd of the target's conditional sd.
    # Measured (seeds 0-2): mean error <= 0.046 sd, variance error <= 4.1%. Antithetic pairs
    # halve the number of distinct delta_j * delta_l products, so antithetic=False fits the
    # variances better here (antithetic=True, same budget: variance errors up to 9%).
    # The defaults (lambda = 100 constant, S = 2) reach mean errors <= 0.003 sd but variance
    # errors of 7-15% after 1000 steps (their noise floor).
    model, mean, precision = _dense_gaussian()
    target_var = 1 / precision.diagonal()
    fits = []
    for Guide in (AutoNormal, AutoDiagonalNormal):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        guide = Guide(model, init_loc_fn=init_to_feasible)
        svi = ScoreProximalSVI(
            model,
            guide,
            num_particles=4,
            antithetic=False,
            prox_weight=PolynomialGrowth(10.0, 20.0, 1.0),
        )
        for _ in range(1000):
            svi.step()
        loc, scale = _flat_diagonal(guide)
        assert loc.dtype == torch.float64
        assert ((loc - mean) / target_var.sqrt()).abs().max() < 0.1
        assert (scale.square() / target_var - 1).abs().max() < 0.10
        fits.append((loc, scale))
    # Identity: AutoNormal (one block per site) and AutoDiagonalNormal (one flat block) are the
    # same algorithm; from the same initialisation and seed they agree.
    torch.testing.assert_close(fits[0][0], fits[1][0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fits[0][1], fits[1][1], rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_dense_gaussian_fixed_point_with_a_separate_scale_weight():
    # scale_prox_weight changes the path, not the fixed point: from a scale 10x too small
    # (the regime it is for), slow scales (lambda_s = 10 lambda) still reach m = mu,
    # s_j^2 = 1 / Lambda_jj; constant weights plus Polyak averaging of the last 1000 iterates.
    # Same Monte Carlo tier as above; measured (seeds 0-2): means <= 0.051 sd, variances <= 3.4%.
    model, mean, precision = _dense_gaussian()
    target_var = 1 / precision.diagonal()
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = AutoNormal(model, init_loc_fn=init_to_feasible, init_scale=0.05)
    svi = ScoreProximalSVI(
        model,
        guide,
        num_particles=4,
        antithetic=False,
        prox_weight=10.0,
        scale_prox_weight=100.0,
        average_after=500,
    )
    for _ in range(1500):
        svi.step()
    with svi.averaged():
        loc, scale = _flat_diagonal(guide)
    assert ((loc - mean) / target_var.sqrt()).abs().max() < 0.1
    assert (scale.square() / target_var - 1).abs().max() < 0.10


# ---------------------------------------------------------------------------- (b) Gamma-Poisson


def test_gamma_poisson_constrained_latent():
    # rate ~ Gamma(a0, b0), y_i ~ Poisson(rate): posterior Gamma(a0 + sum y, b0 + N). The guide
    # is log-normal in the rate; with sum y ~ 1500 the posterior is log-normal to O(1/a), and the
    # mean-field optimum log-normal has exactly the posterior mean. Conjugate tier: mean within
    # 1%, sd within 5%.
    a0, b0, n = 2.0, 1.0, 500
    y = torch.distributions.Poisson(3.0).sample((n,))
    a, b = a0 + y.sum().item(), b0 + n

    def model(y):
        rate = pyro.sample("rate", dist.Gamma(a0, b0))
        with pyro.plate("data", len(y)):
            pyro.sample("obs", dist.Poisson(rate), obs=y)

    guide = AutoNormal(model)
    svi = ScoreProximalSVI(model, guide, prox_weight=PolynomialGrowth(10.0, 20.0, 1.0))
    for _ in range(600):
        svi.step(y)
    m = pyro.param("AutoNormal.locs.rate").item()
    s = pyro.param("AutoNormal.scales.rate").item()
    fitted_mean = torch.tensor(m + s**2 / 2).exp().item()
    fitted_sd = fitted_mean * (torch.tensor(s**2).exp() - 1).sqrt().item()
    assert fitted_mean == pytest.approx(a / b, rel=0.01)
    assert fitted_sd == pytest.approx(a**0.5 / b, rel=0.05)
    # The fitted guide's draws are in the constrained space (positive rates).
    assert (guide.quantiles([0.01], y)["rate"] > 0).all()


# ---------------------------------------------------------------------------- (c) mini-batches

N_DATA, N_FEATURES, BATCH, NOISE = 2000, 3, 64, 1.0


def _linear_regression():
    """Bayesian linear regression, known noise, N(0, 1) priors, correlated features (pairwise
    correlations 0.6, 0.3, 0.5) with non-zero means (so the intercept is correlated too)."""
    g = torch.Generator().manual_seed(0)
    chol = torch.tensor([[1.0, 0.0, 0.0], [0.6, 0.8, 0.0], [0.3, 0.4, 0.866]])
    x = torch.randn(N_DATA, N_FEATURES, generator=g) @ chol.T + 0.5
    y = x @ torch.tensor([1.0, -2.0, 0.5]) + 0.7 + NOISE * torch.randn(N_DATA, generator=g)

    def model(x, y):
        w = pyro.sample("w", dist.Normal(torch.zeros(N_FEATURES), 1.0).to_event(1))
        b = pyro.sample("b", dist.Normal(0.0, 1.0))
        with pyro.plate("data", N_DATA, subsample_size=BATCH) as idx:
            pyro.sample("obs", dist.Normal(x[idx] @ w + b, NOISE), obs=y[idx])

    design = torch.cat([x, torch.ones(N_DATA, 1)], 1).double()
    precision = torch.eye(N_FEATURES + 1, dtype=torch.float64) + design.T @ design / NOISE**2
    post_mean = torch.linalg.solve(precision, design.T @ y.double() / NOISE**2)
    post_sd = torch.linalg.inv(precision).diagonal().sqrt()
    # The mean-field optimum of a correlated Gaussian posterior: m = exact mean,
    # s_j^2 = 1 / Lambda_jj (smaller than the marginal posterior variance, here by ~45%).
    mean_field_var = 1 / precision.diagonal()
    return model, x, y, post_mean, post_sd, mean_field_var


def _fit_linear_regression(num_steps, **kwargs):
    model, x, y, post_mean, post_sd, mean_field_var = _linear_regression()
    guide = AutoNormal(model)
    svi = ScoreProximalSVI(model, guide, **kwargs)
    for _ in range(num_steps):
        svi.step(x, y)
    if svi.average_after is None:
        loc, scale = _flat_diagonal(guide)  # sites in order w, b
    else:
        with svi.averaged():
            loc, scale = _flat_diagonal(guide)
    mean_error = ((loc.double() - post_mean) / post_sd).abs().max().item()
    var_error = (scale.double().square() / mean_field_var - 1).abs().max().item()
    return mean_error, var_error


@pytest.mark.slow
def test_minibatch_linear_regression():
    # N / B = 31: each mini-batch score carries noise of ~sqrt(N/B) = 5.6 posterior sds, so a
    # mean within 0.1 sd needs >~ (5.6 / 0.1)^2 = 3000 steps even with optimally averaged steps
    # (the library has no iterate averaging). Measured with
    # prox_weight=PolynomialGrowth(20, 100, 1), S = 2 antithetic (seeds 0-4):
    #   steps    max |m - mean| / post_sd    max |s^2 / (1/Lambda_jj) - 1|
    #   2500-3000   0.13 - 0.68                 0.06 - 0.08
    #   5000        0.08 - 0.48                 0.03 - 0.08
    #   10000       0.04 - 0.25                 0.03 - 0.08
    #   20000       0.06 - 0.15 (seeds 0, 1)    0.02 - 0.03
    # Faster growth does worse: PolynomialGrowth(20, 40, 1) is 1.2-5.9 sds away at 5000 steps,
    # PolynomialGrowth(20, 10, 1) 3-11 sds at 4000 steps (the steps shrink before the mean
    # arrives). The defaults (lambda = 100, S = 2 antithetic) sit at a noise floor of 0.54-0.79
    # sd with variance errors of 8-19% (1000-4000 steps); lambda = 100, S = 1, antithetic=False
    # is 0.73-0.78 sd away with variance errors of 61-63% after 4000 steps.
    # This test asserts the issue's variance target (25%) and a mean target of 0.75 sd: the
    # issue's 0.1 sd is NOT met in a fast test (see the slow test below).
    mean_error, var_error = _fit_linear_regression(
        4000, prox_weight=PolynomialGrowth(20.0, 100.0, 1.0)
    )
    assert var_error < 0.25
    assert mean_error < 0.75


@pytest.mark.slow  # 15-20 s; CI runs it with the slow tests
def test_minibatch_linear_regression_with_iterate_averaging():
    # Polyak-Ruppert averaging of the iterates after 500 steps, one alternation (no variance
    # shrinkage under subsampling, see docs/algorithm_sweeps.md), constant lambda = 100.
    # Measured (seeds 0-4): max mean error 0.08-0.22 sd at 4000 steps, 0.07-0.15 at 6000,
    # variance errors 2-4%. The averaged mean error falls like sqrt(N / (B T)): the bound
    # here is 0.25 sd; the issue's 0.1 sd is asserted in the slow test below.
    mean_error, var_error = _fit_linear_regression(6000, num_alternations=1, average_after=500)
    assert var_error < 0.25
    assert mean_error < 0.25


@pytest.mark.slow
def test_minibatch_linear_regression_issue_target():
    # The issue's targets (means within 0.1 posterior sd, variances within 25%) at N/B = 31:
    # averaging over ~20000 steps (~650 passes over the data) brings the worst coordinate's
    # Monte Carlo error to ~0.05 sd.
    mean_error, var_error = _fit_linear_regression(20000, num_alternations=1, average_after=1000)
    assert var_error < 0.25
    assert mean_error < 0.1


def _poisson_regression():
    """Poisson regression with large counts (log rates around 5) and a vague N(0, 10) prior: the
    posterior is near-Gaussian, sharply peaked (sds ~0.002) and far from the start at 0."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 4, generator=g)
    counts = torch.poisson((x @ torch.tensor([1.0, 0.5, -0.5, 0.2]) + 5).exp(), generator=g)

    def model(x, counts):
        b = pyro.sample("b", dist.Normal(0.0, 10.0).expand([4]).to_event(1))
        a = pyro.sample("a", dist.Normal(0.0, 10.0))
        with pyro.plate("data", len(counts), subsample_size=100) as idx:
            pyro.sample("c", dist.Poisson((x[idx] @ b + a).exp()), obs=counts[idx])

    # The mode by Newton's method in float64, and the precision there (the likelihood's Fisher
    # information plus the prior's): the Laplace approximation, exact to O(1/N) here.
    design = torch.cat([x, torch.ones(500, 1)], 1).double()
    beta = torch.zeros(5, dtype=torch.float64)
    beta[-1] = counts.double().mean().log()
    for _ in range(50):
        rate = (design @ beta).exp()
        grad = design.T @ (counts.double() - rate) - beta / 100
        precision = design.T @ (rate[:, None] * design) + torch.eye(5, dtype=torch.float64) / 100
        beta = beta + torch.linalg.solve(precision, grad)
    return model, (x, counts), beta, precision


@pytest.mark.slow
def test_poisson_regression_far_from_the_mode_with_one_alternation():
    # docs/pitfalls.md, "Far from the mode": with the defaults (init_scale 0.1, two alternations)
    # the first step overshoots to log rates ~ 30 and every later step is rejected (measured);
    # a narrower start with one alternation walks to the mode (0.2 sd by step 2000, from ~400
    # sd at step 500). Laplace tier: averaged means within 0.5 posterior sds of the mode,
    # variances within 25% of the mean-field 1 / Lambda_jj. Measured (seeds 0-2): means
    # 0.05-0.19 sd, variances 2-13%; the defaults rejected 299 of 300 steps on every seed.
    model, args, mode, precision = _poisson_regression()
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = AutoNormal(model, init_scale=0.01)
    svi = ScoreProximalSVI(model, guide, num_alternations=1, average_after=2000)
    for _ in range(3000):
        svi.step(*args)
    assert svi.num_rejected_steps == 0
    with svi.averaged():
        loc, scale = _flat_diagonal(guide)  # sites in order b, a
    sd = torch.linalg.inv(precision).diagonal().sqrt()
    mean_error = ((loc.double() - mode) / sd).abs().max().item()
    var_error = (scale.double().square() * precision.diagonal() - 1).abs().max().item()
    assert mean_error < 0.5
    assert var_error < 0.25


# ---------------------------------------------------------------------------- (d) vs Trace_ELBO


@pytest.mark.slow
def test_agrees_with_trace_elbo_on_logistic_regression():
    # Same model, same AutoNormal family: both fit the mean-field ELBO optimum. Monte Carlo tier:
    # means within 0.25 of the fitted posterior sd. Measured (seeds 0, 1) with 2000 Adam steps
    # of 4 particles: differences 0.08-0.14 sd, mostly Trace_ELBO's iterate noise (its
    # run-to-run spread is ~0.05 sd, ours ~0.01 sd); fitted sds agree within 3%.
    g = torch.Generator().manual_seed(0)
    n, d = 200, 3
    x = torch.randn(n, d, generator=g)
    logits = x @ torch.tensor([1.0, -1.0, 0.5]) + 0.3
    y = torch.distributions.Bernoulli(logits=logits).sample()

    def model(x, y):
        w = pyro.sample("w", dist.Normal(torch.zeros(d), 1.0).to_event(1))
        b = pyro.sample("b", dist.Normal(0.0, 1.0))
        with pyro.plate("data", len(y)):
            # (x * w).sum(-1) rather than x @ w: works with vectorised particles too
            pyro.sample("obs", dist.Bernoulli(logits=(x * w).sum(-1) + b), obs=y)

    guide = AutoNormal(model)
    num_steps = 1500
    svi = SVI(
        model,
        guide,
        pyro.optim.ClippedAdam({"lr": 0.03, "lrd": 0.05 ** (1 / num_steps)}),
        Trace_ELBO(num_particles=8, vectorize_particles=True, max_plate_nesting=1),
    )
    for _ in range(num_steps):
        svi.step(x, y)
    elbo_loc, elbo_scale = _flat_diagonal(guide)

    pyro.clear_param_store()
    guide = AutoNormal(model)
    svi = ScoreProximalSVI(model, guide, num_particles=4, prox_weight=PolynomialGrowth(10.0, 20.0))
    for _ in range(800):
        svi.step(x, y)
    loc, scale = _flat_diagonal(guide)
    assert ((loc - elbo_loc) / scale).abs().max() < 0.25
    assert (elbo_scale / scale - 1).abs().max() < 0.1


# ---------------------------------------------------------------------------- (e) inner steps


def _correlated_gaussian():
    mean = torch.tensor([1.0, -1.0, 0.5])
    cov = torch.tensor([[1.0, 0.8, 0.3], [0.8, 1.0, 0.5], [0.3, 0.5, 0.5]])

    def model():
        pyro.sample("x", dist.MultivariateNormal(mean, covariance_matrix=cov))

    return model, mean, cov


@pytest.mark.slow
@pytest.mark.parametrize("Guide", [AutoMultivariateNormal, AutoLowRankMultivariateNormal])
def test_inner_step_families_fit_a_correlated_gaussian(Guide):
    # Full- and low-rank guides are fitted by K = 5 inner Adam steps per iteration (no closed
    # form), here with the defaults. With exact Gaussian scores and a family containing the
    # target, the score residual vanishes at q = target for every particle, so the fixed point is
    # the target itself, free of Monte Carlo noise (the rank-2 + diagonal family of
    # AutoLowRankMultivariateNormal contains every 3 x 3 covariance). Measured (seed 0):
    #   AutoMultivariateNormal:        200 steps mean 0.003 sd, covariance 20%; 400 steps 0.000,
    #                                  0.2%; 1000 steps 0.000, 0.0%.
    #   AutoLowRankMultivariateNormal: 200 steps 0.005 sd, 15%; 400 steps 0.000, 1.6%;
    #                                  1000 steps 0.000, 0.0%.
    # With a growing weight (PolynomialGrowth(10, 20, 1), S = 4, inner lr 0.05) the covariance is
    # 0.6% off at 200 steps but stalls at ~1% by 1000 steps. Tolerances: mean 0.05 sd, relative
    # Frobenius covariance error 5%.
    model, mean, cov = _correlated_gaussian()
    guide = Guide(model)
    svi = ScoreProximalSVI(model, guide)
    for _ in range(400):
        svi.step()
    posterior = guide.get_posterior()
    mean_error = ((posterior.loc.detach() - mean) / cov.diagonal().sqrt()).abs().max().item()
    fitted_cov = posterior.covariance_matrix.detach()
    cov_error = (torch.linalg.norm(fitted_cov - cov) / torch.linalg.norm(cov)).item()
    assert mean_error < 0.05, f"mean error {mean_error:.3f} sd"
    assert cov_error < 0.05, f"covariance error {cov_error:.3f}"
