"""Torch vs JAX parity of the functional core (float64, tolerance tier: parity 1e-5)."""

import numpy as np
import pytest

pytest.importorskip("jax")
torch = pytest.importorskip("torch")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from pyro_scorevi import proximal as torch_prox  # noqa: E402
from pyro_scorevi.numpyro import proximal as jax_prox  # noqa: E402

PARITY = 1e-5  # torch vs JAX on identical float64 inputs


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


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_score_statistics_parity(seed):
    _, _, offsets, scores = _inputs(seed)
    out_j, out_t = _both("score_statistics", offsets, scores)
    assert len(out_j) == len(out_t) == 4
    for a, b in zip(out_j, out_t):
        assert a.dtype == np.float64
        np.testing.assert_allclose(a, b, rtol=PARITY, atol=PARITY)


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
