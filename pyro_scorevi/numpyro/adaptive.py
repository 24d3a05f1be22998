"""The elementwise part of :class:`~pyro_scorevi.step_rules.AdaptiveStep` (JAX).

The mirror of :mod:`pyro_scorevi.adaptive`: the same names, fields and maths in pure
``jax.numpy``, so it jits and runs inside ``lax.scan``. The maths is documented on
:class:`~pyro_scorevi.step_rules.AdaptiveStep`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from pyro_scorevi.numpyro.proximal import ScoreStatistics, diagonal_proximal_update
from pyro_scorevi.step_rules import AdaptiveStep

__all__ = [
    "CurvatureState",
    "RateState",
    "dense_factors",
    "dense_mean_score",
    "init_curvature",
    "init_rates",
    "refresh_curvature",
    "update_curvature",
    "adaptive_update",
    "scale_bounds",
    "settled_precision",
    "step_directions",
    "variance_ratio",
]


class RateState(NamedTuple):
    """Per-coordinate running statistics (see :class:`pyro_scorevi.adaptive.RateState`)."""

    mean_trend: jax.Array
    scale_trend: jax.Array
    mean_memory: jax.Array
    scale_memory: jax.Array
    mean_radius: jax.Array
    last_mean_step: jax.Array
    ratio_spread: jax.Array
    ratio_curvature: jax.Array


def init_rates(loc: jax.Array, rule: AdaptiveStep) -> RateState:
    """Fresh statistics for coordinates shaped like ``loc``."""
    zeros = jnp.zeros_like(loc)
    memory = jnp.full_like(loc, rule.initial_memory)
    return RateState(
        zeros,
        zeros,
        memory,
        memory,
        jnp.full_like(loc, rule.initial_mean_radius),
        zeros,
        zeros,
        zeros,
    )


class CurvatureState(NamedTuple):
    """The running curvature of a small guide (see :class:`pyro_scorevi.adaptive.CurvatureState`);
    ``count`` and ``refreshed`` are array scalars here."""

    cross: jax.Array
    spread: jax.Array
    count: jax.Array
    vectors: jax.Array
    eigenvalues: jax.Array
    root: jax.Array
    curved: jax.Array
    refreshed: jax.Array
    diagonal: jax.Array
    restarted: jax.Array


def init_curvature(loc: jax.Array) -> CurvatureState:
    """Empty running moments for the flat ``loc`` of ``d`` coordinates."""
    d = loc.size
    zeros = jnp.zeros((d, d), loc.dtype)
    vector = jnp.zeros(d, loc.dtype)
    return CurvatureState(
        zeros,
        zeros,
        jnp.zeros((), loc.dtype),
        zeros,
        vector,
        vector,
        jnp.zeros(d, bool),
        jnp.full((), -1.0, loc.dtype),
        vector,
        jnp.zeros((), bool),
    )


def update_curvature(
    curvature: CurvatureState,
    moments: jax.Array,
    stats: ScoreStatistics,
    rule: AdaptiveStep,
    finite: jax.Array,
    restart: jax.Array | bool = False,
) -> CurvatureState:
    """Adds one step where ``finite``; else returns ``curvature``; ``restart``: the moments
    start again from this step (see the torch mirror)."""
    d = moments.shape[-1]
    cross = moments[:d] - jnp.outer(stats.mean_score, stats.mean_offset)
    spread = moments[d:] - jnp.outer(stats.mean_offset, stats.mean_offset)
    start = curvature
    if restart is not False:
        start = curvature._replace(
            count=jnp.where(restart, 0.0, curvature.count).astype(curvature.count.dtype),
            refreshed=jnp.where(
                restart, jnp.minimum(curvature.refreshed, 0.0), curvature.refreshed
            ),
            diagonal=jnp.where(restart, 0.0, curvature.diagonal),
            restarted=curvature.restarted | restart,
        )
    count = start.count + 1
    weight = 1.0 / jnp.minimum(count, rule.dense_memory_steps(d))
    new = start._replace(
        cross=start.cross + weight * (cross - start.cross),
        spread=start.spread + weight * (spread - start.spread),
        count=count,
    )
    return jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, curvature)


def dense_factors(curvature: CurvatureState, scale: jax.Array, rule: AdaptiveStep):
    """``((V, floored Lambda, D^{1/2}, curved, diag H), ok)`` (see the torch mirror)."""
    spread = curvature.spread
    # Jacobi-scaled, as the torch mirror: the solve is in the correlation matrix of delta.
    tiny = jnp.finfo(spread.dtype).tiny ** 0.5
    spread_sd = jnp.sqrt(jnp.diagonal(spread)) + tiny
    correlation = spread / (spread_sd[:, None] * spread_sd[None, :])
    correlation = correlation + jnp.diag(1e-3 + tiny / spread_sd**2)
    root = scale
    ratio = root / spread_sd
    cross = root[:, None] * curvature.cross / spread_sd[None, :]
    whitened = -jnp.linalg.solve(correlation, cross.T).T * ratio[None, :]
    whitened = 0.5 * (whitened + whitened.T)
    diagonal = jnp.diagonal(whitened) / root**2
    curved = diagonal > 0  # as torch
    whitened = jnp.where(curved[:, None] & curved[None, :], whitened, 0.0)
    eigenvalues, vectors = jnp.linalg.eigh(whitened)
    floor = rule.dense_min_eigenvalue
    eigenvalues = jnp.where(
        eigenvalues > floor, eigenvalues, jnp.where(eigenvalues > 0, floor, 1.0)
    )
    ok = jnp.all(jnp.isfinite(whitened)) & jnp.all(jnp.isfinite(vectors))
    return (vectors, eigenvalues, root, curved, diagonal), ok


def refresh_curvature(
    curvature: CurvatureState, scale: jax.Array, rule: AdaptiveStep
) -> CurvatureState:
    """The torch mirror's refresh; the eigendecomposition runs (``lax.cond``) only when due.
    Un-jitted, the branch is Python's: the closures of a ``lax.cond`` would be compiled anew
    at every call (about 190 ms a step on a two-site model)."""
    d = scale.size
    due = (curvature.count >= rule.dense_memory_steps(d)) & (
        (curvature.refreshed < 0)
        | (curvature.count - curvature.refreshed >= rule.dense_refresh_steps(d))
    )

    def refresh(curvature):
        (vectors, eigenvalues, root, curved, diagonal), ok = dense_factors(curvature, scale, rule)
        new = curvature._replace(
            vectors=vectors,
            eigenvalues=eigenvalues,
            root=root,
            curved=curved,
            refreshed=curvature.count,
            diagonal=diagonal,
        )
        failed = curvature._replace(refreshed=jnp.full_like(curvature.refreshed, -1.0))
        return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, failed)

    try:  # called eagerly (an un-jitted update): a Python branch, no compile per call
        concrete = bool(due)
    except jax.errors.TracerBoolConversionError:
        return jax.lax.cond(due, refresh, lambda c: c, curvature)
    return refresh(curvature) if concrete else curvature


def dense_mean_score(curvature: CurvatureState, mean_score: jax.Array):
    """``(score, used)``: the mean's score in the dense metric where ``used``, else
    ``mean_score`` (see the torch mirror)."""
    vectors, root = curvature.vectors, curvature.root
    score = vectors @ ((vectors.T @ (root * mean_score)) / curvature.eigenvalues) / root
    score = jnp.where(curvature.curved, score, mean_score)
    used = (curvature.refreshed >= 0) & jnp.all(jnp.isfinite(score))
    return jnp.where(used, score, mean_score), used


def settled_precision(curvature: CurvatureState) -> jax.Array:
    """The diagonal of the last refresh where it is positive, else 0 (no target; also before
    the first refresh; see the torch mirror)."""
    valid = (curvature.refreshed >= 0) & curvature.curved
    return jnp.where(valid, curvature.diagonal, 0.0)


def scale_bounds(dtype) -> tuple[float, float]:
    """``(smallest, largest)`` guide scale, :math:`(\\text{tiny}^{1/4}, \\text{max}^{1/4})`."""
    info = jnp.finfo(dtype)
    return float(info.tiny) ** 0.25, float(info.max) ** 0.25


def step_directions(scale: jax.Array, stats: ScoreStatistics) -> tuple[jax.Array, jax.Array]:
    """Signs of the mean's and the log-precision's proposals (see the torch mirror)."""
    return _directions(jnp.square(scale), stats, *_moments(stats))


def variance_ratio(
    scale: jax.Array, stats: ScoreStatistics, rule: AdaptiveStep, release: jax.Array | float
) -> jax.Array:
    """The factor of the mean's step from one step's own moments (see the torch mirror)."""
    spread, cross = _moments(stats)
    w = jnp.square(scale)
    return _ratio(spread / w, -cross / w, w, rule, release)


def _moments(stats: ScoreStatistics) -> tuple[jax.Array, jax.Array]:
    spread = stats.mean_sq_offset - jnp.square(stats.mean_offset)
    cross = stats.mean_offset_score - stats.mean_offset * stats.mean_score
    return spread, cross


def _directions(w, stats, spread, cross):
    mean_direction = jnp.sign(stats.mean_offset + w * stats.mean_score)
    precision_direction = jnp.where(-cross * w > spread, 1.0, -1.0).astype(w.dtype)
    return mean_direction, precision_direction


def _ratio(spread, curvature, w, rule, release):
    limit = rule.max_variance_ratio
    curved = curvature > 0
    quotient = spread / (jnp.where(curved, curvature, 1.0) * w)
    quotient = jnp.nan_to_num(quotient, nan=limit, posinf=limit, neginf=1.0)
    ratio = jnp.clip(jnp.where(curved, quotient, limit), 1.0, limit)
    return 1 + (ratio - 1) * (1 - release)


def _settled_statistics(stats, spread, cross, precision, release, w, band):
    """``(stats, cross, where)`` with the blended precision target (see the torch mirror)."""
    ratio = precision * w
    # release > 0: at r = 0 the statistics are the step's own, bit for bit (traced r too).
    target = (precision > 0) & (ratio <= band) & (ratio * band >= 1) & (release > 0)
    blended = (1 - release) * cross - release * precision * spread
    offset_score = jnp.where(
        target, blended + stats.mean_offset * stats.mean_score, stats.mean_offset_score
    )
    return stats._replace(mean_offset_score=offset_score), jnp.where(target, blended, cross), target


def _too_narrow(precision, w, release, band):
    """Where the guide is narrower than its settled precision by the band (see the torch
    mirror)."""
    return (precision > 0) & (precision * w * band < 1) & (release > 0)


def _trend(trend, memory, direction, min_memory, max_memory):
    trend = trend + (direction - trend) / memory
    agreement = jnp.square(trend)
    memory = jnp.clip((1 - agreement) * memory + 1, min_memory, max_memory)
    return trend, memory, agreement


def _radius(radius, step, last, rule, largest, smallest):
    turn = step * last
    factor = jnp.where(turn > 0, rule.radius_growth, jnp.where(turn < 0, rule.radius_shrink, 1.0))
    return jnp.clip(radius * factor, smallest, largest)


def adaptive_update(
    loc: jax.Array,
    scale: jax.Array,
    stats: ScoreStatistics,
    rates: RateState,
    trust: jax.Array | float,
    rule: AdaptiveStep,
    release: jax.Array | float = 0.0,
    floor_decay: jax.Array | float = 1.0,
    apply_variance_ratio: bool = True,
    precision: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, RateState, jax.Array]:
    """One adaptive closed-form step; returns ``(new_loc, new_scale, new_rates, mean_rate)``;
    ``apply_variance_ratio=False``: no variance ratio (a guide in the dense metric);
    ``precision``: its :func:`settled_precision` (see the torch mirror)."""
    dtype = scale.dtype
    trust = jnp.asarray(trust, dtype)
    w = jnp.square(scale)
    spread, cross = _moments(stats)
    settled = precision is not None and rule.settled_scale_rate > 0
    if settled:
        release = jnp.asarray(release, dtype)
        stats, cross, target = _settled_statistics(
            stats, spread, cross, precision, release, w, rule.settled_band
        )
    mean_direction, precision_direction = _directions(w, stats, spread, cross)
    mean_trend, mean_memory, mean_agreement = _trend(
        rates.mean_trend, rates.mean_memory, mean_direction, rule.min_memory, rule.max_memory
    )
    scale_trend, scale_memory, scale_agreement = _trend(
        rates.scale_trend, rates.scale_memory, precision_direction, rule.min_memory, rule.max_memory
    )
    mean_rate = jnp.clip(
        trust * rule.max_mean_rate * mean_agreement, rule.min_rate, rule.max_mean_rate
    )
    scale_rate = jnp.clip(
        trust * rule.max_scale_rate * scale_agreement, rule.min_rate, rule.max_scale_rate
    )
    informed = cross != 0
    cap_rate = jnp.maximum(mean_rate, release * trust * rule.mean_rate_floor)  # as torch
    capped = jnp.minimum(scale_rate, rule.scale_to_mean_rate * cap_rate)
    uncapped = (mean_direction == 0) & informed  # as torch
    if settled:
        uncapped = uncapped | _too_narrow(precision, w, release, rule.settled_band)
    scale_rate = jnp.where(uncapped, scale_rate, capped)
    if settled:
        least = jnp.where(target, release * trust * rule.settled_scale_rate, 0.0)
        scale_rate = jnp.maximum(scale_rate, least)
    mean_rate = jnp.maximum(mean_rate, floor_decay * trust * rule.mean_rate_floor)
    proposed_loc, proposed_scale = diagonal_proximal_update(
        loc,
        scale,
        stats,
        2 / mean_rate - 2,
        rule.num_alternations,
        scale_prox_weight=4 / scale_rate - 4,
    )
    mean_step = proposed_loc - loc
    ratio_spread, ratio_curvature = rates.ratio_spread, rates.ratio_curvature
    if apply_variance_ratio and rule.max_variance_ratio != 1:  # as torch (release is traced here)
        forget = 1 / rule.variance_ratio_memory
        ratio_spread = ratio_spread + forget * (spread / w - ratio_spread)
        ratio_curvature = ratio_curvature + forget * (-cross / w - ratio_curvature)
        mean_step = mean_step * _ratio(ratio_spread, ratio_curvature, w, rule, release)
    # Heavy-ball momentum where the mean's steps agree (a ridge of a correlated posterior, which
    # coordinate-wise steps otherwise crawl along); off where they turn.
    if rule.momentum:
        mean_step = mean_step + rule.momentum * mean_agreement * rates.last_mean_step
    log_scale_step = jnp.log(proposed_scale / scale)
    mean_radius = _radius(
        rates.mean_radius,
        mean_step,
        rates.last_mean_step,
        rule,
        rule.max_mean_radius,
        rule.min_mean_radius,
    )
    bound = trust * mean_radius * jnp.minimum(scale, proposed_scale)
    mean_step = jnp.clip(mean_step, -bound, bound)
    log_bound = trust * rule.max_log_scale_step
    log_scale_step = jnp.clip(log_scale_step, -log_bound, log_bound)
    smallest, largest = scale_bounds(dtype)
    new_scale = jnp.clip(scale * jnp.exp(log_scale_step), smallest, largest)
    new_rates = RateState(
        mean_trend,
        scale_trend,
        mean_memory,
        scale_memory,
        mean_radius,
        mean_step,
        ratio_spread,
        ratio_curvature,
    )
    return loc + mean_step, new_scale, new_rates, mean_rate
