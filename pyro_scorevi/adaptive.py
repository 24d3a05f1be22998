"""The elementwise part of :class:`~pyro_scorevi.step_rules.AdaptiveStep` (PyTorch).

Given the frozen :math:`(m_t, s_t)`, the step's :class:`~pyro_scorevi.proximal.ScoreStatistics`
and the rule's running statistics, :func:`adaptive_update` returns the clamped closed-form step
and the new statistics. Pure functions over tensors: no param store, no model. The JAX mirror
is :mod:`pyro_scorevi.numpyro.adaptive` (same names, same maths); the maths is documented on
:class:`~pyro_scorevi.step_rules.AdaptiveStep`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from pyro_scorevi.proximal import ScoreStatistics, diagonal_proximal_update
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
    """Per-coordinate running statistics of :class:`~pyro_scorevi.step_rules.AdaptiveStep`.

    Attributes:
        mean_trend, scale_trend: running means :math:`a` of the signs of the mean's and the
            log-precision's proposals.
        mean_memory, scale_memory: their memories :math:`\\tau` (in steps).
        mean_radius: the mean's trust radius :math:`r` (in standard deviations).
        last_mean_step: the previous accepted mean step (for the radius' Rprop rule).
        ratio_spread, ratio_curvature: running means of :math:`\\mathrm{Var}\\,\\delta/s^2`
            and :math:`-\\mathrm{Cov}(\\delta, \\hat g)/s^2` (``variance_ratio_memory``).
    """

    mean_trend: torch.Tensor
    scale_trend: torch.Tensor
    mean_memory: torch.Tensor
    scale_memory: torch.Tensor
    mean_radius: torch.Tensor
    last_mean_step: torch.Tensor
    ratio_spread: torch.Tensor
    ratio_curvature: torch.Tensor


def init_rates(loc: torch.Tensor, rule: AdaptiveStep) -> RateState:
    """Fresh statistics for coordinates shaped like ``loc``."""
    zeros = torch.zeros_like(loc)
    memory = torch.full_like(loc, rule.initial_memory)
    return RateState(
        zeros,
        zeros.clone(),
        memory,
        memory.clone(),
        torch.full_like(loc, rule.initial_mean_radius),
        zeros.clone(),
        zeros.clone(),
        zeros.clone(),
    )


class CurvatureState(NamedTuple):
    """The running curvature of a small guide (``AdaptiveStep.dense_max_dim``).

    Attributes:
        cross: running mean of the step's :math:`\\mathrm{Cov}(\\hat g, \\delta)`, ``(d, d)``
            (row: score, column: offset).
        spread: running mean of the step's :math:`\\mathrm{Cov}(\\delta)`, ``(d, d)``.
        count: the steps averaged so far (a float).
        vectors, eigenvalues, root, curved: the factors of the last refresh
            (:func:`dense_factors`): :math:`V`, the floored :math:`\\Lambda`, :math:`D^{1/2}`
            and the coordinates with positive curvature.
        refreshed: ``count`` at the last refresh; -1 before the first (no factors).
        diagonal: :math:`\\hat H_{jj}` at the last refresh, the precision a mean-field
            guide settles to (:func:`settled_precision`); ``None`` before the first.
        restarted: whether the moments have started again (``AdaptiveStep.dense_restart``;
            once per fit).
    """

    cross: torch.Tensor
    spread: torch.Tensor
    count: float
    vectors: torch.Tensor
    eigenvalues: torch.Tensor
    root: torch.Tensor
    curved: torch.Tensor
    refreshed: float = -1.0
    diagonal: torch.Tensor | None = None
    restarted: bool = False


def init_curvature(loc: torch.Tensor) -> CurvatureState:
    """Empty running moments for the flat ``loc`` of ``d`` coordinates."""
    d = loc.numel()
    zeros = loc.new_zeros((d, d))
    vector = loc.new_zeros(d)
    return CurvatureState(
        zeros,
        zeros.clone(),
        0.0,
        zeros.clone(),
        vector.clone(),
        vector.clone(),
        torch.zeros(d, dtype=torch.bool, device=loc.device),
    )


def update_curvature(
    curvature: CurvatureState,
    moments: torch.Tensor,
    stats: ScoreStatistics,
    rule: AdaptiveStep,
    restart: bool = False,
) -> CurvatureState:
    """Adds one finite step: ``moments`` stacks the particle means of :math:`\\hat g\\delta^\\top`
    and :math:`\\delta\\delta^\\top`, ``(2d, d)``, centred here with the step's means.

    ``restart`` (``AdaptiveStep.dense_restart``): the moments start again from this step; the
    last factors stay in use until the memory is full again, the settled precision waits
    for that refresh."""
    d = moments.shape[-1]
    cross = moments[:d] - torch.outer(stats.mean_score, stats.mean_offset)
    spread = moments[d:] - torch.outer(stats.mean_offset, stats.mean_offset)
    if restart:
        curvature = curvature._replace(
            count=0.0,
            refreshed=min(curvature.refreshed, 0.0),
            diagonal=None,
            restarted=True,
        )
    count = curvature.count + 1
    weight = 1.0 / min(count, rule.dense_memory_steps(d))
    return curvature._replace(
        cross=curvature.cross + weight * (cross - curvature.cross),
        spread=curvature.spread + weight * (spread - curvature.spread),
        count=count,
    )


def dense_factors(curvature: CurvatureState, scale: torch.Tensor, rule: AdaptiveStep):
    """``(V, floored Lambda, D^{1/2}, curved, diag H)`` of the running curvature at the guide's
    ``scale`` (see :class:`~pyro_scorevi.step_rules.AdaptiveStep`, ``dense_max_dim``), or
    ``None`` where the solve is singular or not finite (the step keeps :math:`\\bar g`)."""
    spread = curvature.spread
    # A ridge's Cov(delta) is full rank only on average: 1e-3 of its diagonal regularises it.
    # The solve is Jacobi-scaled, in the correlation matrix of delta: the raw one spans the
    # squared scale ratios of the coordinates (an intercept against raw-scale slopes), and in
    # float32 its error let a collinear raw-scale regression (d = 51) climb to a loss of 2e11
    # on its way to the posterior (1.5e7 scaled, 2.2e7 in float64).
    tiny = torch.finfo(spread.dtype).tiny ** 0.5
    spread_sd = spread.diagonal().sqrt() + tiny
    correlation = spread / (spread_sd[:, None] * spread_sd[None, :])
    correlation = correlation + torch.diag(1e-3 + tiny / spread_sd.square())
    root = scale  # D^{1/2} = diag(s)
    cross = root[:, None] * curvature.cross / spread_sd[None, :]
    try:  # D^{1/2} (-C_gd C_dd^-1) D^{1/2}, with C_dd = diag(sd) R diag(sd)
        whitened = -torch.linalg.solve(correlation, cross.T).T * (root / spread_sd)[None, :]
    except torch.linalg.LinAlgError:  # an exactly singular Cov(delta): keep the diagonal step
        return None
    whitened = 0.5 * (whitened + whitened.T)
    # Coordinates with no positive curvature seen (a flat latent, exact zero scores) keep the
    # guide's own metric, uncoupled: noise in their cross moments must not move them.
    diagonal = whitened.diagonal() / root.square()
    curved = diagonal > 0
    whitened = torch.where(curved[:, None] & curved[None, :], whitened, 0.0)
    if not bool(torch.isfinite(whitened).all()):  # eigh raises on NaN: keep the diagonal step
        return None
    eigenvalues, vectors = torch.linalg.eigh(whitened)
    floor = rule.dense_min_eigenvalue
    # Non-positive curvature: the guide's own metric. In the eigenvalues' dtype (two Python
    # scalars alone would give a float32 floor in a float64 fit).
    low = torch.where(
        eigenvalues > 0, torch.full_like(eigenvalues, floor), torch.ones_like(eigenvalues)
    )
    eigenvalues = torch.where(eigenvalues > floor, eigenvalues, low)
    return vectors, eigenvalues, root, curved, diagonal


def refresh_curvature(
    curvature: CurvatureState, scale: torch.Tensor, rule: AdaptiveStep
) -> CurvatureState:
    """Recomputes the factors once the memory is full and every
    :meth:`~pyro_scorevi.step_rules.AdaptiveStep.dense_refresh_steps` averaged steps (the
    eigendecomposition is the step's largest cost on a small model); else returns
    ``curvature``. A failed solve leaves no factors (``refreshed = -1``)."""
    d = curvature.root.numel()
    if curvature.count < rule.dense_memory_steps(d):
        return curvature
    if curvature.refreshed >= 0 and (
        curvature.count - curvature.refreshed < rule.dense_refresh_steps(d)
    ):
        return curvature
    factors = dense_factors(curvature, scale, rule)
    if factors is None:
        return curvature._replace(refreshed=-1.0)
    vectors, eigenvalues, root, curved, diagonal = factors
    return curvature._replace(
        vectors=vectors,
        eigenvalues=eigenvalues,
        root=root,
        curved=curved,
        refreshed=curvature.count,
        diagonal=diagonal,
    )


def dense_mean_score(curvature: CurvatureState, mean_score: torch.Tensor) -> torch.Tensor | None:
    """The mean's score in the dense metric, :math:`D^{-1/2}V\\Lambda^{-1}V^\\top D^{1/2}\\bar g`
    with the factors of the last refresh; ``None`` before the first or where it is not finite
    (the step keeps :math:`\\bar g`)."""
    if curvature.refreshed < 0:
        return None
    vectors, root = curvature.vectors, curvature.root
    score = vectors @ ((vectors.T @ (root * mean_score)) / curvature.eigenvalues) / root
    score = torch.where(curvature.curved, score, mean_score)
    return score if bool(torch.isfinite(score).all()) else None


def settled_precision(curvature: CurvatureState) -> torch.Tensor | None:
    """The diagonal :math:`\\hat H_{jj}` of the last refresh where it is positive, else 0 (no
    target: the step's own); ``None`` before the first refresh.

    The fixed point of a mean-field guide has precision :math:`\\mathbb E_q[-\\partial_j^2
    \\log p]`. Each step's Stein estimate :math:`-\\mathrm{Cov}(\\delta_j, \\hat g_j) /
    \\mathrm{Var}\\,\\delta_j` carries the noise :math:`\\sum_{k \\ne j} H_{jk}\\delta_k /
    \\delta_j` of the other coordinates, which on a correlated posterior dwarfs
    :math:`H_{jj}`; the running regression of the scores on *all* the offsets removes it (exact
    on a Gaussian target)."""
    if curvature.refreshed < 0 or curvature.diagonal is None:
        return None
    return torch.where(curvature.curved, curvature.diagonal, 0.0)


def scale_bounds(dtype: torch.dtype) -> tuple[float, float]:
    """``(smallest, largest)`` guide scale: :math:`(\\text{tiny}^{1/4}, \\text{max}^{1/4})` of
    the dtype (float32: 3.3e-10 and 4.3e9), so that :math:`s^2`, :math:`1/s^2` and
    :math:`s^2 \\hat g` stay finite and no draw collapses onto the mean."""
    info = torch.finfo(dtype)
    return info.tiny**0.25, info.max**0.25


def step_directions(
    scale: torch.Tensor, stats: ScoreStatistics
) -> tuple[torch.Tensor, torch.Tensor]:
    """Signs of the mean's natural-gradient proposal :math:`\\bar\\delta + s^2\\bar g` and of the
    log-precision's Stein proposal :math:`\\log(-\\mathrm{Cov}(\\delta, g)/\\mathrm{Var}\\,\\delta)
    + \\log s^2` (:math:`-1` where the covariance is not negative: the precision falls)."""
    return _directions(scale.square(), stats, *_moments(stats))


def variance_ratio(
    scale: torch.Tensor,
    stats: ScoreStatistics,
    rule: AdaptiveStep,
    release: torch.Tensor | float,
) -> torch.Tensor:
    """The factor of the mean's step from one step's own moments (``variance_ratio_memory``
    1): :math:`1 + (\\operatorname{clip}(\\hat v/s^2, 1, M) - 1) (1 - \\text{release})`,
    :math:`\\hat v = \\mathrm{Var}\\,\\delta / (-\\mathrm{Cov}(\\delta, \\hat g))`
    (:math:`M` where the covariance is not negative: no positive curvature seen), :math:`M` =
    ``max_variance_ratio``."""
    spread, cross = _moments(stats)
    w = scale.square()
    return _ratio(spread / w, -cross / w, w, rule, release)


def _moments(stats: ScoreStatistics) -> tuple[torch.Tensor, torch.Tensor]:
    """:math:`(\\mathrm{Var}\\,\\delta, \\mathrm{Cov}(\\delta, \\hat g))` over the particles."""
    spread = stats.mean_sq_offset - stats.mean_offset.square()
    cross = stats.mean_offset_score - stats.mean_offset * stats.mean_score
    return spread, cross


def _directions(w, stats, spread, cross):
    mean_direction = torch.sign(stats.mean_offset + w * stats.mean_score)
    # -cross / spread > 1 / w  <=>  -cross * w > spread (no division, no log).
    precision_direction = torch.where(-cross * w > spread, 1.0, -1.0).to(w.dtype)
    return mean_direction, precision_direction


def _ratio(spread, curvature, w, rule, release):
    """The factor from ``spread`` :math:`\\approx \\mathrm{Var}\\,\\delta/s^2` and
    ``curvature`` :math:`\\approx -\\mathrm{Cov}(\\delta, \\hat g)/s^2`."""
    limit = rule.max_variance_ratio
    curved = curvature > 0
    # v / s^2 = spread / (curvature s^2), clamped to [1, M]; a huge or infinite quotient is M.
    quotient = spread / (torch.where(curved, curvature, 1.0) * w)
    ratio = torch.where(curved, quotient.nan_to_num(limit, limit, 1.0), limit).clamp(1.0, limit)
    return 1 + (ratio - 1) * (1 - release)


def _settles(rule, precision, release) -> bool:
    return (
        precision is not None
        and rule.settled_scale_rate > 0
        and not (isinstance(release, float) and release <= 0)
    )


def _settled_statistics(stats, spread, cross, precision, release, w, band):
    """The statistics whose Stein precision target :math:`-\\mathrm{Cov}/\\mathrm{Var}` is
    :math:`(1 - r)` times the step's own plus :math:`r` times ``precision`` (:math:`r` =
    ``release``) where ``precision > 0`` lies within a factor ``band`` of the guide's
    :math:`1/w`; returns ``(stats, cross, where)``."""
    ratio = precision * w
    # release > 0: at r = 0 the statistics are the step's own, bit for bit (traced r too).
    target = (precision > 0) & (ratio <= band) & (ratio * band >= 1) & (release > 0)
    blended = (1 - release) * cross - release * precision * spread
    offset_score = torch.where(
        target, blended + stats.mean_offset * stats.mean_score, stats.mean_offset_score
    )
    return (
        stats._replace(mean_offset_score=offset_score),
        torch.where(target, blended, cross),
        target,
    )


def _too_narrow(precision, w, release, band):
    """Where the settled precision is below the guide's :math:`1/w` by more than the band: the
    scale is too small by the low-noise estimate, and its growth is not capped by its mean's
    rate (a scale collapsed far from the mode, where the curvature was larger)."""
    return (precision > 0) & (precision * w * band < 1) & (release > 0)


def _trend(trend, memory, direction, min_memory, max_memory):
    trend = trend + (direction - trend) / memory
    agreement = trend.square()
    memory = ((1 - agreement) * memory + 1).clamp(min_memory, max_memory)
    return trend, memory, agreement


def _radius(radius, step, last, rule, largest, smallest):
    turn = step * last
    factor = torch.where(
        turn > 0, rule.radius_growth, torch.where(turn < 0, rule.radius_shrink, 1.0)
    )
    return (radius * factor).clamp(smallest, largest)


def adaptive_update(
    loc: torch.Tensor,
    scale: torch.Tensor,
    stats: ScoreStatistics,
    rates: RateState,
    trust: torch.Tensor | float,
    rule: AdaptiveStep,
    release: torch.Tensor | float = 0.0,
    floor_decay: torch.Tensor | float = 1.0,
    apply_variance_ratio: bool = True,
    precision: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, RateState, torch.Tensor]:
    """One adaptive closed-form step from the frozen ``(loc, scale)``; ``release`` and
    ``floor_decay`` are :func:`~pyro_scorevi.step_rules.cap_release` and
    :func:`~pyro_scorevi.step_rules.floor_decay` of the loss's progress;
    ``apply_variance_ratio=False`` leaves the variance ratio out (a guide in the dense metric, whose
    ``stats.mean_score`` is :func:`dense_mean_score`); ``precision``: the
    :func:`settled_precision` of such a guide, the log-precisions' target once the loss has
    stopped falling (``AdaptiveStep.settled_scale_rate``).

    Returns:
        ``(new_loc, new_scale, new_rates, mean_rate)``; ``mean_rate`` is the per-coordinate
        :math:`\\eta_m` used (a diagnostic).
    """
    w = scale.square()
    spread, cross = _moments(stats)
    settled = _settles(rule, precision, release)
    if settled:
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
    mean_rate = (trust * rule.max_mean_rate * mean_agreement).clamp(
        rule.min_rate, rule.max_mean_rate
    )
    scale_rate = (trust * rule.max_scale_rate * scale_agreement).clamp(
        rule.min_rate, rule.max_scale_rate
    )
    # Scales no faster than their means: where the mean's steps are noise (a network early on)
    # the scales wait for it, instead of growing to the prior's first.
    # A mean whose proposed step is exactly 0 (a prior-only latent started at its optimum, with
    # antithetic pairs) has no noise to wait for: its scale is not capped. A flat direction
    # (every score exactly 0, no curvature information either) stays capped, so its scale does
    # not drift to the bound.
    informed = cross != 0
    # Once the loss has stopped falling (release -> 1) the cap follows the floored mean rate:
    # scales that the sign noise at the mode held back can reach the optimum's.
    cap_rate = mean_rate.clamp_min(release * trust * rule.mean_rate_floor)
    capped = torch.minimum(scale_rate, rule.scale_to_mean_rate * cap_rate)
    uncapped = (mean_direction == 0) & informed
    if settled:  # a guide narrower than its settled precision by the band grows uncapped
        uncapped = uncapped | _too_narrow(precision, w, release, rule.settled_band)
    scale_rate = torch.where(uncapped, scale_rate, capped)
    if settled:  # toward a low-noise target: at least this rate, past the cap
        least = torch.where(target, release * trust * rule.settled_scale_rate, 0.0)
        scale_rate = torch.maximum(scale_rate, least)
    # The means' floor (not the scales'): noisy coordinates keep learning while the loss
    # falls; once it has stopped, the floor decays like 1/t (no noise floor at the mode).
    mean_rate = mean_rate.clamp_min(floor_decay * trust * rule.mean_rate_floor)
    proposed_loc, proposed_scale = diagonal_proximal_update(
        loc,
        scale,
        stats,
        2 / mean_rate - 2,
        rule.num_alternations,
        scale_prox_weight=4 / scale_rate - 4,
    )
    # While the loss falls, a Newton step in the larger of the guide's variance and the draws'
    # estimate of the target's (at most max_variance_ratio times): scales held back by the cap
    # (a network early on) no longer slow their means down.
    mean_step = proposed_loc - loc
    ratio_spread, ratio_curvature = rates.ratio_spread, rates.ratio_curvature
    if apply_variance_ratio and rule.max_variance_ratio != 1:
        # The moments' running means (each step's own at variance_ratio_memory = 1); kept up
        # to date once the loss has stopped falling too, where the factor is 1.
        forget = 1 / rule.variance_ratio_memory
        ratio_spread = ratio_spread + forget * (spread / w - ratio_spread)
        ratio_curvature = ratio_curvature + forget * (-cross / w - ratio_curvature)
        if not (isinstance(release, float) and release >= 1):
            mean_step = mean_step * _ratio(ratio_spread, ratio_curvature, w, rule, release)
    # Heavy-ball momentum where the mean's steps agree (a ridge of a correlated posterior, which
    # coordinate-wise steps otherwise crawl along); off where they turn.
    if rule.momentum:
        mean_step = mean_step + rule.momentum * mean_agreement * rates.last_mean_step
    log_scale_step = torch.log(proposed_scale / scale)
    mean_radius = _radius(
        rates.mean_radius,
        mean_step,
        rates.last_mean_step,
        rule,
        rule.max_mean_radius,
        rule.min_mean_radius,
    )
    # The trust region, in units of the narrower of q_t and q_{t+1}.
    bound = trust * mean_radius * torch.minimum(scale, proposed_scale)
    mean_step = torch.maximum(torch.minimum(mean_step, bound), -bound)
    log_bound = trust * rule.max_log_scale_step
    log_scale_step = log_scale_step.clamp(-log_bound, log_bound)
    smallest, largest = scale_bounds(scale.dtype)
    new_scale = (scale * log_scale_step.exp()).clamp(smallest, largest)
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
