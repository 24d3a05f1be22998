"""Functional core of the score-proximal step for diagonal Gaussian families (JAX).

The JAX mirror of :mod:`pyro_scorevi.proximal`: the same names, signatures and maths, in pure
``jax.numpy`` (no torch), so each function can be jitted, vmapped and used inside ``lax.scan``.

One iteration freezes :math:`q_t = \\mathcal N(m_t, \\operatorname{diag} s_t^2)`, draws
:math:`\\theta_k \\sim q_t` with scores :math:`\\hat g_k = \\nabla_\\theta \\log \\hat p(\\theta_k)`
and sets

.. math::

    q_{t+1} = \\arg\\min_q \\; \\frac1S \\sum_k
        \\lVert \\nabla \\log q(\\theta_k) - \\hat g_k \\rVert^2_{W}
        + \\lambda \\, \\mathrm{KL}(q_t \\,\\Vert\\, q),
    \\qquad W = \\operatorname{diag}(s_t^2).

For a diagonal Gaussian the objective separates per coordinate and is solved by alternating two
closed forms (precision :math:`p = 1/s^2` for fixed mean, mean for fixed precision). Only four
per-coordinate Monte Carlo averages are needed (:class:`ScoreStatistics`), so memory is
:math:`O(d)`. Everything is elementwise and works on arrays of any shape.

Reference: M. Kim, "Large-scale Score-based Variational Posterior Inference for Bayesian Deep
Neural Networks", arXiv:2602.05873, 2026. The closed form is derived in ``docs/algorithm.md``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

__all__ = [
    "ScoreStatistics",
    "score_statistics",
    "solve_precision",
    "solve_mean",
    "diagonal_proximal_update",
]


class ScoreStatistics(NamedTuple):
    """Per-coordinate Monte Carlo averages over the ``S`` particles of one step.

    All averages are taken about the frozen mean :math:`m_t`, with
    :math:`\\delta_k = \\theta_k - m_t`. A NamedTuple, hence a JAX pytree.

    Attributes:
        mean_offset: :math:`\\frac1S\\sum_k \\delta_k` (exactly 0 for antithetic pairs).
        mean_sq_offset: :math:`\\frac1S\\sum_k \\delta_k^2`.
        mean_offset_score: :math:`\\frac1S\\sum_k \\delta_k \\hat g_k`.
        mean_score: :math:`\\frac1S\\sum_k \\hat g_k`.
    """

    mean_offset: jax.Array
    mean_sq_offset: jax.Array
    mean_offset_score: jax.Array
    mean_score: jax.Array


def score_statistics(offsets: jax.Array, scores: jax.Array) -> ScoreStatistics:
    """Averages the particle axis (axis 0) of ``offsets`` :math:`\\delta_k` and ``scores``.

    Args:
        offsets: :math:`\\theta_k - m_t`, shape ``(S, *event)``.
        scores: :math:`\\hat g_k`, same shape.

    Returns:
        The :class:`ScoreStatistics` of shape ``event``.
    """
    return ScoreStatistics(
        offsets.mean(0),
        jnp.square(offsets).mean(0),
        (offsets * scores).mean(0),
        scores.mean(0),
    )


def solve_precision(
    frozen_scale: jax.Array,
    shift: jax.Array,
    stats: ScoreStatistics,
    prox_weight: float | jax.Array,
    scale_prox_weight: float | jax.Array | None = None,
) -> jax.Array:
    """Minimises the proximal objective over the precision :math:`p` for a fixed mean.

    With :math:`w = s_t^2`, :math:`d = m - m_t` (``shift``),
    :math:`A = \\overline{(\\theta - m)^2}`, :math:`C = \\overline{(\\theta - m)\\hat g}` and
    :math:`c = s_t^2 + d^2`, stationarity reads :math:`2wA p^2 + b p - \\lambda/2 = 0` with
    :math:`b = 2wC + \\lambda c / 2`. Its positive root is taken in the form that does not
    cancel: :math:`p = \\lambda / (b + \\sqrt{b^2 + 4wA\\lambda})` for :math:`b > 0` and
    :math:`p = (-b + \\sqrt{b^2 + 4wA\\lambda}) / (4wA)` otherwise.

    With a separate ``scale_prox_weight`` :math:`\\lambda_s` (see
    :func:`diagonal_proximal_update`), :math:`b = 2wC + (\\lambda_s w + \\lambda d^2)/2` and
    :math:`\\lambda_s` replaces :math:`\\lambda` in the root.
    """
    lam_s = prox_weight if scale_prox_weight is None else scale_prox_weight
    w = jnp.square(frozen_scale)
    # A = variance of the offsets + (mean offset - d)^2, both non-negative (the expanded form
    # cancels to a negative A when the mean step reproduces a single particle's offset, S = 1).
    spread = jnp.maximum(stats.mean_sq_offset - jnp.square(stats.mean_offset), 0)
    a = spread + jnp.square(stats.mean_offset - shift)
    c_cross = stats.mean_offset_score - shift * stats.mean_score
    b = 2 * w * c_cross + 0.5 * (lam_s * w + prox_weight * jnp.square(shift))
    # sqrt(b^2 + 4wA lambda) as a hypot: b^2 overflows float32 once |b| > 1.8e19 (as the
    # torch mirror).
    disc = jnp.hypot(b, 2 * frozen_scale * jnp.sqrt(a) * jnp.sqrt(lam_s))
    # Both branches are evaluated; jnp.where picks the stable one. ``4 w A`` is clamped away
    # from zero only to keep the unused branch finite (A = 0 has probability zero).
    four_wa = jnp.maximum(4 * w * a, jnp.finfo(w.dtype).tiny)
    return jnp.where(b > 0, lam_s / (b + disc), (disc - b) / four_wa)


def solve_mean(
    frozen_loc: jax.Array,
    frozen_scale: jax.Array,
    precision: jax.Array,
    stats: ScoreStatistics,
    prox_weight: float | jax.Array,
) -> jax.Array:
    """Minimises the proximal objective over the mean for a fixed precision :math:`p`.

    .. math::

        m = \\frac{2w(p\\,\\bar\\theta + \\bar g) + \\lambda m_t}{2wp + \\lambda},
        \\qquad \\bar\\theta = m_t + \\overline{\\delta}.
    """
    w = jnp.square(frozen_scale)
    mean_theta = frozen_loc + stats.mean_offset
    return (2 * w * (precision * mean_theta + stats.mean_score) + prox_weight * frozen_loc) / (
        2 * w * precision + prox_weight
    )


def diagonal_proximal_update(
    loc: jax.Array,
    scale: jax.Array,
    stats: ScoreStatistics,
    prox_weight: float | jax.Array,
    num_alternations: int = 2,
    scale_prox_weight: float | jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """One closed-form proximal step of a diagonal Gaussian :math:`\\mathcal N(m_t, s_t^2)`.

    Alternates :func:`solve_precision` (starting at :math:`m = m_t`) and :func:`solve_mean`
    ``num_alternations`` times (a static Python ``int``; the loop is unrolled when traced).

    Args:
        loc: the frozen mean :math:`m_t`.
        scale: the frozen standard deviation :math:`s_t` (positive).
        stats: the step's :class:`ScoreStatistics`, taken about ``loc``.
        prox_weight: :math:`\\lambda > 0`, the weight of :math:`\\mathrm{KL}(q_t\\Vert q)`; an
            inverse step size (a float or a traced scalar).
        num_alternations: number of (precision, mean) alternations, at least 1.
        scale_prox_weight: :math:`\\lambda_s`, a separate weight for the scale part of the
            KL; ``None`` (the default, the paper's step) uses ``prox_weight``. The KL splits as
            :math:`\\tfrac12\\sum_j p_j d_j^2` (mean part, weighted by :math:`\\lambda`) plus
            :math:`\\tfrac12\\sum_j (p_j s_{t,j}^2 - \\log p_j s_{t,j}^2 - 1)` (scale part,
            weighted by :math:`\\lambda_s`): a large :math:`\\lambda_s` moves the scales slowly
            while the means take steps of size :math:`\\approx 2 s^2 \\hat g/\\lambda`. Fixed
            points with exact scores do not depend on either weight.

    Returns:
        ``(new_loc, new_scale)``, the minimiser :math:`(m_{t+1}, s_{t+1})`.
    """
    new_loc = loc
    precision = jnp.ones((), dtype=scale.dtype)
    for _ in range(num_alternations):
        precision = solve_precision(scale, new_loc - loc, stats, prox_weight, scale_prox_weight)
        new_loc = solve_mean(loc, scale, precision, stats, prox_weight)
    return new_loc, jax.lax.rsqrt(precision)
