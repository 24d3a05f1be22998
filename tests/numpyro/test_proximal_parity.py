"""Torch vs JAX parity of the functional core, and a registry of hard inputs.

Tolerance tiers: parity 1e-5 (torch vs JAX on identical float64 inputs); float32 results against
the float64 reference 1e-4 (a few float32 roundings of each step). The registry's cases run on
JAX alone (the Python 3.12 leg has no torch) and against torch where it is installed.
"""

import numpy as np
import pytest

pytest.importorskip("jax")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from pyro_scorevi.numpyro import proximal as jax_prox  # noqa: E402

try:
    import torch

    from pyro_scorevi import proximal as torch_prox
except ImportError:  # the torch-free leg
    torch = torch_prox = None

needs_torch = pytest.mark.skipif(torch is None, reason="torch is not installed")

PARITY = 1e-5  # torch vs JAX on identical float64 inputs
FLOAT32 = 1e-4  # a float32 result against its float64 reference


def _inputs(seed, num_particles=4, shape=(7, 3)):
    rng = np.random.default_rng(seed)
    loc = rng.normal(size=shape)
    scale = np.exp(rng.normal(size=shape) - 0.5)
    offsets = scale * rng.normal(size=(num_particles,) + shape)
    # Scores of a Gaussian target plus noise: both signs of b occur across coordinates.
    scores = -offsets / rng.uniform(0.1, 3.0, size=shape) + rng.normal(size=offsets.shape)
    return loc, scale, offsets, scores


def _both(fn_name, *arrays, **kwargs):
    with jax.enable_x64(True):
        out_j = getattr(jax_prox, fn_name)(*[jnp.asarray(a) for a in arrays], **kwargs)
        out_j = [np.asarray(x) for x in (out_j if isinstance(out_j, tuple) else (out_j,))]
    out_t = getattr(torch_prox, fn_name)(*[torch.as_tensor(a) for a in arrays], **kwargs)
    out_t = [x.numpy() for x in (out_t if isinstance(out_t, tuple) else (out_t,))]
    return out_j, out_t


@needs_torch
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_score_statistics_parity(seed):
    _, _, offsets, scores = _inputs(seed)
    out_j, out_t = _both("score_statistics", offsets, scores)
    assert len(out_j) == len(out_t) == 4
    for a, b in zip(out_j, out_t):
        assert a.dtype == np.float64
        np.testing.assert_allclose(a, b, rtol=PARITY, atol=PARITY)


@needs_torch
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("prox_weight", [0.5, 100.0])
@pytest.mark.parametrize("num_alternations", [1, 2, 3])
@pytest.mark.parametrize("scale_prox_weight", [None, 1e4])
def test_diagonal_proximal_update_parity(seed, prox_weight, num_alternations, scale_prox_weight):
    loc, scale, offsets, scores = _inputs(seed)
    with jax.enable_x64(True):
        stats_j = jax_prox.score_statistics(jnp.asarray(offsets), jnp.asarray(scores))
        new_j = jax_prox.diagonal_proximal_update(
            jnp.asarray(loc),
            jnp.asarray(scale),
            stats_j,
            prox_weight,
            num_alternations,
            scale_prox_weight,
        )
        new_j = [np.asarray(x) for x in new_j]
    stats_t = torch_prox.score_statistics(torch.as_tensor(offsets), torch.as_tensor(scores))
    new_t = torch_prox.diagonal_proximal_update(
        torch.as_tensor(loc),
        torch.as_tensor(scale),
        stats_t,
        prox_weight,
        num_alternations,
        scale_prox_weight,
    )
    for a, b in zip(new_j, new_t):
        assert np.all(np.isfinite(a))
        np.testing.assert_allclose(a, b.numpy(), rtol=PARITY, atol=PARITY)


@needs_torch
def test_solve_precision_and_mean_parity_both_branches():
    loc, scale, offsets, scores = _inputs(3)
    shift = 0.3 * np.random.default_rng(4).normal(size=loc.shape)
    with jax.enable_x64(True):
        stats_j = jax_prox.score_statistics(jnp.asarray(offsets), jnp.asarray(scores))
        p_j = jax_prox.solve_precision(jnp.asarray(scale), jnp.asarray(shift), stats_j, 2.0)
        m_j = jax_prox.solve_mean(jnp.asarray(loc), jnp.asarray(scale), p_j, stats_j, 2.0)
        c_cross = np.asarray(stats_j.mean_offset_score) - shift * np.asarray(stats_j.mean_score)
        b = 2 * scale**2 * c_cross
        b = b + 0.5 * 2.0 * (scale**2 + shift**2)
    # The inputs must exercise both roots of the quadratic, or the test proves less.
    assert (b > 0).any() and (b <= 0).any()
    stats_t = torch_prox.score_statistics(torch.as_tensor(offsets), torch.as_tensor(scores))
    p_t = torch_prox.solve_precision(torch.as_tensor(scale), torch.as_tensor(shift), stats_t, 2.0)
    m_t = torch_prox.solve_mean(torch.as_tensor(loc), torch.as_tensor(scale), p_t, stats_t, 2.0)
    np.testing.assert_allclose(np.asarray(p_j), p_t.numpy(), rtol=PARITY, atol=PARITY)
    np.testing.assert_allclose(np.asarray(m_j), m_t.numpy(), rtol=PARITY, atol=PARITY)
    assert (np.asarray(p_j) > 0).all()


def test_x64_does_not_leak():
    assert jnp.zeros(()).dtype == jnp.float32


@needs_torch
def test_one_particle_float32_step_matches_torch_and_stays_finite():
    # The S = 1 case where the expanded A = mean(delta^2) - 2 d mean(delta) + d^2 rounds below
    # zero in float32 (tests/test_proximal.py has the torch side): JAX must not return NaN.
    scale = np.array([0.048534609377384186], dtype=np.float32)
    offsets = np.array([[-0.004070227965712547]], dtype=np.float32)
    scores = np.array([[-86.3935546875]], dtype=np.float32)
    loc = np.zeros(1, dtype=np.float32)
    stats_j = jax_prox.score_statistics(jnp.asarray(offsets), jnp.asarray(scores))
    new_loc, new_scale = jax_prox.diagonal_proximal_update(
        jnp.asarray(loc), jnp.asarray(scale), stats_j, 100.0
    )
    assert np.isfinite(np.asarray(new_loc)).all() and np.isfinite(np.asarray(new_scale)).all()
    stats_t = torch_prox.score_statistics(torch.as_tensor(offsets), torch.as_tensor(scores))
    ref_loc, ref_scale = torch_prox.diagonal_proximal_update(
        torch.as_tensor(loc), torch.as_tensor(scale), stats_t, 100.0
    )
    np.testing.assert_allclose(np.asarray(new_loc), ref_loc.numpy(), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(np.asarray(new_scale), ref_scale.numpy(), rtol=1e-4)


# ---------------------------------------------------------------------- hard-input registry


def _case(offsets, scores, scale, loc=None, *, dtype=np.float64, prox_weight=100.0, **kw):
    offsets = np.asarray(offsets, dtype)
    scale = np.asarray(scale, dtype)
    loc = np.zeros_like(scale) if loc is None else np.asarray(loc, dtype)
    return dict(
        loc=loc,
        scale=scale,
        offsets=offsets,
        scores=np.asarray(scores, dtype),
        prox_weight=prox_weight,
        num_alternations=kw.pop("num_alternations", 2),
        scale_prox_weight=kw.pop("scale_prox_weight", None),
        **kw,
    )


def _random_case(seed, num_particles, **kw):
    loc, scale, offsets, scores = _inputs(seed, num_particles=num_particles)
    return _case(offsets, scores, scale, loc, **kw)


#: Inputs where a naive closed form fails, each with the branch(es) of the root it takes
#: (b > 0: p = lambda / (b + disc); b <= 0: p = (disc - b) / (4 w A)).
HARD_INPUTS = {
    # S = 1, float32: the expanded A = mean(delta^2) - 2 d mean(delta) + d^2 rounds below
    # zero once the mean step reproduces the particle's offset (tests/test_proximal.py).
    "one-particle-A-rounds-negative": _case(
        [[-0.004070227965712547]],
        [[-86.3935546875]],
        [0.048534609377384186],
        dtype=np.float32,
    ),
    # S = 1, float64, 21 coordinates: a plain particle (its mean offset is not 0).
    "one-plain-particle": _random_case(5, 1),
    # float32, |b| ~ 2e20: b^2 overflows (max 3.4e38) without the hypot, which would give
    # s = inf (b > 0) and s = 0 (b < 0). Antithetic pair, one coordinate per branch.
    "float32-b-squared-overflows": _case(
        [[1.0, 1.0], [-1.0, -1.0]],
        [[1e20, -1e20], [-1e20, 1e20]],
        [1.0, 1.0],
        dtype=np.float32,
        expect_branches=(True, False),
    ),
    # b = 2 w C + lambda w / 2 = -50 + 50 = 0 exactly: the two roots meet (p = 5).
    "b-exactly-zero": _case(
        [[1.0], [-1.0]],
        [[-25.0], [25.0]],
        [1.0],
        num_alternations=1,
        exact_precision=5.0,
    ),
    # Both signs of b over random coordinates, 4 particles, with and without lambda_s.
    "both-branches": _random_case(3, 4, expect_branches=(True, False)),
    "both-branches-scale-weight": _random_case(3, 4, scale_prox_weight=1e4),
    # Extreme weights: lambda -> 0 (a full Newton step) and lambda -> inf (no move).
    "tiny-prox-weight": _random_case(6, 2, prox_weight=1e-6),
    "huge-prox-weight": _random_case(7, 2, prox_weight=1e8),
}


def _jax_update(case, dtype):
    stats = jax_prox.score_statistics(
        jnp.asarray(case["offsets"], dtype), jnp.asarray(case["scores"], dtype)
    )
    out = jax_prox.diagonal_proximal_update(
        jnp.asarray(case["loc"], dtype),
        jnp.asarray(case["scale"], dtype),
        stats,
        case["prox_weight"],
        case["num_alternations"],
        case["scale_prox_weight"],
    )
    return [np.asarray(x) for x in out]


def _first_b(case):
    """b of the first alternation (d = 0), in float64: b = 2 w C + lambda_s w / 2."""
    w = np.square(case["scale"].astype(float))
    c = (case["offsets"].astype(float) * case["scores"].astype(float)).mean(0)
    lam_s = case["scale_prox_weight"] or case["prox_weight"]
    return 2 * w * c + 0.5 * lam_s * w


@pytest.mark.parametrize("name", sorted(HARD_INPUTS))
def test_hard_inputs_finite_and_equal_to_the_float64_reference(name):
    case = HARD_INPUTS[name]
    dtype = case["offsets"].dtype
    if "expect_branches" in case:  # the inputs exercise the branches they claim
        b = _first_b(case)
        assert [bool((b > 0).any()), bool((b <= 0).any())] == [True, True]
    with jax.enable_x64(dtype == np.float64):
        loc, scale = _jax_update(case, jnp.float32 if dtype == np.float32 else jnp.float64)
    assert loc.dtype == dtype and np.all(np.isfinite(loc)) and np.all(np.isfinite(scale))
    assert np.all(scale > 0)
    with jax.enable_x64(True):
        ref_loc, ref_scale = _jax_update(case, jnp.float64)
    tol = FLOAT32 if dtype == np.float32 else PARITY
    np.testing.assert_allclose(loc, ref_loc, rtol=tol, atol=tol * np.abs(ref_loc).max())
    np.testing.assert_allclose(scale, ref_scale, rtol=tol)
    if "exact_precision" in case:
        np.testing.assert_allclose(scale, case["exact_precision"] ** -0.5, rtol=PARITY)


@needs_torch
@pytest.mark.parametrize("name", sorted(HARD_INPUTS))
def test_hard_inputs_torch_parity(name):
    case = HARD_INPUTS[name]
    dtype = case["offsets"].dtype
    with jax.enable_x64(dtype == np.float64):
        loc, scale = _jax_update(case, jnp.float32 if dtype == np.float32 else jnp.float64)
    stats = torch_prox.score_statistics(
        torch.as_tensor(case["offsets"]), torch.as_tensor(case["scores"])
    )
    ref_loc, ref_scale = torch_prox.diagonal_proximal_update(
        torch.as_tensor(case["loc"]),
        torch.as_tensor(case["scale"]),
        stats,
        case["prox_weight"],
        case["num_alternations"],
        case["scale_prox_weight"],
    )
    tol = FLOAT32 if dtype == np.float32 else PARITY
    ref_loc, ref_scale = ref_loc.numpy(), ref_scale.numpy()
    np.testing.assert_allclose(loc, ref_loc, rtol=tol, atol=tol * np.abs(ref_loc).max())
    np.testing.assert_allclose(scale, ref_scale, rtol=tol)
