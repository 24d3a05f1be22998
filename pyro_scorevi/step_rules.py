"""Step rules of the closed-form diagonal step: how far each proximal step may move the guide.

Backend-agnostic (no torch, no jax): small frozen dataclasses, validated at construction, that
both backends read. Linearised around :math:`q_t`, the closed form moves each mean by the
fraction :math:`\\eta_m = 2/(\\lambda + 2)` of a natural-gradient (Newton) step and each
log-precision by :math:`\\eta_s = 4/(\\lambda_s + 4)` of its Stein target, so the proximal
weights are inverse rates.

* :class:`AdaptiveStep` (the default): per-coordinate rates that follow the agreement of
  successive step directions, Newton steps in the draws' estimate of the target's variance
  while the loss falls, a per-coordinate trust region, bounded scales and revert-and-retry on
  a failed step. Nothing to tune.
* :class:`FixedStep`: the paper's step with a fixed weight :math:`\\lambda` (or a schedule), the
  behaviour of ``prox_weight=`` before the adaptive rule.

Every constant of :class:`AdaptiveStep` carries the measurement behind it; the full record is
``docs/algorithm.md`` ("The adaptive step").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pyro_scorevi import defaults
from pyro_scorevi.schedules import ProxWeight, as_schedule

__all__ = [
    "AdaptiveStep",
    "FixedStep",
    "StepRule",
    "cap_release",
    "floor_decay",
    "initial_noise",
    "noise_average",
    "progress_means",
    "release_threshold",
    "should_restart",
    "at_largest_step",
    "largest_frequency",
    "is_frozen",
    "is_diverging",
    "loss_ceiling",
    "steps_above_ceiling",
    "resolve_step_rule",
]


@dataclass(frozen=True)
class AdaptiveStep:
    """The default step rule: noise-adaptive rates, a trust region and revert-on-failure.

    Per coordinate :math:`j`, with :math:`\\operatorname{sign}` of the step's proposal (the mean's
    natural-gradient direction :math:`\\bar\\delta_j + s_j^2\\bar g_j`, the log-precision's
    Stein direction :math:`\\log(-\\overline{\\delta g}_j/\\overline{\\delta^2}_j) + \\log s_j^2`):

    .. math::

        a_j \\leftarrow a_j + (\\operatorname{sign}_j - a_j)/\\tau_j, \\qquad
        \\rho_j = a_j^2, \\qquad
        \\tau_j \\leftarrow \\max(\\tau_{\\min}, (1 - \\rho_j)\\,\\tau_j + 1),

    the memory rule of vSGD (Schaul et al. 2013) on the *signs* (magnitudes change by orders of
    magnitude far from the mode; signs do not). :math:`\\rho_j \\approx 1` while the steps agree
    (far from the optimum) and :math:`\\approx 1/(2\\tau_j)` once they are noise, where
    :math:`\\tau_j` grows by 1/2 a step: the rate then falls like :math:`1/t` (Robbins-Monro),
    removing the noise floor of a fixed weight. The rates
    :math:`\\eta_{m,j} = \\kappa\\,\\eta_m^{\\max}\\rho_{m,j}`,
    :math:`\\eta_{s,j} = \\kappa\\,\\eta_s^{\\max}\\rho_{s,j}` (means and scales on their own
    timescales) give the weights :math:`\\lambda_j = 2/\\eta_{m,j} - 2`,
    :math:`\\lambda_{s,j} = 4/\\eta_{s,j} - 4` of one (precision, mean) alternation of the closed
    form. The step is then clamped to a trust region: the mean moves at most
    :math:`\\kappa r_j \\min(s_{t,j}, s_{t+1,j})` and the log-scale at most :math:`\\kappa u_j`,
    where the radii :math:`r_j, u_j` grow by ``radius_growth`` while successive steps agree and
    shrink by ``radius_shrink`` when they reverse (Rprop, Riedmiller and Braun 1993). A step whose
    loss is not finite, or that worsens the free -ELBO estimate by more than
    ``revert_tolerance`` (relative) plus ``revert_noise`` standard deviations of its mini-batch
    noise, is reverted to the previous iterate and :math:`\\kappa` (the trust, at most 1) is
    multiplied by ``backoff``; accepted steps restore it by ``recovery``.

    One alternation, not two: the second couples the precision to the squared mean step, which
    far from the mode (large scores) multiplies the precision by about :math:`1/\\eta_m` per step
    and froze a raw-scale regression with every scale at 1e-5 (``docs/algorithm.md``).

    Args:
        max_mean_rate: :math:`\\eta_m^{\\max}`, the largest fraction of a Newton step for the means.
        max_scale_rate: :math:`\\eta_s^{\\max}`, the largest rate of the log-precisions.
        initial_memory: :math:`\\tau_0`; rates start near :math:`\\eta^{\\max}/\\tau_0^2` and reach
            :math:`\\eta^{\\max}` after about :math:`\\tau_0` agreeing steps (a warm-up).
        min_memory: :math:`\\tau_{\\min} \\ge 2` (with 1 the average would be the last sign alone).
        min_rate: floor of both rates (keeps the weights finite).
        initial_mean_radius, max_mean_radius, min_mean_radius: the mean's trust radius
            :math:`r_j` in standard deviations of :math:`q`.
        max_log_scale_step: :math:`u`, the log-scale's trust radius (a factor :math:`e^{u}`
            per step at most).
        radius_growth, radius_shrink: Rprop factors of the radii.
        revert_tolerance, revert_noise: a step is reverted when the next -ELBO estimate exceeds
            the previous one by more than ``revert_tolerance * |loss| + revert_noise * sd + 1``,
            where sd is a running estimate of the estimate's step-to-step noise.
        backoff, recovery: factors of the trust :math:`\\kappa` after a reverted or rejected
            step, and after an accepted one (capped at 1).
        mean_rate_floor: the least :math:`\\eta_{m,j}/\\kappa` of the means (not of the scales):
            where the step signs are noise the means still move at this fraction of a Newton
            step, a noise floor of about :math:`\\sqrt{\\eta/2}` posterior sds at the mode.
        scale_to_mean_rate: the scales' rate is at most this multiple of the mean rate, so that
            the scales of a network wait for their means. The mean rate in this cap is the
            sign rule's, unfloored, while the loss falls, and at least ``release *
            mean_rate_floor`` once it has stopped falling.
        release_noise, progress_fast_memory, progress_slow_memory: running means :math:`F, S`
            of the accepted losses with memories :math:`\\tau_f, \\tau_s` measure the progress
            :math:`S - F` (positive while the loss falls); with :math:`\\sigma^2` the loss's
            step-to-step noise, ``release`` :math:`= \\operatorname{clip}(1 - (S - F) /
            (z\\,\\sigma/\\sqrt{2\\tau_f}), 0, 1)` after :math:`\\tau_s` accepted steps
            (0 before), :math:`z` = ``release_noise``; ``release_noise=0`` keeps the cap always.
        progress_bound: :math:`B`; after each accepted step :math:`S` is lowered to at most
            :math:`F + B z\\sigma/\\sqrt{2\\tau_f}`, so that the progress never reads more than
            :math:`B` release thresholds: the slow mean forgets a huge start (a loss of 1e6 at
            the first step and 700 at the mode) within :math:`\\tau_s \\ln B` steps of the loss
            having stopped falling, not :math:`\\tau_s \\ln(L_0/\\sigma)`. A loss falling at a
            steady rate below the bound is read as before. ``inf`` keeps the plain running mean
            (the previous release).
        max_variance_ratio: :math:`M \\ge 1`; the mean's closed-form step is multiplied by
            :math:`1 + (\\operatorname{clip}(\\hat v_j / s_j^2, 1, M) - 1)(1 - \\text{release})`,
            where :math:`\\hat v_j = \\mathrm{Var}\\,\\delta_j / (-\\mathrm{Cov}(\\delta_j,
            \\hat g_j))` is the Stein estimate of the target's variance from the draws (exact
            on a Gaussian; its moments averaged over ``variance_ratio_memory`` steps): a Newton
            step in the larger of the guide's and the target's variance while the loss falls,
            the guide's once it has stopped. ``1`` turns it off.
        variance_ratio_memory: :math:`\\tau_v \\ge 1`; the two moments of :math:`\\hat v_j`
            are running means (factor :math:`1/\\tau_v`, from 0) over the steps of
            :math:`\\mathrm{Var}\\,\\delta_j / s_j^2` and :math:`-\\mathrm{Cov}(\\delta_j,
            \\hat g_j) / s_j^2` (each about stationary while :math:`s_j` moves), so that
            :math:`\\hat v_j / s_j^2` is the ratio of the two means over the current
            :math:`s_j^2`, not one step's noisy quotient. ``1`` is the step's own moments
            (the previous release).
        dense_max_dim: on a guide of at most this many coordinates (and no latents local to a
            subsampled plate), the means step in the draws' dense curvature instead of their
            own: with :math:`C_{g\\delta}, C_{\\delta\\delta}` running means (memory
            :math:`\\max(` ``dense_min_memory``, ``dense_memory`` :math:`\\cdot d)` steps) of
            the step's :math:`\\mathrm{Cov}(\\hat g, \\delta)` and
            :math:`\\mathrm{Cov}(\\delta)`, :math:`\\hat H = -C_{g\\delta}
            C_{\\delta\\delta}^{-1}` (symmetrised; Stein's identity, exact on a Gaussian) and
            :math:`A = D^{1/2}\\hat H D^{1/2} = V\\Lambda V^\\top` (:math:`D =
            \\operatorname{diag} s^2`), the mean's score :math:`\\bar g` becomes
            :math:`D^{-1/2} V\\Lambda^{-1}V^\\top D^{1/2}\\bar g`, so the step
            :math:`\\eta\\,s^2\\bar g` is :math:`\\eta\\hat H^{-1}\\bar g`, a Newton step
            along the ridges of a correlated posterior (the diagonal step is :math:`A = I`).
            Eigenvalues below ``dense_min_eigenvalue`` are raised to it (a step at most
            :math:`1/` ``dense_min_eigenvalue`` times the guide's variance along any
            direction), non-positive ones set to 1 (the guide's own metric); the
            eigendecomposition is refreshed every :meth:`dense_refresh_steps` averaged steps.
            The variance ratio (``max_variance_ratio``) is not applied to such a guide. ``0``
            turns it off.
        dense_memory, dense_min_memory: the memory of the running curvature, in steps per
            coordinate and at least; the dense metric starts once that many steps are averaged.
        dense_min_eigenvalue: the floor of :math:`\\Lambda`, in ``(0, 1]``.
        dense_restart: the running curvature starts again once, at the first step the loss has
            stopped falling (``release > 0``) with the trust fully recovered (so not at a noisy,
            overflowing start that merely reads as flat): far from the mode the curvature can
            be orders of magnitude larger than at it, and a running mean over
            :math:`\\tau` steps forgets a factor :math:`F` only after :math:`\\tau \\ln F`.
            The last factors stay in use until the memory is full again. ``False`` is the
            previous release.
        settled_scale_rate: on a guide in the dense metric, once the loss has stopped falling,
            each log-precision's Stein target :math:`-\\mathrm{Cov}(\\delta_j, \\hat g_j) /
            \\mathrm{Var}\\,\\delta_j` is replaced, by the fraction ``release``, with the
            running curvature's diagonal :math:`\\hat H_{jj}`: the precision of the mean-field
            fixed point, :math:`\\mathbb E_q[-\\partial_j^2 \\log p]`, without the noise of the
            other coordinates that each step's ratio carries (the regression on every offset
            removes it; exact on a Gaussian target). The scales move toward it at a rate of at
            least ``release`` :math:`\\cdot\\,\\kappa\\,\\cdot` ``settled_scale_rate``, past
            the cap of ``scale_to_mean_rate``. ``0`` keeps each step's own
            target (the previous release). Guarded by ``settled_band``, by ``dense_restart``,
            and with the cap lifted where the guide is narrower than the settled precision by
            more than the band (``docs/algorithm.md``, item 6).
        settled_band: the settled precision replaces a coordinate's target only where it lies
            within a factor ``settled_band`` of the guide's precision, :math:`1/b \\le \\hat
            H_{jj} s_j^2 \\le b`: a noise filter near the fixed point, never a jump. The
            running curvature remembers the steps of about ``dense_memory`` times ``d`` steps
            back, and on a scale parameter whose curvature fell by orders of magnitude on the
            way it is stale. ``inf`` lifts the guard.
        floor_memory: :math:`\\tau_r`; the means' floor is ``mean_rate_floor`` times
            :math:`\\tau_r/(\\tau_r + R)`, :math:`R` the sum of ``release`` so far: the full floor
            while the loss falls, a :math:`1/t` decay once it has stopped (no noise floor at the
            mode of a subsampled posterior).

    Reference: the measurements behind each default are in ``docs/algorithm.md``.
    """

    #: 0.5: a half Newton step at most. 1.0 gave the same fits on the posterior benchmark but
    #: oscillated on the raw-scale regressions until the trust region caught it.
    max_mean_rate: float = 0.5
    max_scale_rate: float = 0.5
    #: 10 steps of warm-up: a tiny first move while the direction statistics are young
    #: (rates start at about 0.5 / 100).
    initial_memory: float = 10.0
    min_memory: float = 2.0
    max_memory: float = float("inf")
    min_rate: float = 1e-4
    num_alternations: int = 1
    scale_to_mean_rate: float = 0.5
    #: 0.01: the means keep learning at 1% of a Newton step where their step signs are noise.
    #: On a network trained from scratch the per-coordinate signs are noise from step ~100 on
    #: (median agreement 1e-3 on the digits ViT), yet the sum of the steps still makes progress,
    #: as SGD's does; without a floor the rate fell to about 5e-4 and the ViT learned on one
    #: seed of three (accuracy 0.18-0.64). With 0.01 (and the decay of ``floor_memory``) it
    #: learns on all three in NumPyro, the MLP's NLL falls from 0.156 to 0.135 and logreg's mean
    #: error from 0.34 to 0.21 sd (3 seeds, NumPyro, ``docs/results.md``); the posterior suite
    #: passes the same 11 of 14 (``docs/algorithm_sweeps.md``, "The means' floor and the
    #: progress signal").
    mean_rate_floor: float = 0.01
    momentum: float = 0.0
    #: 3: while the loss falls the means step with up to 3x the guide's variance where the
    #: draws' curvature says the target is wider. On the digits ViT (init_scale 0.01, scales
    #: held by the cap) the means otherwise crawl at s^2 g: NumPyro test NLL 1.05 / 1.40 / 1.08
    #: over seeds 0-2 became 0.69 / 0.81 / 0.94 (Trace_ELBO 0.82 / 0.66 / 1.01), the MLP's
    #: 0.130 / 0.143 / 0.132 became 0.120 / 0.130 / 0.118, and the posterior suite's median
    #: error fell from 0.24 to 0.20 sd (NumPyro stackloss 3.16 -> 2.85, diabetes 1.79 -> 1.48;
    #: the scales of a small subsampled model converge later, see the sweep). 10 broke the
    #: subsampled regression's noise at the mode unless gated and cost the MLP 0.04 of NLL
    #: (``docs/algorithm_sweeps.md``, "The means' metric"). The suite figures predate the dense
    #: metric, which replaces the ratio on guides of at most ``dense_max_dim`` coordinates.
    max_variance_ratio: float = 3.0
    #: 10 steps: the two-draw quotient of a single step is heavy-tailed, and the clip at M
    #: passed its noise on to the step. Same seeds and starts (``docs/algorithm_sweeps.md``,
    #: "The variance ratio's memory"): the digits MLP's NLL / ECE over six NumPyro seeds 0.128
    #: / 0.047 against 0.132 / 0.054 with each step's own moments; sunspots' CRPS 10.80 against
    #: 10.98 (Pyro) and 10.98 against 11.13 (NumPyro); the digits ViT level within its noise
    #: (NLL over 24 fits, both backends from both backends' ``init_to_median`` starts, 0.89
    #: against 0.91; the worst 1.50 against 1.58). Guides in the dense metric (at most
    #: ``dense_max_dim`` coordinates) take no variance ratio and are unchanged.
    variance_ratio_memory: float = 10.0
    #: 200 coordinates: the running d x d curvature costs O(d^2) memory and a d x d
    #: eigendecomposition every max(1, d // 32) steps (the comparison's networks, d > 4000, keep
    #: the diagonal step). On the posterior suite's ridges (NumPyro, seeds 0-2, 3000
    #: evaluations) the mean error fell from 5.38 to 2.73 NUTS sds on cancer-logreg-raw
    #: (radius/perimeter correlated at 0.998), from 2.85 to 0.53 on stackloss-interact and from
    #: 1.48 to 0.06 on diabetes-raw; the suite passes 14 of 14 in each backend (11 before) and
    #: logreg's mean error fell from 0.19 to 0.13 (``docs/algorithm_sweeps.md``, "The dense
    #: metric of small guides").
    dense_max_dim: int = 200
    #: 2 steps per coordinate, at least 10: 4 and 8 per coordinate lagged behind a curvature
    #: that changes along the path (a noise sd learned at the same time rescales every
    #: coefficient's curvature) and left diabetes-raw at 2.6-3.3 sds.
    dense_memory: float = 2.0
    dense_min_memory: float = 10.0
    #: 0.03: along a ridge the step is at most 33 times the guide's variance; 1e-3 gave larger
    #: seed-to-seed swings (cancer-logreg-raw 0.03-1.08, diabetes-raw 1.0-5.3), 0.1 crept
    #: (cancer 2.1-3.6).
    dense_min_eigenvalue: float = 0.03
    #: True. On the Nile local level model the diagonal of the running curvature of
    #: ``sigma_level`` was still 3.6e5 times its mean-field precision at step 1250 (a memory of
    #: steps 0-250, where the loss was 2e5); restarted (seed 1) both variance parameters'
    #: diagonals are within 4% of the guide's precisions by step 1000, and the hold-out probe's
    #: least sd / mean-field sd went from 0.018 (seed 1, with ``progress_bound``) to 0.55.
    #: At the first release alone
    #: (the trust not required) it came during poisson-raw's overflowing NumPyro start, and 1 of
    #: 5 perturbed starts of seed 0 converged (3 of 5 with the previous release, 4 of 5 now).
    dense_restart: bool = True
    #: 0.02. The dense Gaussian's KL gap at 1000 evaluations fell from 0.039 / 0.036 to
    #: 0.0021 / 0.0041 (Pyro / NumPyro, 3 seeds; ``Trace_ELBO`` 0.241 / 0.135); rates of 0.1
    #: and more follow the refresh-to-refresh noise of the diagonal, 0.005 and less leave the
    #: scales to the sign rule. It became the default with ``settled_band`` and
    #: ``dense_restart``: without them it collapsed the sds of the Nile local level model's
    #: variance parameters (NumPyro seed 2: 0.3% and 1.8% of the mean-field ideal;
    #: ``docs/algorithm_sweeps.md``, "The settled precision of small guides").
    settled_scale_rate: float = 0.02
    #: 2. On the Nile local level model (NumPyro, seed 2, ``settled_scale_rate=0.02``) the
    #: running diagonal of ``sigma_level`` was still 3.6e5 times its mean-field precision 250
    #: steps before the end, a memory of the start, and without the guard the sds of both
    #: variance parameters collapsed (0.3% and 1.8% of the mean-field ideal, a full-data -ELBO
    #: of 744 against 660); with it they end at 0.95 and 0.96 (-ELBO 660) and the dense
    #: Gaussian keeps its gain (KL gap at 1000 evaluations 0.0029-0.0085, as 0.0024-0.0106
    #: without; ``docs/algorithm_sweeps.md``, "The settled precision of small guides").
    settled_band: float = 2.0
    #: 4: the cap on the scales (``scale_to_mean_rate``) is lifted by a loss that has stopped
    #: falling (its progress below 4 standard errors). On logreg the scales then reach the
    #: mean-field optimum's (log-sd bias -0.55 against -0.98 held by the cap) while the
    #: digits MLP, still falling at 3000 evaluations, keeps its cap (``docs/algorithm_sweeps.md``).
    release_noise: float = 4.0
    progress_fast_memory: float = 10.0
    progress_slow_memory: float = 100.0
    #: 10. Without it the release of the hold-out probe's local level model in Pyro summed to 2
    #: over 1500 steps (the slow mean 2.3e6 at step 300 against a loss of 656): the scales
    #: stayed capped. With it a scale collapsed far from the mode (Longley, NumPyro seed 2:
    #: 0.2% of the mean-field ideal at step 375) is released, and the suite, the hold-out
    #: probe and the networks are otherwise level (MLP NLL 0.148 / 0.128 / 0.125, ViT 1.21 /
    #: 1.58 / 0.69 against 0.148 / 0.127 / 0.125 and 1.18 / 1.58 / 0.69; Pyro, seeds 0-2).
    progress_bound: float = 10.0
    #: 300: a subsampled regression (N/B = 47) ends within 0.3 posterior sds (0.4-1.3 with the
    #: floor never decaying, 0.2 with 100) and logreg's mean error is 0.21 sd (0.29 with 100,
    #: 0.15 never decaying; ``docs/algorithm_sweeps.md``).
    floor_memory: float = 300.0
    initial_mean_radius: float = 1.0
    #: 1e4 sds: a coefficient 1000s of posterior sds from its start (raw-scale predictors)
    #: gets there in tens of agreeing steps (growth 1.5 per step).
    max_mean_radius: float = 1e4
    min_mean_radius: float = 1.0
    #: a scale changes by at most a factor e (x 2.7) per step.
    max_log_scale_step: float = 1.0
    radius_growth: float = 1.5
    radius_shrink: float = 0.5
    revert_tolerance: float = 0.1
    revert_noise: float = 4.0
    backoff: float = 0.5
    recovery: float = 1.15

    def dense_memory_steps(self, dim: int) -> float:
        """The memory (in steps) of the running curvature of a ``dim``-coordinate guide."""
        return max(self.dense_min_memory, self.dense_memory * dim)

    def dense_refresh_steps(self, dim: int) -> int:
        """Averaged steps between two eigendecompositions of the running curvature of a
        ``dim``-coordinate guide: every step below 64 coordinates, every ``dim // 32`` above
        (a 64th of the memory of 2d steps; the eigendecomposition dominates a small NumPyro
        model's step, ``docs/posterior_suite.md``, "Cost")."""
        return max(1, dim // 32)

    def uses_dense_metric(self, dim: int) -> bool:
        """Whether a guide of ``dim`` coordinates steps in the dense metric."""
        return 0 < dim <= self.dense_max_dim

    def __post_init__(self):
        for name in (
            "max_mean_rate",
            "max_scale_rate",
            "min_rate",
            "initial_mean_radius",
            "max_mean_radius",
            "min_mean_radius",
            "max_log_scale_step",
            "radius_growth",
            "revert_tolerance",
            "revert_noise",
            "recovery",
        ):
            _check_positive(name, getattr(self, name))
        for name in ("max_mean_rate", "max_scale_rate"):
            if getattr(self, name) > 1:
                raise ValueError(
                    f"{name} must satisfy 0 < {name} <= 1 (got {name} = {getattr(self, name)}); "
                    "it is a fraction of a Newton step."
                )
        if self.min_rate >= min(self.max_mean_rate, self.max_scale_rate):
            raise ValueError(
                f"min_rate must be below max_mean_rate and max_scale_rate (got min_rate = "
                f"{self.min_rate})."
            )
        floor = self.mean_rate_floor
        if (
            isinstance(floor, bool)
            or not isinstance(floor, (int, float))
            or not (0 <= floor <= self.max_mean_rate)
        ):
            raise ValueError(
                f"mean_rate_floor must satisfy 0 <= mean_rate_floor <= max_mean_rate (got "
                f"mean_rate_floor = {floor!r}, max_mean_rate = {self.max_mean_rate}); 0 turns "
                "the floor off."
            )
        if isinstance(self.release_noise, bool) or not self.release_noise >= 0:
            raise ValueError(
                f"release_noise must satisfy release_noise >= 0 (got {self.release_noise!r}); "
                "0 keeps the scales' cap on for the whole fit."
            )
        _check_positive("floor_memory", self.floor_memory)
        if (
            isinstance(self.dense_max_dim, bool)
            or not isinstance(self.dense_max_dim, int)
            or self.dense_max_dim < 0
        ):
            raise ValueError(
                f"dense_max_dim must be an int >= 0 (got {self.dense_max_dim!r}); 0 keeps every "
                "guide on the diagonal metric."
            )
        _check_positive("dense_memory", self.dense_memory)
        if isinstance(self.dense_min_memory, bool) or not self.dense_min_memory >= 1:
            raise ValueError(
                f"dense_min_memory must satisfy dense_min_memory >= 1 (got "
                f"{self.dense_min_memory!r})."
            )
        rate = self.settled_scale_rate
        if (
            isinstance(rate, bool)
            or not isinstance(rate, (int, float))
            or not 0 <= rate <= self.max_scale_rate
        ):
            raise ValueError(
                f"settled_scale_rate must satisfy 0 <= settled_scale_rate <= max_scale_rate (got "
                f"settled_scale_rate = {rate!r}, max_scale_rate = {self.max_scale_rate}); 0 keeps "
                "each step's own precision target."
            )
        if not isinstance(self.dense_restart, bool):
            raise TypeError(
                f"dense_restart must be a bool (got {self.dense_restart!r}); e.g. "
                "dense_restart=True."
            )
        _check_at_least_one("settled_band", self.settled_band, "2.0", "no guard")
        floor = self.dense_min_eigenvalue
        if isinstance(floor, bool) or not isinstance(floor, (int, float)) or not 0 < floor <= 1:
            raise ValueError(
                f"dense_min_eigenvalue must satisfy 0 < dense_min_eigenvalue <= 1 (got "
                f"{floor!r}); e.g. dense_min_eigenvalue=0.03."
            )
        ratio = self.max_variance_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not ratio >= 1:
            raise ValueError(
                f"max_variance_ratio must satisfy max_variance_ratio >= 1 (got {ratio!r}); 1 "
                "keeps the mean's step in the guide's own variance."
            )
        memory = self.variance_ratio_memory
        if (
            isinstance(memory, bool)
            or not isinstance(memory, (int, float))
            or not 1 <= memory < float("inf")
        ):
            raise ValueError(
                f"variance_ratio_memory must satisfy 1 <= variance_ratio_memory < inf (got "
                f"{memory!r}); e.g. variance_ratio_memory=10.0, or 1 for each step's own moments."
            )
        _check_at_least_one("progress_bound", self.progress_bound, "10.0", "the plain running mean")
        if not 1 <= self.progress_fast_memory < self.progress_slow_memory:
            raise ValueError(
                "the progress memories must satisfy 1 <= progress_fast_memory < "
                f"progress_slow_memory (got {self.progress_fast_memory}, "
                f"{self.progress_slow_memory})."
            )
        if not isinstance(self.min_memory, (int, float)) or self.min_memory < 2:
            raise ValueError(f"min_memory must satisfy min_memory >= 2 (got {self.min_memory!r}).")
        if self.initial_memory < self.min_memory:
            raise ValueError(
                f"initial_memory must satisfy initial_memory >= min_memory (got initial_memory = "
                f"{self.initial_memory}, min_memory = {self.min_memory})."
            )
        for name in ("radius_shrink", "backoff"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
                raise ValueError(f"{name} must satisfy 0 < {name} < 1 (got {name} = {value!r}).")
        if self.recovery < 1 or self.radius_growth < 1:
            raise ValueError(
                f"recovery and radius_growth must be >= 1 (got recovery = {self.recovery}, "
                f"radius_growth = {self.radius_growth})."
            )
        if not self.min_mean_radius <= self.initial_mean_radius <= self.max_mean_radius:
            raise ValueError(
                "the mean radii must satisfy min_mean_radius <= initial_mean_radius <= "
                f"max_mean_radius (got {self.min_mean_radius}, {self.initial_mean_radius}, "
                f"{self.max_mean_radius})."
            )


@dataclass(frozen=True)
class FixedStep:
    """The paper's step: fixed proximal weights (or schedules), no trust region, no revert.

    Args:
        prox_weight: :math:`\\lambda > 0` or a schedule ``step -> lambda`` such as
            :class:`~pyro_scorevi.schedules.PolynomialGrowth`.
        scale_prox_weight: :math:`\\lambda_s`, a separate weight (or schedule) for the scale
            part of the KL; ``None``: ``prox_weight``.
        num_alternations: (precision, mean) alternations of the closed form, at least 1.

    A step whose scores or update are not finite is rejected (the guide is kept), as before the
    adaptive rule.
    """

    prox_weight: ProxWeight = defaults.PROX_WEIGHT
    scale_prox_weight: ProxWeight | None = None
    num_alternations: int = defaults.NUM_ALTERNATIONS

    def __post_init__(self):
        object.__setattr__(self, "prox_weight", as_schedule(self.prox_weight))
        if self.scale_prox_weight is not None:
            weight = as_schedule(self.scale_prox_weight, "scale_prox_weight")
            object.__setattr__(self, "scale_prox_weight", weight)
        value = self.num_alternations
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(
                f"num_alternations must be an int >= 1 (got {type(value).__name__} {value!r})."
            )
        if value < 1:
            raise ValueError(f"num_alternations must satisfy num_alternations >= 1 (got {value}).")

    def weights(self, step: Any) -> tuple[Any, Any]:
        """``(lambda, lambda_s)`` at ``step`` (a Python int or a traced integer)."""
        weight = self.prox_weight(step)
        scale = weight if self.scale_prox_weight is None else self.scale_prox_weight(step)
        return weight, scale


StepRule = AdaptiveStep | FixedStep


def cap_release(rule: AdaptiveStep, fast: Any, slow: Any, noise: Any, accepted_steps: Any, xp):
    """The ``release`` of :class:`AdaptiveStep` in :math:`[0, 1]`: 0 while the loss falls (its
    progress :math:`S - F` above ``release_noise`` standard errors
    :math:`\\sigma/\\sqrt{2\\tau_f}` of the fast mean), 1 once it has stopped falling.

    ``xp`` is the array namespace (``math``-like floats through :mod:`numpy`, or
    :mod:`jax.numpy`), so both backends share one formula.
    """
    if rule.release_noise == 0:
        return xp.zeros(())
    progress = slow - fast
    threshold = release_threshold(rule, noise, xp)
    safe = xp.where(threshold > 0, threshold, 1.0)
    release = xp.where(threshold > 0, xp.clip(1 - progress / safe, 0.0, 1.0), progress <= 0)
    ready = (accepted_steps >= rule.progress_slow_memory) & xp.isfinite(progress)
    return xp.where(ready, release, 0.0)


def floor_decay(rule: AdaptiveStep, released: Any) -> Any:
    """The factor :math:`\\tau_r / (\\tau_r + R)` of ``mean_rate_floor`` (:math:`\\tau_r` =
    ``floor_memory``), where :math:`R` is the
    sum of ``release`` over the accepted steps: 1 while the loss falls, then :math:`\\sim 1/t`
    (Robbins-Monro) once it has stopped, so the floor leaves no noise floor at the mode."""
    return rule.floor_memory / (rule.floor_memory + released)


def release_threshold(rule: AdaptiveStep, noise: Any, xp) -> Any:
    """:math:`z\\,\\sigma/\\sqrt{2\\tau_f}`: ``release_noise`` standard errors of the fast mean."""
    return rule.release_noise * xp.sqrt(noise / (2 * rule.progress_fast_memory))


def should_restart(rule: AdaptiveStep, restarted: Any, release: Any, trust: Any, xp) -> Any:
    """Whether the running curvature starts again now (``dense_restart``): once per fit, at the
    first step with the loss stopped falling (``release > 0``) and the trust fully recovered
    (no rejected step in the last few, so not a noisy start that merely looks flat)."""
    if not rule.dense_restart:
        return False
    return xp.logical_and(xp.logical_not(restarted), (release > 0) & (trust >= 1))


#: A fit is reported frozen once this fraction of its accepted steps, in a running mean over
#: ``FROZEN_MEMORY`` of them, moved a mean by the largest trust region (:func:`at_largest_step`).
#: On the 30 posteriors of the suite and the hold-out probe (seed 0, 1500 steps, both backends)
#: only ``growth-poisson``'s NumPyro start at b = 1.265 reaches it; there, in Pyro, runs of at
#: most 7 such steps alternate with tiny ones, so a count "in a row" would miss it.
FROZEN_FREQUENCY = 0.25
FROZEN_MEMORY = 100


def at_largest_step(rule: AdaptiveStep, step, radius, trust, scale, new_scale, xp) -> Any:
    """Where the mean's accepted ``step`` was clipped at the largest trust region,
    ``max_mean_radius`` scales of :math:`\\min(s_t, s_{t+1})`: a Newton step of more than
    :math:`10^4` posterior sds, i.e. a point so far from the mode (an exp link far out) that
    the local curvature has shrunk the guide below any useful step. A fit that stays there is
    frozen, with every step accepted."""
    largest = 0.99 * trust * rule.max_mean_radius * xp.minimum(scale, new_scale)
    return (radius >= rule.max_mean_radius) & (xp.abs(step) >= largest)


def largest_frequency(frequency: Any, at_largest: Any) -> Any:
    """The running frequency (memory ``FROZEN_MEMORY`` accepted steps) of the steps where
    :func:`at_largest_step` holds for some coordinate (``at_largest``: a boolean scalar)."""
    return frequency + (at_largest - frequency) / FROZEN_MEMORY


def is_frozen(frequency: float, step: int) -> bool:
    """Whether a fit of ``step`` accepted steps reads as frozen: at least ``FROZEN_MEMORY`` of
    them, and a :func:`largest_frequency` of ``FROZEN_FREQUENCY`` or more."""
    return step >= FROZEN_MEMORY and frequency >= FROZEN_FREQUENCY


#: A fit is reported diverging once the running mean of its accepted losses (:math:`F`, memory
#: ``progress_fast_memory``) has stayed above :math:`F^* + R(|F^*| + 4\sigma^* + 1)` for
#: ``DIVERGED_STEPS`` accepted steps in a row, :math:`F^*` its least value so far and
#: :math:`\sigma^*` the loss's noise sd then, :math:`R` = 10: a rise of ten times the loss's own
#: size and noise that no noisy fit near its optimum makes (the -ELBO's expectation is least at
#: the optimum, and :math:`F` averages 10 losses). The wide raw-scale regressions of
#: ``benchmarks/experiments/wide_regression.py`` (P = 250) rose from about 1e5 to 1e16-1e19,
#: 1.8e6-3e7 posterior sds away, without a word from either backend; the posterior suite and
#: the comparison's problems never reach the ceiling.
DIVERGED_RISE = 10.0
#: 100 steps: the hold-out probe's raw-scale ``star98-binomial`` (Pyro, seed 0) rises above the
#: ceiling for 27 steps far from its mode (a loss of 4e4 jumps to 3e6) and then converges
#: (3600 at step 1500); a fit that diverges stays above it (P = 250: from step 244 to the end).
DIVERGED_STEPS = 100


def loss_ceiling(ceiling: Any, fast: Any, noise: Any, xp) -> Any:
    """The level of :math:`F` above which the fit is climbing away, after an accepted step
    with running mean ``fast`` and noise variance ``noise``: the least
    :math:`F + R(|F| + 4\\sigma + 1)` so far (:data:`DIVERGED_RISE`); ``inf`` at the start.
    A level that is not finite (an overflowing float32 loss) leaves it unchanged."""
    level = fast + DIVERGED_RISE * (xp.abs(fast) + 4 * xp.sqrt(noise) + 1)
    return xp.where(xp.isfinite(level), xp.minimum(ceiling, level), ceiling)


def steps_above_ceiling(count: Any, fast: Any, ceiling: Any, xp) -> Any:
    """The accepted steps in a row whose running mean ``fast`` was above its (updated)
    :func:`loss_ceiling`, after one more: ``count + 1`` or 0."""
    return xp.where(fast > ceiling, count + 1, 0)


def is_diverging(count: int) -> bool:
    """Whether the running loss has stayed above its :func:`loss_ceiling` for
    :data:`DIVERGED_STEPS` accepted steps in a row (``count``, :func:`steps_above_ceiling`)."""
    return int(count) >= DIVERGED_STEPS


def progress_means(rule: AdaptiveStep, fast: Any, slow: Any, loss: Any, xp, noise: Any = None):
    """The running means :math:`(F, S)` after an accepted loss (both start at the first);
    with the loss's noise variance ``noise`` (after this loss), :math:`S` at most
    :math:`F` plus ``progress_bound`` release thresholds (:class:`AdaptiveStep`)."""
    first = xp.isnan(fast)
    fast = xp.where(first, loss, fast + (loss - fast) / rule.progress_fast_memory)
    slow = xp.where(first, loss, slow + (loss - slow) / rule.progress_slow_memory)
    if noise is not None and rule.progress_bound != float("inf") and rule.release_noise > 0:
        threshold = release_threshold(rule, noise, xp)
        bounded = xp.minimum(slow, fast + rule.progress_bound * threshold)
        slow = xp.where(threshold > 0, bounded, slow)  # no noise measured yet: no bound
    return fast, slow


def noise_average(noise: Any, loss: Any, previous: Any, xp):
    """The running variance of the loss's step-to-step noise after two accepted losses in a
    row: :math:`0.9\\,v + 0.1\\,(L_t - L_{t-1})^2/2`. A sample that overflows (float32 losses of
    order 1e19 and more: a steep model far from its mode) is skipped: an infinite variance
    never decays, and it would switch the revert test off for the rest of the fit."""
    sample = 0.5 * xp.square(loss - previous)
    return xp.where(xp.isfinite(sample), 0.9 * noise + 0.1 * sample, noise)


def initial_noise(loss: Any, xp):
    """The variance before any noise sample: :math:`(L_0/4)^2`, so that the first steps of a
    small model are not reverted for noise alone (the average forgets it within tens of
    steps); 0 where that overflows (:func:`noise_average`)."""
    sample = xp.square(0.25 * loss)
    return xp.where(xp.isfinite(sample), sample, 0.0)


def resolve_step_rule(
    step_rule: StepRule | None = None,
    prox_weight: ProxWeight | None = None,
    scale_prox_weight: ProxWeight | None = None,
    num_alternations: int | None = None,
) -> StepRule:
    """The step rule the classes use, from their keyword arguments.

    ``prox_weight``, ``scale_prox_weight`` and ``num_alternations`` are shorthands for a
    :class:`FixedStep` (an explicit choice of today's fixed-weight step); with none of them and
    no ``step_rule``, the rule is :class:`AdaptiveStep`. Mixing ``step_rule`` with the shorthands
    is ambiguous and raises ``ValueError``.
    """
    shorthands = {
        "prox_weight": prox_weight,
        "scale_prox_weight": scale_prox_weight,
        "num_alternations": num_alternations,
    }
    given = {k: v for k, v in shorthands.items() if v is not None}
    if step_rule is not None:
        if not isinstance(step_rule, (AdaptiveStep, FixedStep)):
            raise TypeError(
                "step_rule must be pyro_scorevi.AdaptiveStep() or pyro_scorevi.FixedStep(...) "
                f"(got {type(step_rule).__name__} {step_rule!r})."
            )
        if given:
            names = ", ".join(sorted(given))
            raise ValueError(
                f"pass either step_rule or {names}, not both (got step_rule={step_rule!r} and "
                f"{names}); {names} configure FixedStep: use step_rule=FixedStep({names}=...)."
            )
        return step_rule
    if given:
        return FixedStep(
            prox_weight=defaults.PROX_WEIGHT if prox_weight is None else prox_weight,
            scale_prox_weight=scale_prox_weight,
            num_alternations=(
                defaults.NUM_ALTERNATIONS if num_alternations is None else num_alternations
            ),
        )
    return AdaptiveStep()


def _check_at_least_one(name: str, value: Any, example: str, infinite: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 1:
        raise ValueError(
            f"{name} must satisfy {name} >= 1 (got {name} = {value!r}); e.g. {name}={example}, "
            f"or float('inf') for {infinite}."
        )


def _check_positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must satisfy {name} > 0 (got {name} = {value!r}).")
