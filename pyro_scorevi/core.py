"""Functional core of the diagonal score-proximal step (PyTorch): ``State``, ``init``, ``update``.

No param store, no model: :func:`update` takes the frozen iterate's step statistics (from
:func:`pyro_scorevi.svi.particle_sums`) and its -ELBO estimate, and returns the next
:class:`DiagonalState` and a :class:`StepInfo`. :class:`~pyro_scorevi.ScoreProximalSVI` is a
thin shell that reads the guide into a state, calls :func:`update` and writes the result back.
The JAX mirror is :mod:`pyro_scorevi.numpyro.svi` (same field names).

Under :class:`~pyro_scorevi.step_rules.AdaptiveStep` a step is one of:

* *accepted*: the loss of :math:`q_t` is finite and not sharply worse than that of the
  previous iterate; :math:`q_t` becomes the backup and the guide moves to :math:`q_{t+1}`;
* *reverted*: the loss of :math:`q_t` (measured now, on this step's particles) is not finite or
  worse than the backup's by more than the tolerance; the guide returns to the backup and the
  trust :math:`\\kappa` is multiplied by ``backoff`` (the retry is smaller);
* *rejected*: no backup to return to and a non-finite loss or update; the guide is kept.

Under :class:`~pyro_scorevi.step_rules.FixedStep` a step is accepted or rejected (non-finite).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

from pyro_scorevi.adaptive import (
    CurvatureState,
    RateState,
    adaptive_update,
    dense_mean_score,
    init_curvature,
    init_rates,
    refresh_curvature,
    settled_precision,
    update_curvature,
)
from pyro_scorevi.proximal import ScoreStatistics, diagonal_proximal_update
from pyro_scorevi.step_rules import (
    AdaptiveStep,
    FixedStep,
    StepRule,
    at_largest_step,
    cap_release,
    floor_decay,
    initial_noise,
    largest_frequency,
    loss_ceiling,
    noise_average,
    progress_means,
    should_restart,
    steps_above_ceiling,
)

__all__ = [
    "DiagonalState",
    "StepInfo",
    "init",
    "update",
    "state_from_dict",
    "uses_dense_metric",
]


class DiagonalState(NamedTuple):
    """Everything a diagonal step needs to continue exactly (``state_dict`` carries it).

    Attributes:
        loc, scale: the current iterate :math:`(m_t, s_t)`, flat.
        rates: the :class:`~pyro_scorevi.adaptive.RateState` (``None`` under ``FixedStep``).
        trust: :math:`\\kappa \\in (0, 1]`, scales rates and trust radii (``AdaptiveStep``).
        backup_loc, backup_scale: the previous accepted iterate (``None`` when there is none,
            e.g. right after a revert).
        backup_loss: the -ELBO estimate of the backup, measured when it was current.
        loss_noise: running mean of :math:`(L_t - L_{t-1})^2/2` over accepted steps, the
            variance of the estimate's step-to-step noise (0 before two accepted steps).
        step: accepted steps so far (the ``t`` of a ``FixedStep`` schedule).
        num_rejected: reverted and rejected steps so far.
        rejected_in_a_row: consecutive reverted or rejected steps.
        loss_fast, loss_slow: running means of the accepted losses (``AdaptiveStep``'s
            progress signal; NaN before the first).
        released: the sum of the cap's ``release`` over the accepted steps.
        curvature: the :class:`~pyro_scorevi.adaptive.CurvatureState` of a guide in the dense
            metric (``AdaptiveStep.dense_max_dim``); ``None`` otherwise.
        largest_frequency: running frequency of the accepted steps that moved some mean by the
            largest trust region (:func:`~pyro_scorevi.step_rules.largest_frequency`); a fit
            that :func:`~pyro_scorevi.step_rules.is_frozen` is reported.
        loss_ceiling: the :func:`~pyro_scorevi.step_rules.loss_ceiling` of ``loss_fast``
            (``inf`` before the first accepted step).
        steps_above_ceiling: the accepted steps in a row with ``loss_fast`` above it; a fit
            that :func:`~pyro_scorevi.step_rules.is_diverging` is reported.
    """

    loc: torch.Tensor
    scale: torch.Tensor
    rates: RateState | None
    trust: float
    backup_loc: torch.Tensor | None
    backup_scale: torch.Tensor | None
    backup_loss: float
    loss_noise: float
    step: int
    num_rejected: int
    rejected_in_a_row: int
    loss_fast: float = math.nan
    loss_slow: float = math.nan
    released: float = 0.0
    curvature: CurvatureState | None = None
    largest_frequency: float = 0.0
    loss_ceiling: float = math.inf
    steps_above_ceiling: int = 0


class StepInfo(NamedTuple):
    """What one :func:`update` did.

    Attributes:
        loss: the -ELBO estimate of the frozen :math:`q_t` (a float).
        accepted: the guide moved to a new iterate (model params may step too).
        reverted: the guide returned to the previous iterate.
    """

    loss: float
    accepted: bool
    reverted: bool


def state_from_dict(fields: dict) -> DiagonalState:
    """The :class:`DiagonalState` of ``state._asdict()`` (its ``rates`` a plain tuple after a
    round trip through ``torch.save``)."""
    fields = dict(fields)
    rates = fields["rates"]
    if rates is not None:
        rates = tuple(rates)
        if len(rates) == len(RateState._fields) - 2:
            # Saved before the variance ratio's running moments (variance_ratio_memory): they
            # start again from 0, as in a fresh fit.
            rates = rates + (torch.zeros_like(rates[0]), torch.zeros_like(rates[0]))
        if len(rates) != len(RateState._fields):
            raise ValueError(
                f"state_dict holds {len(rates)} step-rule statistics per coordinate, this "
                f"release keeps {len(RateState._fields)} ({', '.join(RateState._fields)}); it "
                "was saved by another version of pyro_scorevi: refit, or load it with that "
                "version."
            )
        fields["rates"] = RateState(*rates)
    if fields.get("curvature") is not None:
        fields["curvature"] = CurvatureState(*fields["curvature"])
    return DiagonalState(**fields)


def init(
    loc: torch.Tensor, scale: torch.Tensor, rule: StepRule, dense: bool = False
) -> DiagonalState:
    """The state at a guide's current ``(loc, scale)``; ``dense``: the guide steps in the dense
    metric (see :func:`uses_dense_metric`)."""
    rates = init_rates(loc, rule) if isinstance(rule, AdaptiveStep) else None
    curvature = init_curvature(loc) if dense else None
    return DiagonalState(
        loc, scale, rates, 1.0, None, None, math.nan, 0.0, 0, 0, 0, curvature=curvature
    )


def uses_dense_metric(rule: StepRule, dim: int) -> bool:
    """Whether a diagonal guide of ``dim`` coordinates steps in the dense metric (an
    ``AdaptiveStep`` with ``dense_max_dim >= dim``)."""
    return isinstance(rule, AdaptiveStep) and rule.uses_dense_metric(dim)


def update(
    state: DiagonalState,
    stats: ScoreStatistics,
    loss: float,
    rule: StepRule,
    moments: torch.Tensor | None = None,
) -> tuple[DiagonalState, StepInfo]:
    """One step from ``state``, given the statistics and -ELBO estimate of its iterate.

    ``moments``: the particle means of :math:`\\hat g\\delta^\\top` and
    :math:`\\delta\\delta^\\top` stacked ``(2d, d)``, for a state with a ``curvature``
    (the dense metric); a finite step adds them to it, whether it is accepted or reverted.
    """
    finite_stats = bool(torch.stack([torch.isfinite(s).all() for s in stats]).all())
    finite = finite_stats and math.isfinite(loss)
    if isinstance(rule, FixedStep):
        return _fixed_update(state, stats, loss, finite, rule)
    dense = state.curvature is not None
    release = float(
        cap_release(rule, state.loss_fast, state.loss_slow, state.loss_noise, state.step, np)
    )
    if dense and finite and moments is not None and bool(torch.isfinite(moments).all()):
        restart = bool(should_restart(rule, state.curvature.restarted, release, state.trust, np))
        state = state._replace(
            curvature=update_curvature(state.curvature, moments, stats, rule, restart)
        )
    if state.backup_loc is not None:
        tolerance = (
            rule.revert_tolerance * abs(state.backup_loss)
            + rule.revert_noise * math.sqrt(state.loss_noise)
            + 1.0
        )
        if not finite or loss > state.backup_loss + tolerance:
            reverted = state._replace(
                loc=state.backup_loc,
                scale=state.backup_scale,
                backup_loc=None,
                backup_scale=None,
                trust=_backed_off(state.trust, rule),
            )
            return _failed(reverted), StepInfo(loss, False, True)
    if not finite:
        return _rejected(state, loss, rule)
    curvature, precision = state.curvature, None
    if dense:  # the refreshed factors are kept only if the step is accepted
        curvature = refresh_curvature(curvature, state.scale, rule)
        score = dense_mean_score(curvature, stats.mean_score)
        if score is not None:
            stats = stats._replace(mean_score=score)
        if rule.settled_scale_rate > 0:  # opt-in: nothing to compute on the default step
            precision = settled_precision(curvature)
    new_loc, new_scale, rates, _ = adaptive_update(
        state.loc,
        state.scale,
        stats,
        state.rates,
        state.trust,
        rule,
        release,
        floor_decay(rule, state.released),
        apply_variance_ratio=not dense,
        precision=precision,
    )
    if not bool(torch.isfinite(new_loc).all() & torch.isfinite(new_scale).all()):
        return _rejected(state, loss, rule)
    at_largest = at_largest_step(
        rule, rates.last_mean_step, rates.mean_radius, state.trust, state.scale, new_scale, torch
    ).any()
    noise = state.loss_noise
    with np.errstate(over="ignore", invalid="ignore"):
        if state.backup_loc is not None:  # two accepted losses in a row: one noise sample
            noise = float(noise_average(noise, loss, state.backup_loss, np))
        elif state.step == 0:  # no noise sample yet
            noise = float(initial_noise(loss, np))
    fast, slow = (
        float(v) for v in progress_means(rule, state.loss_fast, state.loss_slow, loss, np, noise)
    )
    ceiling = float(loss_ceiling(state.loss_ceiling, fast, noise, np))
    new_state = state._replace(
        loc=new_loc,
        scale=new_scale,
        rates=rates,
        trust=min(1.0, state.trust * rule.recovery),
        backup_loc=state.loc,
        backup_scale=state.scale,
        backup_loss=loss,
        loss_noise=noise,
        step=state.step + 1,
        rejected_in_a_row=0,
        loss_fast=fast,
        loss_slow=slow,
        released=state.released + release,
        curvature=curvature,
        largest_frequency=float(largest_frequency(state.largest_frequency, float(at_largest))),
        loss_ceiling=ceiling,
        steps_above_ceiling=int(steps_above_ceiling(state.steps_above_ceiling, fast, ceiling, np)),
    )
    return new_state, StepInfo(loss, True, False)


def _fixed_update(state, stats, loss, finite, rule: FixedStep):
    weight, scale_weight = (float(w) for w in rule.weights(state.step))
    for name, value in (("prox_weight", weight), ("scale_prox_weight", scale_weight)):
        if not value > 0:
            raise ValueError(
                f"{name} must be positive at every step (got {value!r} at step {state.step}); "
                f"check the schedule passed as {name}."
            )
    if finite:
        new_loc, new_scale = diagonal_proximal_update(
            state.loc, state.scale, stats, weight, rule.num_alternations, scale_weight
        )
        finite = bool(
            torch.isfinite(new_loc).all() & torch.isfinite(new_scale).all() & (new_scale > 0).all()
        )
    if not finite:
        return _failed(state), StepInfo(loss, False, False)
    new_state = state._replace(
        loc=new_loc, scale=new_scale, step=state.step + 1, rejected_in_a_row=0
    )
    return new_state, StepInfo(loss, True, False)


#: Floor of the trust kappa: ten halvings. Lower, a streak of failures would leave steps so
#: small that recovering (x recovery per accepted step) took hundreds of steps.
MIN_TRUST = 2.0**-10


def _backed_off(trust: float, rule: AdaptiveStep) -> float:
    return max(MIN_TRUST, trust * rule.backoff)


def _rejected(state: DiagonalState, loss: float, rule: AdaptiveStep):
    """A failed step with nothing to revert to: the guide is kept and the trust backs off."""
    return _failed(state._replace(trust=_backed_off(state.trust, rule))), StepInfo(
        loss, False, False
    )


def _failed(state: DiagonalState) -> DiagonalState:
    return state._replace(
        num_rejected=state.num_rejected + 1, rejected_in_a_row=state.rejected_in_a_row + 1
    )
