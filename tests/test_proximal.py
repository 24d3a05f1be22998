"""The closed-form diagonal proximal step (``pyro_scorevi.proximal``) from first principles.

Tolerance tiers (``/work/shared/STYLE.md``): identities 1e-6 (float64), hand-derived 1e-4.
The per-coordinate objective is written out here from the particles themselves, independently of
the library's sufficient statistics:

.. math::

    L(m, p) = w\\,\\frac1S\\sum_k \\big(p(\\theta_k - m) + \\hat g_k\\big)^2
        + \\lambda\\,\\mathrm{KL}\\big(\\mathcal N(m_t, w)\\,\\Vert\\,\\mathcal N(m, 1/p)\\big),
    \\qquad w = s_t^2,

since :math:`\\nabla\\log q(\\theta) = -p(\\theta - m)`.
"""

from __future__ import annotations

import math

import pytest
import torch

from pyro_scorevi.proximal import (
    ScoreStatistics,
    diagonal_proximal_update,
    score_statistics,
    solve_mean,
    solve_precision,
)

IDENTITY_TOL = 1e-6  # identities, float64
HAND_DERIVED_TOL = 1e-4  # against hand derivations / brute-force numerical minimisation


def _objective(m, p, loc, scale, thetas, scores, lam, lam_s=None):
    """L(m, p) per coordinate, from the particles (no sufficient statistics); ``lam_s``
    weights the scale part of the KL separately."""
    lam_s = lam if lam_s is None else lam_s
    w = scale.square()
    fisher = (w * (p * (thetas - m) + scores).square()).mean(0)
    kl_mean = 0.5 * p * (loc - m).square()
    kl_scale = 0.5 * (-torch.log(p * w) + p * w - 1)
    return fisher + lam * kl_mean + lam_s * kl_scale


def _particles(d, num_particles, seed, dtype=torch.float64):
    """Particles from q_t = N(loc, scale^2) and noisy scores of a Gaussian target."""
    g = torch.Generator().manual_seed(seed)
    loc = torch.randn(d, generator=g, dtype=dtype)
    scale = torch.rand(d, generator=g, dtype=dtype) + 0.3
    target_mean = torch.randn(d, generator=g, dtype=dtype)
    target_prec = torch.rand(d, generator=g, dtype=dtype) * 3 + 0.2
    offsets = scale * torch.randn(num_particles, d, generator=g, dtype=dtype)
    thetas = loc + offsets
    noise = torch.randn(num_particles, d, generator=g, dtype=dtype)
    scores = -target_prec * (thetas - target_mean) + noise
    return loc, scale, offsets, thetas, scores


def test_score_statistics_are_the_particle_averages():
    loc, scale, offsets, thetas, scores = _particles(5, 7, seed=0)
    stats = score_statistics(offsets, scores)
    expected = (
        offsets.sum(0) / 7,
        (offsets * offsets).sum(0) / 7,
        (offsets * scores).sum(0) / 7,
        scores.sum(0) / 7,
    )
    for got, want in zip(stats, expected):
        torch.testing.assert_close(got, want, rtol=IDENTITY_TOL, atol=IDENTITY_TOL)


@pytest.mark.parametrize("lam", [1e-2, 1.0, 100.0, 1e4])
@pytest.mark.parametrize("num_particles", [1, 2, 16])
def test_precision_root_satisfies_its_quadratic(lam, num_particles):
    loc, scale, offsets, thetas, scores = _particles(200, num_particles, seed=1)
    stats = score_statistics(offsets, scores)
    shift = 0.3 * torch.randn(200, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    p = solve_precision(scale, shift, stats, lam)

    # The quadratic in the library's notation, re-derived from the particles about m = m_t + shift.
    w = scale.square()
    a = (offsets - shift).square().mean(0)
    c = ((offsets - shift) * scores).mean(0)
    b = 2 * w * c + 0.5 * lam * (w + shift.square())
    residual = 2 * w * a * p.square() + b * p - 0.5 * lam
    magnitude = (2 * w * a * p.square()).abs() + (b * p).abs() + 0.5 * lam
    assert (p > 0).all() and torch.isfinite(p).all()
    assert (residual.abs() / magnitude).max() < IDENTITY_TOL
    # It is also the stationary point of L(m, .) for fixed m: dL/dp = 0.
    p_leaf = p.clone().requires_grad_()
    (grad,) = torch.autograd.grad(
        _objective(loc + shift, p_leaf, loc, scale, thetas, scores, lam).sum(), p_leaf
    )
    assert (grad.abs() * p / magnitude).max() < IDENTITY_TOL


def test_both_branches_of_the_stable_root_are_exercised():
    # A test of the two branches is only meaningful if both signs of b occur.
    loc, scale, offsets, thetas, scores = _particles(500, 1, seed=3)
    stats = score_statistics(offsets, scores)
    w = scale.square()
    b = 2 * w * stats.mean_offset_score + 0.5 * 1.0 * w
    assert (b > 0).any() and (b <= 0).any()
    p = solve_precision(scale, torch.zeros_like(scale), stats, 1.0)
    assert (p > 0).all() and torch.isfinite(p).all()


def test_mean_solves_dl_dm_for_fixed_precision():
    loc, scale, offsets, thetas, scores = _particles(50, 3, seed=4)
    stats = score_statistics(offsets, scores)
    p = torch.rand(50, dtype=torch.float64) + 0.5
    m = solve_mean(loc, scale, p, stats, 10.0)
    m_leaf = m.clone().requires_grad_()
    (grad,) = torch.autograd.grad(
        _objective(m_leaf, p, loc, scale, thetas, scores, 10.0).sum(), m_leaf
    )
    assert grad.abs().max() < IDENTITY_TOL


def _brute_force_minimiser(loc, scale, thetas, scores, lam, lam_s=None):
    """Joint minimiser of L over (m, log p) by float64 L-BFGS, all coordinates at once (the
    objective is a sum of independent per-coordinate terms)."""
    m = loc.clone().requires_grad_()
    log_p = (-2 * scale.log()).requires_grad_()
    opt = torch.optim.LBFGS(
        [m, log_p],
        lr=1,
        max_iter=500,
        tolerance_grad=1e-14,
        tolerance_change=1e-16,
        line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        loss = _objective(m, log_p.exp(), loc, scale, thetas, scores, lam, lam_s).sum()
        loss.backward()
        return loss

    for _ in range(5):
        opt.step(closure)
    return m.detach(), log_p.detach().exp()


@pytest.mark.parametrize("lam", [1.0, 100.0])
@pytest.mark.parametrize("num_particles", [1, 4])
def test_alternation_reaches_the_joint_minimiser(lam, num_particles):
    loc, scale, offsets, thetas, scores = _particles(20, num_particles, seed=5)
    stats = score_statistics(offsets, scores)
    m_star, p_star = _brute_force_minimiser(loc, scale, thetas, scores, lam)
    new_loc, new_scale = diagonal_proximal_update(loc, scale, stats, lam, num_alternations=100)
    # Numerical minimisation against closed form: hand-derived tier, relative to the scale.
    assert ((new_loc - m_star) / scale).abs().max() < HAND_DERIVED_TOL
    assert (new_scale.pow(-2) / p_star - 1).abs().max() < HAND_DERIVED_TOL
    # The closed form is at least as low as the brute-force minimum.
    l_alt = _objective(new_loc, new_scale.pow(-2), loc, scale, thetas, scores, lam)
    l_star = _objective(m_star, p_star, loc, scale, thetas, scores, lam)
    assert (l_alt - l_star).max() < HAND_DERIVED_TOL * l_star.abs().max()


@pytest.mark.parametrize(("lam", "lam_s"), [(3.0, 1e4), (100.0, 1.0), (10.0, 10.0)])
def test_split_weights_reach_the_joint_minimiser_of_the_split_objective(lam, lam_s):
    loc, scale, offsets, thetas, scores = _particles(20, 2, seed=11)
    stats = score_statistics(offsets, scores)
    m_star, p_star = _brute_force_minimiser(loc, scale, thetas, scores, lam, lam_s)
    new_loc, new_scale = diagonal_proximal_update(
        loc, scale, stats, lam, num_alternations=100, scale_prox_weight=lam_s
    )
    assert ((new_loc - m_star) / scale).abs().max() < HAND_DERIVED_TOL
    assert (new_scale.pow(-2) / p_star - 1).abs().max() < HAND_DERIVED_TOL


def test_scale_prox_weight_none_or_equal_is_the_paper_step():
    loc, scale, offsets, _, scores = _particles(30, 2, seed=12)
    stats = score_statistics(offsets, scores)
    base = diagonal_proximal_update(loc, scale, stats, 50.0)
    same = diagonal_proximal_update(loc, scale, stats, 50.0, scale_prox_weight=50.0)
    for a, b in zip(base, same):
        assert torch.equal(a, b)


def test_large_scale_prox_weight_holds_the_scale_and_moves_the_mean():
    # lambda_s -> inf freezes s at s_t while the mean still takes its lambda-sized step.
    loc, scale, offsets, _, scores = _particles(30, 2, seed=13)
    stats = score_statistics(offsets, scores)
    m_paper, s_paper = diagonal_proximal_update(loc, scale, stats, 5.0)
    m_split, s_split = diagonal_proximal_update(loc, scale, stats, 5.0, scale_prox_weight=1e9)
    assert (s_split / scale - 1).abs().max() < 1e-6
    assert (s_paper / scale - 1).abs().max() > 1e-2
    assert ((m_split - loc) / scale).abs().max() > 1e-2


def test_each_alternation_lowers_the_objective():
    # Block-coordinate descent: every (precision, mean) pass is an exact minimisation in its
    # block, so L never increases.
    loc, scale, offsets, thetas, scores = _particles(100, 2, seed=6)
    stats = score_statistics(offsets, scores)
    previous = _objective(loc, scale.pow(-2), loc, scale, thetas, scores, 5.0)
    for n in range(1, 6):
        m, s = diagonal_proximal_update(loc, scale, stats, 5.0, num_alternations=n)
        current = _objective(m, s.pow(-2), loc, scale, thetas, scores, 5.0)
        assert (current <= previous + IDENTITY_TOL * previous.abs()).all()
        previous = current


def test_two_alternations_are_far_below_the_monte_carlo_noise():
    # The default (defaults.NUM_ALTERNATIONS = 2, lambda = 100, S = 2) is documented as reaching
    # the joint minimiser "far below the Monte Carlo noise": compare the distance from the
    # converged alternation with the spread of the converged update over fresh particle sets.
    d, reps, lam = 50, 200, 100.0
    g = torch.Generator().manual_seed(7)
    loc = torch.randn(d, dtype=torch.float64, generator=g)
    scale = torch.rand(d, dtype=torch.float64, generator=g) + 0.3
    prec = torch.rand(d, dtype=torch.float64, generator=g) * 3 + 0.2
    eps = torch.randn(reps, 1, d, dtype=torch.float64, generator=g)
    offsets = scale * torch.cat([eps, -eps], dim=1)  # antithetic pairs, as the default
    scores = -prec * (loc + offsets)  # target N(0, 1/prec), exact scores
    stats = ScoreStatistics(*(x.mean(1) for x in (offsets, offsets**2, offsets * scores, scores)))
    m2, s2 = diagonal_proximal_update(loc, scale, stats, lam, num_alternations=2)
    m_inf, s_inf = diagonal_proximal_update(loc, scale, stats, lam, num_alternations=100)
    mc_sd_m = m_inf.std(0)
    mc_sd_s = s_inf.std(0)
    assert ((m2 - m_inf).abs().max(0).values / mc_sd_m).max() < 0.1
    assert ((s2 - s_inf).abs().max(0).values / mc_sd_s).max() < 0.1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scale_value", [1e-3, 1.0, 1e3])
@pytest.mark.parametrize("score_value", [1e-6, 1.0, 1e6])
@pytest.mark.parametrize("lam", [1e-3, 100.0, 1e6])
def test_stable_root_is_positive_and_finite_for_one_particle(dtype, scale_value, score_value, lam):
    # S = 1 and extreme magnitudes: the naive root (-b + sqrt(b^2 + 4wA lam)) / (4wA) cancels
    # catastrophically to p = 0 (s = inf) when b >> 4wA lam.
    g = torch.Generator().manual_seed(8)
    d = 64
    scale = torch.full((d,), scale_value, dtype=dtype)
    loc = torch.randn(d, generator=g, dtype=dtype)
    offsets = scale * torch.randn(1, d, generator=g, dtype=dtype)
    scores = score_value * torch.randn(1, d, generator=g, dtype=dtype)
    stats = score_statistics(offsets, scores)
    p = solve_precision(scale, torch.zeros_like(scale), stats, lam)
    assert torch.isfinite(p).all() and (p > 0).all()
    new_loc, new_scale = diagonal_proximal_update(loc, scale, stats, lam)
    assert torch.isfinite(new_loc).all()
    assert torch.isfinite(new_scale).all() and (new_scale > 0).all()
    assert new_loc.dtype == dtype and new_scale.dtype == dtype


def test_naive_root_would_fail_where_the_stable_root_does_not():
    # Shows that the test above can fail: the textbook formula returns p = 0 on the same inputs.
    scale = torch.full((4,), 1e3, dtype=torch.float32)
    offsets = torch.tensor([[1e3, -1e3, 2e3, -5e2]])
    scores = torch.tensor([[1e6, -1e6, 1e6, -1e6]])
    stats = score_statistics(offsets, scores)
    lam = 1e-3
    w = scale.square()
    a, c = stats.mean_sq_offset, stats.mean_offset_score
    b = 2 * w * c + 0.5 * lam * w
    naive = (-b + torch.sqrt(b.square() + 4 * w * a * lam)) / (4 * w * a)
    assert (naive == 0).any()
    p = solve_precision(scale, torch.zeros_like(scale), stats, lam)
    assert (p > 0).all() and torch.isfinite(p).all()


def test_one_particle_second_alternation_stays_finite_when_the_mean_step_matches_the_offset():
    # Found on a ViT at S = 1 (float32): the first mean step d reproduces the particle's offset
    # delta almost exactly, so A = (delta - d)^2 is tiny and its expanded form
    # delta^2 - 2 d delta + d^2 rounds below zero; sqrt(A) was NaN and the step was rejected.
    scale = torch.tensor([0.048534609377384186])
    offsets = torch.tensor([[-0.004070227965712547]])
    scores = torch.tensor([[-86.3935546875]])
    stats = score_statistics(offsets, scores)
    loc = torch.zeros(1)
    new_loc, new_scale = diagonal_proximal_update(loc, scale, stats, 100.0, num_alternations=2)
    assert torch.isfinite(new_loc).all() and torch.isfinite(new_scale).all()
    assert (new_scale > 0).all()
    # The same inputs in float64 give the same step (the float32 answer is not a fluke).
    ref_loc, ref_scale = diagonal_proximal_update(
        loc.double(), scale.double(), ScoreStatistics(*(t.double() for t in stats)), 100.0
    )
    assert torch.allclose(new_loc.double(), ref_loc, rtol=1e-4, atol=1e-7)
    assert torch.allclose(new_scale.double(), ref_scale, rtol=1e-4)
    # and the expanded form does go negative on some mean step near the offset
    shifts = offsets[0] + torch.linspace(-1e-6, 1e-6, 201)
    expanded = stats.mean_sq_offset - 2 * shifts * stats.mean_offset + shifts.square()
    assert (expanded < 0).any()


def _exact_gaussian_stats(m, s, mu, prec):
    """E_q of the four statistics for q = N(m, diag s^2), target N(mu, prec^-1), exact scores:
    E[delta] = 0, E[delta^2] = s^2, E[delta_j g_j] = -prec_jj s_j^2, E[g] = -prec (m - mu)."""
    return ScoreStatistics(
        torch.zeros_like(m),
        s.square(),
        -prec.diagonal() * s.square(),
        -(prec @ (m - mu)),
    )


def _dense_precision(d, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    prec = a @ a.T / d + 0.5 * torch.eye(d, dtype=torch.float64)
    mu = torch.randn(d, generator=g, dtype=torch.float64)
    return mu, prec


@pytest.mark.parametrize("lam", [1e-2, 1.0, 100.0, 1e4])
def test_exact_gaussian_scores_fixed_point(lam):
    mu, prec = _dense_precision(10, seed=9)
    m_star, s_star = mu, prec.diagonal().rsqrt()
    stats = _exact_gaussian_stats(m_star, s_star, mu, prec)
    new_m, new_s = diagonal_proximal_update(m_star, s_star, stats, lam)
    torch.testing.assert_close(new_m, m_star, rtol=0, atol=IDENTITY_TOL)
    torch.testing.assert_close(new_s, s_star, rtol=IDENTITY_TOL, atol=0)


def test_exact_gaussian_scores_iterates_converge_to_the_fixed_point():
    # The fixed point is attracting: iterate the expected update from a wrong start.
    mu, prec = _dense_precision(10, seed=10)
    m, s = torch.zeros(10, dtype=torch.float64), torch.ones(10, dtype=torch.float64)
    for _ in range(500):
        m, s = diagonal_proximal_update(m, s, _exact_gaussian_stats(m, s, mu, prec), 10.0)
    torch.testing.assert_close(m, mu, rtol=0, atol=IDENTITY_TOL)
    torch.testing.assert_close(s, prec.diagonal().rsqrt(), rtol=IDENTITY_TOL, atol=0)


def test_exact_diagonal_target_is_reached_in_one_step_as_lambda_vanishes():
    # Hand-derived: with lambda -> 0 and exact stats for a diagonal target, p = -C/A = prec_jj and
    # m = theta_bar + g_bar / p = mu (a Newton step).
    mu = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    prec = torch.diag(torch.tensor([0.5, 2.0, 9.0], dtype=torch.float64))
    m, s = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    new_m, new_s = diagonal_proximal_update(m, s, _exact_gaussian_stats(m, s, mu, prec), 1e-9)
    torch.testing.assert_close(new_m, mu, rtol=0, atol=HAND_DERIVED_TOL)
    torch.testing.assert_close(new_s, prec.diagonal().rsqrt(), rtol=HAND_DERIVED_TOL, atol=0)


def test_large_lambda_keeps_q_t():
    # lambda -> inf: the KL term dominates and the step stays at q_t (hand-derived limit).
    loc, scale, offsets, thetas, scores = _particles(30, 2, seed=11)
    new_m, new_s = diagonal_proximal_update(loc, scale, score_statistics(offsets, scores), 1e12)
    torch.testing.assert_close(new_m, loc, rtol=0, atol=HAND_DERIVED_TOL)
    torch.testing.assert_close(new_s, scale, rtol=HAND_DERIVED_TOL, atol=0)


def test_mean_step_is_variance_preconditioned():
    # For large lambda the mean moves by ~ (2/lambda) s^2 (p_t * mean(delta) + g_bar)
    # (first order in 1/lambda, see ALGORITHM.md); check the first-order term by a finite ratio.
    loc, scale, offsets, thetas, scores = _particles(30, 4, seed=12)
    stats = score_statistics(offsets, scores)
    lam = 1e6
    new_m, _ = diagonal_proximal_update(loc, scale, stats, lam)
    expected = (2 / lam) * scale.square() * (stats.mean_offset / scale.square() + stats.mean_score)
    torch.testing.assert_close(new_m - loc, expected, rtol=1e-3, atol=0)


def test_works_elementwise_on_any_shape():
    loc, scale, offsets, thetas, scores = _particles(24, 3, seed=13)
    stats = score_statistics(offsets, scores)
    flat_m, flat_s = diagonal_proximal_update(loc, scale, stats, 7.0)
    shaped = ScoreStatistics(*(x.reshape(2, 3, 4) for x in stats))
    m, s = diagonal_proximal_update(loc.reshape(2, 3, 4), scale.reshape(2, 3, 4), shaped, 7.0)
    assert m.shape == s.shape == (2, 3, 4)
    torch.testing.assert_close(m.reshape(-1), flat_m, rtol=IDENTITY_TOL, atol=0)
    torch.testing.assert_close(s.reshape(-1), flat_s, rtol=IDENTITY_TOL, atol=0)


def test_inputs_are_not_mutated():
    loc, scale, offsets, thetas, scores = _particles(16, 2, seed=14)
    stats = score_statistics(offsets, scores)
    shift = torch.full_like(loc, 0.1)
    precision = torch.ones_like(loc)
    before = [x.clone() for x in (loc, scale, shift, precision, offsets, scores, *stats)]
    score_statistics(offsets, scores)
    solve_precision(scale, shift, stats, 3.0)
    solve_mean(loc, scale, precision, stats, 3.0)
    new_m, new_s = diagonal_proximal_update(loc, scale, stats, 3.0, num_alternations=3)
    after = (loc, scale, shift, precision, offsets, scores, *stats)
    for b, a in zip(before, after):
        assert torch.equal(a, b)
    assert new_m.data_ptr() != loc.data_ptr() and new_s.data_ptr() != scale.data_ptr()


def test_kl_term_matches_torch():
    # Guards the objective used above: the KL written out equals torch's.
    loc, scale = torch.tensor([0.3], dtype=torch.float64), torch.tensor([0.7], dtype=torch.float64)
    m, p = torch.tensor([-0.2], dtype=torch.float64), torch.tensor([2.5], dtype=torch.float64)
    ours = 0.5 * (-torch.log(p * scale**2) + p * (scale**2 + (loc - m) ** 2) - 1)
    ref = torch.distributions.kl_divergence(
        torch.distributions.Normal(loc, scale), torch.distributions.Normal(m, p.rsqrt())
    )
    torch.testing.assert_close(ours, ref, rtol=IDENTITY_TOL, atol=0)
    assert math.isfinite(ours.item())
