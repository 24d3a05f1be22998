"""``ScoreProximalSVI``: score-based proximal variational inference for Pyro.

Each :meth:`ScoreProximalSVI.step` freezes the current guide :math:`q_t`, draws ``S`` particles
:math:`\\theta_k \\sim q_t` (no reparametrisation: nothing is differentiated through the
sampling), evaluates the mini-batch log-joint scores :math:`\\hat g_k` and moves the guide to

.. math::

    q_{t+1} = \\arg\\min_q \\frac1S\\sum_{k=1}^S
        \\lVert \\nabla_\\theta \\log q(\\theta_k) - \\hat g_k \\rVert^2_{\\mathrm{Cov}(q_t)}
        + \\lambda_t\\, \\mathrm{KL}(q_t \\Vert q),

in closed form for diagonal Gaussian guides (:mod:`pyro_scorevi.proximal`), by inner
optimiser steps for full- and low-rank Gaussian guides, and by the general inner-step path of
:mod:`pyro_scorevi.general` for every other guide whose density can be evaluated (flows,
``AutoDelta`` as MAP, messenger guides, ``AutoGuideList`` combinations, hand-written guides).

Reference: M. Kim, "Large-scale Score-based Variational Posterior Inference for Bayesian Deep
Neural Networks", arXiv:2602.05873, 2026.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import warnings
from collections.abc import Callable
from functools import partial
from typing import Any

import pyro
import torch
from pyro.infer import ELBO, Trace_ELBO
from pyro.infer.util import zero_grads
from pyro.optim import PyroOptim

from pyro_scorevi import core, defaults
from pyro_scorevi.config import (
    diverging_fit_message,
    frozen_fit_message,
    particles_from_loss,
    warn_one_particle,
)
from pyro_scorevi.fast_path import TracedStep
from pyro_scorevi.general import (
    CompositeFamily,
    diagonal_sampler,
    gather_state,
    scatter_state,
)
from pyro_scorevi.guides import (
    ActiveSet,
    DiagonalFamily,
    GaussianFamily,
    check_guide,
    frozen_copy,
    make_family,
    setup_guide,
)
from pyro_scorevi.proximal import ScoreStatistics
from pyro_scorevi.schedules import ProxWeight
from pyro_scorevi.scores import LogJoint
from pyro_scorevi.step_rules import (
    AdaptiveStep,
    FixedStep,
    StepRule,
    is_diverging,
    is_frozen,
    resolve_step_rule,
)

__all__ = ["ScoreProximalSVI"]

logger = logging.getLogger(__name__)


#: Consecutive rejected steps after which :class:`ScoreProximalSVI` warns that the fit is stuck.
STUCK_AFTER = 100


class ScoreProximalSVI:
    """Score-based proximal variational inference, with the verbs of :class:`pyro.infer.SVI`.

    Args:
        model: a Pyro model. Mini-batches come from ``pyro.plate(..., subsample_size=B)`` (or
            ``subsample=``): Pyro scales the likelihood by :math:`N/B`, which keeps the scores
            unbiased.
        guide: an ``AutoNormal``, ``AutoNormalMessenger`` or ``AutoDiagonalNormal`` guide
            (closed-form step; ``AutoNormal`` and ``AutoNormalMessenger`` also fit latents local
            to a subsampled plate, row by row), an ``AutoMultivariateNormal`` /
            ``AutoLowRankMultivariateNormal`` guide (inner steps), or any other guide whose
            density can be evaluated at fixed points: flows (``AutoIAFNormal``), ``AutoDelta``
            (MAP on the same scores), messenger guides, ``AutoGuideList`` combinations (a
            closed-form part keeps its closed form) and hand-written guides built from
            ``pyro.param`` and ``pyro.sample`` (the general inner-step path,
            :mod:`pyro_scorevi.general`).
        optim: optional :class:`pyro.optim.PyroOptim` for the model's own ``pyro.param`` sites
            (deterministic layers, hyper-parameters), stepped on the ELBO gradient
            :math:`\\frac1S\\sum_k \\nabla_\\psi \\log p_\\psi(\\theta_k)`. Without it they stay
            fixed. A model whose only unknowns are ``pyro.param`` sites needs it (as ``SVI``
            with an empty guide).
        num_particles: ``S``, particles (gradient evaluations) per step.
        prox_weight: :math:`\\lambda`, the weight of :math:`\\mathrm{KL}(q_t\\Vert q)` (an
            inverse step size), or a schedule ``step -> lambda`` such as
            :class:`~pyro_scorevi.schedules.PolynomialGrowth`.
        scale_prox_weight: :math:`\\lambda_s`, a separate weight (or schedule) for the scale
            part of the KL, for diagonal guides. ``None`` (default): ``prox_weight``, the
            paper's step. A large value (e.g. ``1e3`` with ``prox_weight=10``) moves the scales
            slowly while the means take larger steps, which lets networks trained from
            scratch (transformers) fit their means before the scales grow towards the prior
            (``docs/pitfalls.md``). Fixed points with exact scores are the same.
        antithetic: draw particles in pairs :math:`m \\pm s\\varepsilon` that share one
            mini-batch (an odd last particle is drawn plainly).
        num_alternations: (precision, mean) alternations of the closed-form step.
        inner_optim: :class:`pyro.optim.PyroOptim` for the inner steps of full- and low-rank
            guides and of the general path, and for the gradient steps of MAP (``Delta``)
            sites (default ``pyro.optim.Adam({"lr": 1e-2})``).
        num_inner_steps: ``K >= 2`` inner steps per iteration for those guides.
        fast_path: for diagonal guides, replay the step's particle loop as a traced graph
            (:mod:`pyro_scorevi.fast_path`). ``False`` (default, and ``None``) never traces:
            every step calls the model as ``SVI.step`` does. ``True`` (opt-in: it assumes a
            static model that reads no rebound global) traces at the first step, checks once
            that the graph reproduces the eager step and raises if it cannot; ``"compile"``
            also compiles the graph with ``torch.compile`` (tens of seconds once, then fused
            kernels: for long runs). Distributed steps stay eager.
        average_after: for diagonal guides, keep the running mean of the iterates
            :math:`(m_t, s_t^2)` after this many steps (Polyak-Ruppert averaging), which
            removes the mini-batch noise of late iterates at the optimal rate; use
            :meth:`averaged` to read the averaged guide. ``None`` (default): no averaging.
        distributed: under an initialised ``torch.distributed`` process group, average the
            per-coordinate statistics over ranks (an all-reduce, as DDP does for gradients):
            each rank scores the same particles (seed all ranks alike) on its own data shard,
            and all ranks apply the same update.

    Attributes:
        num_steps: accepted steps so far (the ``t`` of ``prox_weight``).
        num_averaged: iterates in the running average (``average_after``).
        num_rejected_steps: steps rejected because a score or the update was not finite.

    Example:
        >>> import pyro, pyro.distributions as dist, torch
        >>> from pyro.infer.autoguide import AutoNormal
        >>> from pyro_scorevi import ScoreProximalSVI
        >>> def model(y):
        ...     mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
        ...     with pyro.plate("data", len(y)):
        ...         pyro.sample("y", dist.Normal(mu, 1.0), obs=y)
        >>> pyro.clear_param_store(); pyro.set_rng_seed(0)
        >>> y = torch.randn(100) + 3.0
        >>> guide = AutoNormal(model)
        >>> svi = ScoreProximalSVI(model, guide)
        >>> losses = [svi.step(y) for _ in range(1000)]
        >>> abs(guide.median()["mu"].item() - y.mean().item()) < 0.05
        True
    """

    def __init__(
        self,
        model: Callable,
        guide: Callable,
        optim: PyroOptim | None = None,
        loss: Any = None,
        *,
        num_particles: int | None = None,
        step_rule: StepRule | None = None,
        prox_weight: ProxWeight | None = None,
        scale_prox_weight: ProxWeight | None = None,
        antithetic: bool = defaults.ANTITHETIC,
        num_alternations: int | None = None,
        inner_optim: PyroOptim | None = None,
        num_inner_steps: int = defaults.NUM_INNER_STEPS,
        fast_path: bool | str | None = False,
        distributed: bool = False,
        average_after: int | None = None,
    ):
        if not callable(model):
            raise TypeError(f"model must be a callable Pyro model (got {type(model).__name__}).")
        check_guide(guide)  # fail at construction, not at the first step
        for name, value in (("optim", optim), ("inner_optim", inner_optim)):
            if value is not None and not isinstance(value, PyroOptim):
                raise TypeError(
                    f"{name} must be a pyro.optim optimiser such as pyro.optim.Adam({{'lr': "
                    f"1e-2}}) or None (got {type(value).__name__})."
                )
        num_particles = _particles_from_loss(loss, num_particles)
        _check_int("num_particles", num_particles, 1)
        warn_one_particle(num_particles, loss)
        _check_int("num_inner_steps", num_inner_steps, 2)
        if not isinstance(antithetic, bool):
            raise TypeError(f"antithetic must be True or False (got {antithetic!r}).")
        if fast_path not in (None, True, False, "compile"):
            raise TypeError(
                f"fast_path must be False (eager, the default), True or 'compile' (got "
                f"{fast_path!r})."
            )
        if not isinstance(distributed, bool):
            raise TypeError(f"distributed must be True or False (got {distributed!r}).")
        if average_after is not None:
            _check_int("average_after", average_after, 0)
        self.model = model
        self.guide = guide
        self.optim = optim
        self.num_particles = num_particles
        self.step_rule = resolve_step_rule(
            step_rule, prox_weight, scale_prox_weight, num_alternations
        )
        self.antithetic = antithetic
        self.inner_optim = inner_optim or pyro.optim.Adam({"lr": defaults.INNER_LR})
        self.num_inner_steps = num_inner_steps
        self.fast_path = bool(fast_path) if fast_path != "compile" else "compile"
        self.distributed = distributed
        self.average_after = average_after
        self._elbo = loss
        self._average: tuple[torch.Tensor, torch.Tensor] | None = None  # running mean of (m, s^2)
        self.num_averaged = 0
        self._gaussian_steps = 0
        self._gaussian_rejected = 0
        self._rejected_in_a_row = 0
        self._state: core.DiagonalState | None = None
        self._family: DiagonalFamily | GaussianFamily | CompositeFamily | None = None
        self._log_joint: LogJoint | None = None
        self._particle_sums: Callable | None = None
        self._dense = False
        self._warned_fixed_params = False
        self._warned_frozen = False
        self._warned_diverging = False
        self._warned_numerical = False
        self._numerical_failure = True  # set by each diagonal step; other paths: non-finite
        self._pending_composite: dict | None = None

    @property
    def num_steps(self) -> int:
        """Accepted steps so far (the ``t`` of a ``FixedStep`` schedule)."""
        if isinstance(self._family, CompositeFamily):
            return self._family.num_steps
        return self._state.step if self._state is not None else self._gaussian_steps

    @property
    def num_rejected_steps(self) -> int:
        """Reverted and rejected steps so far."""
        if isinstance(self._family, CompositeFamily):
            return self._family.num_rejected
        return self._state.num_rejected if self._state is not None else self._gaussian_rejected

    def loss(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> float:
        """``SVI.loss``: the -ELBO estimate of ``loss`` (the ``ELBO`` given at construction,
        else ``Trace_ELBO(num_particles)``) for ``model`` and ``guide``; no step is taken."""
        elbo = self._elbo if self._elbo is not None else Trace_ELBO(self.num_particles)
        with torch.no_grad():
            return elbo.loss(model, guide, *args, **kwargs)

    def loss_and_grads(self, *args: Any, **kwargs: Any):
        """Not available: a score-proximal step has no ELBO gradients to return."""
        raise NotImplementedError(
            "ScoreProximalSVI has no loss_and_grads: its step uses the model's scores and a "
            "closed-form proximal update, not ELBO gradients. Call svi.step(*args) to fit and "
            "svi.evaluate_loss(*args) (or svi.loss(model, guide, *args)) for the -ELBO."
        )

    # ------------------------------------------------------------------ public verbs

    def step(self, *args: Any, **kwargs: Any) -> float:
        """Takes one proximal step; returns the negative ELBO estimate of the frozen guide.

        As ``SVI.step``: the model and guide are called on ``args``/``kwargs`` (every step,
        unless ``fast_path`` was asked for), so new data and rebound globals are seen. The
        returned value is :math:`-\\big(\\frac1S\\sum_k \\log\\hat p(\\theta_k)
        + H(q_t)\\big)`, an unbiased estimate of :math:`-\\mathrm{ELBO}(q_t)` (the quantity
        ``Trace_ELBO`` reports), computed from the log joints the step evaluates anyway.
        A step whose scores or update are not finite (or, under ``AdaptiveStep``, whose loss
        is sharply worse than the previous iterate's) is rejected or reverted: the guide is
        left at a finite iterate and ``num_rejected_steps`` is incremented; the first
        non-finite one warns (``RuntimeWarning``), a revert of a finite but sharply worse step
        is logged at ``INFO``.
        """
        if torch.is_inference_mode_enabled():
            raise RuntimeError(
                "ScoreProximalSVI.step cannot run under torch.inference_mode(): the scores are "
                "gradients of the log joint. Call step outside it (torch.no_grad() is fine)."
            )
        family = self._setup(args, kwargs)
        if isinstance(family, DiagonalFamily):
            info = self._diagonal_step(family, args, kwargs)
            loss, ok = info.loss, info.accepted
        elif isinstance(family, CompositeFamily):
            loss, ok = self._composite_step(family, args, kwargs)
        else:
            loss, ok = self._gaussian_step(family, args, kwargs)
            self._gaussian_steps += ok
            self._gaussian_rejected += not ok
        if ok:
            self._rejected_in_a_row = 0
        else:
            self._reject(loss)
        return loss

    @torch.no_grad()
    def evaluate_loss(self, *args: Any, **kwargs: Any) -> float:
        """The negative ELBO estimate of the current guide from ``num_particles`` draws."""
        family = self._setup(args, kwargs)
        if isinstance(family, CompositeFamily):
            return family.evaluate_loss(self._log_joint, args, kwargs, self.num_particles)
        subsample, active = None, None
        if isinstance(family, DiagonalFamily):
            loc, scale = family.read()
            if family.has_local:
                subsample = family.draw_subsample(args, kwargs)
                active = family.select(subsample)
                loc, scale = loc[active.index], scale[active.index]
            entropy = family.entropy(scale, None if active is None else active.weight)
            draw = diagonal_sampler(loc, scale, self.antithetic)
        else:
            posterior = frozen_copy(family.posterior_and_params()[0])
            entropy = posterior.entropy()
            draw = _reflecting_sampler(posterior, self.antithetic)
        total = 0.0
        for k in range(self.num_particles):
            _, theta = draw(k)
            sites = family.to_sites(theta, active) if active is not None else family.to_sites(theta)
            value, used, _ = self._log_joint(sites, args, kwargs, subsample)
            subsample = used or subsample
            total += value
        return -(total / self.num_particles + entropy).item()

    def state_dict(self) -> dict[str, Any]:
        """What the param store does not hold: the step rule's state (counters, running
        statistics, the backup iterate), the iterate average and copies of the optimiser states
        (``inner_optim``, and ``optim`` when given)."""
        state: dict[str, Any] = {
            "num_steps": self.num_steps,  # read-only summaries; the state below restores them
            "num_rejected_steps": self.num_rejected_steps,
            "diagonal_state": None if self._state is None else _clone(self._state._asdict()),
            "composite": (
                _clone(self._family.state_dict())
                if isinstance(self._family, CompositeFamily)
                else None
            ),
            "gaussian_steps": self._gaussian_steps,
            "gaussian_rejected": self._gaussian_rejected,
            "inner_optim": copy.deepcopy(self.inner_optim.get_state()),
            "num_averaged": self.num_averaged,
            "average": None if self._average is None else [t.clone() for t in self._average],
        }
        if self.optim is not None:
            state["optim"] = copy.deepcopy(self.optim.get_state())
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores :meth:`state_dict`; with the param store loaded (and the RNG state
        restored), a run resumes exactly."""
        diagonal = state.get("diagonal_state")
        self._state = None if diagonal is None else core.state_from_dict(_clone(diagonal))
        composite = state.get("composite")
        if composite is not None:
            self._pending_composite = _clone(composite)
            if isinstance(self._family, CompositeFamily):
                self._restore_composite()
        self._gaussian_steps = int(state.get("gaussian_steps", 0))
        self._gaussian_rejected = int(state.get("gaussian_rejected", 0))
        if "inner_optim" in state:
            self.inner_optim.set_state(copy.deepcopy(state["inner_optim"]))
        self.num_averaged = int(state.get("num_averaged", 0))
        average = state.get("average")
        self._average = None if average is None else tuple(t.clone() for t in average)
        if self.optim is not None and "optim" in state:
            self.optim.set_state(copy.deepcopy(state["optim"]))

    @contextlib.contextmanager
    def averaged(self):
        """Context in which the guide holds the averaged iterates (``average_after``).

        Inside it ``Predictive``, ``guide.median()`` etc. see :math:`\\bar m` and
        :math:`\\bar s = (\\overline{s^2})^{1/2}`; on exit the current iterate is restored, so
        training can go on. The guide's tensors are updated in place, so copy (``.clone()``)
        what you read inside; to keep the averages, save the param store inside the context.

        Example:
            >>> svi = ScoreProximalSVI(model, guide, average_after=500)  # doctest: +SKIP
            >>> for _ in range(2000):  # doctest: +SKIP
            ...     svi.step(x, y)
            >>> with svi.averaged():  # doctest: +SKIP
            ...     samples = Predictive(model, guide=guide, num_samples=100)(x)
        """
        if self._family is None and self._average is not None:
            if self.guide.prototype_trace is None:
                raise ValueError(
                    "the guide has not been set up; take a step (or call the guide on the "
                    "model's arguments) before using averaged()."
                )
            self._setup((), {})  # resumed from a state_dict: the guide's prototype exists
        if self._average is None or not isinstance(self._family, DiagonalFamily):
            raise ValueError(
                f"no averaged iterates yet (average_after = {self.average_after!r}, "
                f"{self.num_steps} steps taken); pass average_after=N with a diagonal guide and "
                "take more than N steps."
            )
        current = self._family.read()
        self._family.write(self._average[0], self._average[1].sqrt())
        try:
            yield self.guide
        finally:
            self._family.write(*current)

    # ------------------------------------------------------------------ the two steps

    def _diagonal_step(self, family: DiagonalFamily, args, kwargs) -> core.StepInfo:
        loc, scale = family.read()
        state = self._state
        if state is None:
            state = core.init(loc, scale, self.step_rule, dense=self._dense)
        elif not (torch.equal(loc, state.loc) and torch.equal(scale, state.scale)):
            # The param store was changed from outside (loaded, edited): continue from it, with
            # no backup to revert to.
            state = state._replace(loc=loc, scale=scale, backup_loc=None, backup_scale=None)
        active, full_state = None, state
        if family.has_local:
            # Local latents: the step updates the globals and the rows of the drawn indices,
            # drawn first (as the guide's plates draw them) and replayed in the model.
            subsample = family.draw_subsample(args, kwargs)
            active = family.select(subsample)
            state = gather_state(state, active.index)
            loc, scale = state.loc, state.scale
            compute = partial(self._particle_sums, active=active, subsample=subsample)
        else:
            compute = self._particle_sums
        try:
            sums, total, params, param_grads = compute(loc, scale, args, kwargs)
        except ValueError as error:
            if not _is_validation_error(error):
                raise
            # A parameter drawn from the guide that the model's own distribution refuses (e.g.
            # a scale that underflowed to 0): a failed step, rejected or reverted, not a crash.
            logger.debug("a particle failed the model's argument validation: %s", error)
            rows = 4 + 2 * loc.numel() if self._dense else 4
            sums = torch.full((rows,) + loc.shape, math.nan, dtype=loc.dtype, device=loc.device)
            total, params, param_grads = torch.tensor(math.nan), [], []
        means = sums.detach() / self.num_particles
        stats = ScoreStatistics(*means[:4].unbind())
        moments = means[4:] if self._dense else None  # the dense metric's (2d, d) moments
        weight = None if active is None else active.weight
        loss = -(total.detach() / self.num_particles + family.entropy(scale, weight))
        self._state, info = core.update(state, stats, float(loss), self.step_rule, moments)
        # A revert of a finite step whose -ELBO was sharply worse is the adaptive rule at work,
        # not a numerical failure (see _reject).
        self._numerical_failure = not (
            isinstance(self.step_rule, AdaptiveStep)
            and math.isfinite(float(loss))
            and bool(torch.isfinite(means[:4]).all())
        )
        if active is not None:
            self._state = scatter_state(full_state, self._state, info, active.index)
        if info.accepted or info.reverted:
            family.write(self._state.loc, self._state.scale)
            # What the store holds after its transforms (bitwise), so that the next step can
            # tell an edit of the param store from its own write.
            loc, scale = family.read()
            self._state = self._state._replace(loc=loc, scale=scale)
        if info.accepted:
            self._warn_if_frozen(family)
            self._warn_if_diverging()
            self._step_model_params(params, param_grads, self.num_particles)
            if self.average_after is not None and self._state.step > self.average_after:
                self._accumulate_average(self._state.loc, self._state.scale)
        return info

    def _composite_step(self, family: CompositeFamily, args, kwargs) -> tuple[float, bool]:
        rule = self.step_rule
        weight = (
            float(rule.weights(family.num_steps)[0])
            if isinstance(rule, FixedStep)
            else defaults.PROX_WEIGHT  # no adaptive rule for the inner-step families (yet)
        )
        if not family.has_latents and self.optim is None:
            params = self._log_joint.evaluate({}, args, kwargs)[2]
            if not params:
                raise ValueError(
                    "the model has no latent sample sites and no pyro.param sites, so there "
                    "is nothing to fit; check the model's pyro.sample statements."
                )
            raise ValueError(
                f"the model has no latent sample sites: its only unknowns are its "
                f"{len(params)} pyro.param site(s), which ScoreProximalSVI fits with optim= "
                "(got optim=None). Pass e.g. optim=pyro.optim.Adam({'lr': 1e-2}), as SVI "
                "would take."
            )
        loss, ok, params, grads = family.step(
            self._log_joint,
            args,
            kwargs,
            num_particles=self.num_particles,
            antithetic=self.antithetic,
            rule=rule,
            weight=weight,
            inner_optim=self.inner_optim,
            num_inner_steps=self.num_inner_steps,
        )
        if ok:
            self._step_model_params(params, grads, self.num_particles)
        # A finite loss rejected by the closed-form part's adaptive rule is a revert.
        self._numerical_failure = not (
            math.isfinite(loss) and family.diagonal is not None and isinstance(rule, AdaptiveStep)
        )
        return loss, ok

    def _restore_composite(self) -> None:
        state = self._pending_composite
        if state is not None and isinstance(self._family, CompositeFamily):
            self._family.load_state_dict(state)
            self._pending_composite = None

    @torch.no_grad()
    def _accumulate_average(self, loc: torch.Tensor, scale: torch.Tensor) -> None:
        """Running means :math:`\\bar m`, :math:`\\overline{s^2}` of the iterates."""
        self.num_averaged += 1
        if self._average is None:
            self._average = (loc.clone(), scale.square())
            return
        weight = 1.0 / self.num_averaged
        self._average[0].lerp_(loc, weight)
        self._average[1].lerp_(scale.square(), weight)

    def _gaussian_step(self, family: GaussianFamily, args, kwargs):
        rule = self.step_rule
        weight = (
            float(rule.weights(self._gaussian_steps)[0])
            if isinstance(rule, FixedStep)
            else defaults.PROX_WEIGHT  # no adaptive rule for the inner-step families (yet)
        )
        posterior, guide_params = family.posterior_and_params()
        frozen = frozen_copy(posterior)
        draw = _reflecting_sampler(frozen, self.antithetic)
        thetas, scores = [], []
        total, subsample, param_grads = 0.0, None, None
        for k in range(self.num_particles):
            _, theta = draw(k)
            theta.requires_grad_()
            value, score, subsample, params, pgrads = self._log_joint.scores(
                family.to_sites(theta), theta, args, kwargs, subsample
            )
            total += value
            thetas.append(theta.detach())
            scores.append(score)
            param_grads = _accumulate(param_grads, pgrads)
        loss = -(total / self.num_particles + frozen.entropy())
        thetas, scores = torch.stack(thetas), torch.stack(scores)
        if not _all_finite([loss, scores]):
            return loss.item(), False
        snapshot = [p.detach().clone() for p in guide_params]
        covariance = frozen.covariance_matrix  # the weighting W = Cov(q_t), fixed in the step
        for _ in range(self.num_inner_steps):
            posterior, guide_params = family.posterior_and_params()
            objective = _proximal_objective(posterior, frozen, thetas, scores, covariance, weight)
            objective.backward()
            self.inner_optim(guide_params)
            zero_grads(guide_params)
        ok = _all_finite(guide_params)
        if not ok:  # restore q_t: a failed inner solve must not corrupt the guide
            with torch.no_grad():
                for p, old in zip(guide_params, snapshot):
                    p.copy_(old)
        else:
            self._step_model_params(params, param_grads, self.num_particles)
        return loss.item(), ok

    # ------------------------------------------------------------------ helpers

    def _setup(self, args, kwargs):
        if self._family is None:
            self._family = make_family(self.guide, args, kwargs)
            self._log_joint = LogJoint(
                self.model,
                self._family.transforms,
                getattr(self._family, "guide_sites", ()),
            )
            self._restore_composite()
            local = isinstance(self._family, DiagonalFamily) and self._family.has_local
            for option, used in {
                "fast_path": self.fast_path is not False,
                "distributed=True": self.distributed,
            }.items():
                if local and used:
                    plates = ", ".join(repr(n) for n in self._family.local_plates)
                    raise NotImplementedError(
                        f"{option} does not support latents local to a subsampled plate "
                        f"({plates}): each step updates the rows of its own indices. Leave "
                        f"{option} out for this model."
                    )
            diagonal_only = {
                "average_after": self.average_after is not None,
                "scale_prox_weight": isinstance(self.step_rule, FixedStep)
                and self.step_rule.scale_prox_weight is not None,
                "distributed=True": self.distributed,
            }
            for option, used in diagonal_only.items():
                if used and not isinstance(self._family, DiagonalFamily):
                    raise NotImplementedError(
                        f"{option} supports AutoNormal, AutoNormalMessenger and "
                        f"AutoDiagonalNormal guides (got {type(self.guide).__name__}); leave it "
                        "out for other guides."
                    )
            # A small guide steps in the dense metric (AdaptiveStep.dense_max_dim); a guide
            # with latents local to a subsampled plate updates a different subset each step.
            self._dense = (
                isinstance(self._family, DiagonalFamily)
                and not self._family.has_local
                and core.uses_dense_metric(self.step_rule, self._family.read()[0].numel())
            )
            sums = partial(
                particle_sums,
                self._log_joint,
                self._family,
                num_particles=self.num_particles,
                antithetic=self.antithetic,
                learn_params=self.optim is not None,
                reduce=_all_reduce_mean if self.distributed else None,
                dense=self._dense,
            )
            # Opt-in only (it changes what a step means: see fast_path.py). A collective cannot
            # be recorded in a graph: distributed steps stay eager.
            use_graph = self.fast_path is not False and not self.distributed
            self._particle_sums = (
                TracedStep(sums, required=True, compile=self.fast_path == "compile")
                if use_graph
                else sums
            )
        elif not pyro.get_param_store().keys():
            # pyro.clear_param_store() between steps: as under SVI, the guide registers its
            # parameters again (an autoguide with the values its PyroModule holds), and the
            # step continues from the store.
            setup_guide(self.guide, args, kwargs, force=True)
        return self._family

    def _step_model_params(self, params, grads, num_particles: int) -> None:
        if not params:
            return
        if self.optim is None:
            if not self._warned_fixed_params:
                self._warned_fixed_params = True
                logger.warning(
                    "The model has %d pyro.param site(s); they are held fixed. Pass optim= "
                    "(e.g. pyro.optim.Adam({'lr': 1e-3})) to fit them on the ELBO.",
                    len(params),
                )
            return
        for p, g in zip(params, grads):
            p.grad = -g / num_particles  # minimise -ELBO
        self.optim(params)
        zero_grads(params)

    def _warn_if_diverging(self) -> None:
        """One ``RuntimeWarning`` the first time the fit
        :func:`~pyro_scorevi.step_rules.is_diverging` (its state's ``steps_above_ceiling``)."""
        state = self._state
        if self._warned_diverging or not is_diverging(state.steps_above_ceiling):
            return
        self._warned_diverging = True
        message = diverging_fit_message(state.loss_fast, state.loss_ceiling)
        warnings.warn(message, RuntimeWarning, stacklevel=4)

    def _warn_if_frozen(self, family: DiagonalFamily) -> None:
        """One ``RuntimeWarning`` the first time the fit
        :func:`~pyro_scorevi.step_rules.is_frozen` (its state's ``largest_frequency``)."""
        state, rule = self._state, self.step_rule
        if self._warned_frozen or not is_frozen(state.largest_frequency, state.step):
            return
        self._warned_frozen = True
        at_max = state.rates.mean_radius >= rule.max_mean_radius
        sizes = [math.prod(block.shape) for block in family.blocks]
        sites = [
            site
            for block, part in zip(family.blocks, at_max.split(sizes))
            if bool(part.any())
            for site in block.sites
        ]
        sites = sites or [site for block in family.blocks for site in block.sites]
        warnings.warn(frozen_fit_message(sites), RuntimeWarning, stacklevel=4)

    def _reject(self, loss: float) -> None:
        self._rejected_in_a_row += 1
        numerical, self._numerical_failure = self._numerical_failure, True
        if not numerical:
            # AdaptiveStep's revert of a finite step that was sharply worse: counted, logged.
            logger.info(
                "ScoreProximalSVI reverted step %d (loss %s): its -ELBO estimate was sharply "
                "worse than the previous iterate's, so the trust region shrinks; counted in "
                "num_rejected_steps.",
                self.num_steps,
                loss,
            )
        elif not self._warned_numerical:
            self._warned_numerical = True
            warnings.warn(
                f"ScoreProximalSVI rejected a step (loss = {loss}): its scores or update were not "
                "finite; the guide was left at a finite iterate (the previous one when reverted). "
                "Further rejections are counted in num_rejected_steps without warning.",
                RuntimeWarning,
                stacklevel=3,
            )
        if self._rejected_in_a_row == STUCK_AFTER:
            warnings.warn(
                f"ScoreProximalSVI: the last {STUCK_AFTER} steps were all rejected, so the guide "
                "is stuck where the model's scores are not finite (often after a first step "
                "that overshot from a wide initial guide, e.g. with an exp link). Restart with a "
                "narrower initial guide (AutoNormal(model, init_scale=0.01)) or check the "
                "model's log density at the guide's initial point; see 'Far from the mode' in "
                "docs/pitfalls.md.",
                RuntimeWarning,
                stacklevel=3,
            )
        logger.debug("rejected step %d (loss %s)", self.num_steps, loss)


def particle_sums(
    log_joint: LogJoint,
    family: DiagonalFamily,
    loc: torch.Tensor,
    scale: torch.Tensor,
    args: tuple,
    kwargs: dict,
    *,
    num_particles: int,
    antithetic: bool,
    learn_params: bool = True,
    reduce: Callable | None = None,
    active: ActiveSet | None = None,
    subsample: dict | None = None,
    dense: bool = False,
):
    """The particle loop of a diagonal step: ``S`` forward/backward passes of the log joint.

    Returns ``(sums, total, model_params, model_param_grads)``: the running sums of
    :math:`\\delta`, :math:`\\delta^2`, :math:`\\delta\\hat g` and :math:`\\hat g` stacked as
    a ``(4, d)`` tensor (:math:`O(d)` memory whatever ``S`` is), the summed log joint, and the
    model's own parameters with their summed gradients (empty unless ``learn_params``).
    ``reduce`` averages the sums across processes (``distributed=True``). With local latents,
    ``loc``/``scale`` are the ``active`` coordinates, ``subsample`` the plate indices drawn for
    them, and each local score is divided by its :math:`N/B` (the score of the data point's own
    posterior, not of :math:`N/B` copies of it). ``dense`` (a flat ``loc`` of ``d``
    coordinates) appends the sums of :math:`\\hat g\\delta^\\top` and
    :math:`\\delta\\delta^\\top`: ``(4 + 2d, d)`` (the dense metric's moments).
    """
    rows = 4 + 2 * loc.numel() if dense else 4
    sums = torch.zeros((rows,) + loc.shape, dtype=loc.dtype, device=loc.device)
    draw = diagonal_sampler(loc, scale, antithetic)
    total, params, param_grads = 0.0, [], None
    for k in range(num_particles):
        offset, theta = draw(k)
        with torch.enable_grad():
            theta.requires_grad_()
            sites = family.to_sites(theta) if active is None else family.to_sites(theta, active)
            value, score, used, params, pgrads = log_joint.scores(
                sites, theta, args, kwargs, subsample, learn_params
            )
        subsample = used or subsample
        if active is not None and active.weight is not None:
            score = score / active.weight
        total = total + value
        step = torch.stack([offset, offset * offset, offset * score, score])
        if dense:
            step = torch.cat([step, torch.outer(score, offset), torch.outer(offset, offset)])
        sums = sums + step
        param_grads = _accumulate(param_grads, pgrads)
    if reduce is not None:
        sums, total = reduce(sums, total)
    return sums, total, params, param_grads


def _all_reduce_mean(sums: torch.Tensor, total: torch.Tensor):
    """Averages the statistics over the ranks of the default process group (one all-reduce)."""
    import torch.distributed as tdist

    if not (tdist.is_available() and tdist.is_initialized()):
        raise ValueError(
            "distributed=True needs an initialised torch.distributed process group (got none); "
            "call torch.distributed.init_process_group(...) first, or pass distributed=False."
        )
    buffer = torch.cat([sums.reshape(-1), total.reshape(1)])
    tdist.all_reduce(buffer)
    buffer /= tdist.get_world_size()
    return buffer[:-1].view_as(sums), buffer[-1]


def _proximal_objective(posterior, frozen, thetas, scores, covariance, weight):
    """:math:`\\frac1S\\sum_k \\lVert\\nabla\\log q_\\phi(\\theta_k)-\\hat g_k\\rVert^2_W
    + \\lambda\\,\\mathrm{KL}(q_t\\Vert q_\\phi)`, differentiable in :math:`\\phi`."""
    thetas = thetas.detach().requires_grad_()
    log_q = posterior.log_prob(thetas).sum()
    (score_q,) = torch.autograd.grad(log_q, thetas, create_graph=True)
    residual = score_q - scores
    fisher = torch.einsum("ki,ij,kj->k", residual, covariance, residual).mean()
    return fisher + weight * torch.distributions.kl_divergence(frozen, posterior)


def _reflecting_sampler(posterior, antithetic: bool):
    """Draws from a symmetric ``posterior``; the odd ``k`` of a pair reflects the previous draw
    about the mean (:math:`2m - \\theta`), which is again a draw from it."""
    last = None

    def draw(k: int):
        nonlocal last
        theta = 2 * posterior.loc - last if antithetic and k % 2 == 1 else posterior.sample()
        last = theta
        return None, theta.detach().clone()

    return draw


def _is_validation_error(error: ValueError) -> bool:
    """The ``ValueError`` of ``Distribution.__init__`` / ``_validate_sample`` argument checks."""
    return str(error).startswith(("Expected parameter", "Expected value argument"))


def _clone(tree):
    """Deep copy of a state's tensors (nested tuples, lists and dicts)."""
    if isinstance(tree, torch.Tensor):
        return tree.detach().clone()
    if isinstance(tree, dict):
        return {k: _clone(v) for k, v in tree.items()}
    if isinstance(tree, tuple):
        return (
            type(tree)(*map(_clone, tree)) if hasattr(tree, "_fields") else tuple(map(_clone, tree))
        )
    if isinstance(tree, list):
        return [_clone(v) for v in tree]
    return tree


def _particles_from_loss(loss: Any, num_particles: int | None) -> int:
    """``num_particles`` from an ``ELBO`` passed as ``loss`` (SVI's fourth argument)."""
    if loss is None:
        return defaults.NUM_PARTICLES if num_particles is None else num_particles
    if not isinstance(loss, ELBO):
        raise TypeError(
            "loss must be a pyro.infer ELBO such as Trace_ELBO(num_particles=2) or None (got "
            f"{type(loss).__name__}); ScoreProximalSVI replaces ELBO gradients by scores, so "
            "the ELBO only sets num_particles and the estimator of svi.loss(...)."
        )
    return particles_from_loss(num_particles, loss.num_particles)


def _accumulate(total, grads):
    if total is None:
        return list(grads)
    return [t + g for t, g in zip(total, grads)]


def _all_finite(tensors) -> bool:
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(
            f"{name} must be an int >= {minimum} (got {type(value).__name__} {value!r})."
        )
    if value < minimum:
        raise ValueError(f"{name} must satisfy {name} >= {minimum} (got {name} = {value}).")
