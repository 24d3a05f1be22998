"""Score-proximal variational inference for NumPyro: functional core and ``SVI``-like class.

Each step freezes :math:`q_t`, draws :math:`S` particles :math:`\\theta_k \\sim q_t` (no gradient
through the sampling), takes their scores :math:`\\hat g_k = \\nabla \\log \\hat p(\\theta_k)` of
the unconstrained log joint (one shared mini-batch), and moves to

.. math::

    q_{t+1} = \\arg\\min_q \\; \\frac1S \\sum_k
        \\lVert \\nabla \\log q(\\theta_k) - \\hat g_k \\rVert^2_{\\mathrm{Cov}(q_t)}
        + \\lambda_t \\, \\mathrm{KL}(q_t \\,\\Vert\\, q).

Diagonal guides (``AutoNormal``, ``AutoDiagonalNormal``) take the closed form of
:mod:`pyro_scorevi.numpyro.proximal`; the multivariate guides
(``AutoMultivariateNormal``, ``AutoLowRankMultivariateNormal``) take ``num_inner_steps``
steps of ``inner_optim`` on that objective, starting from :math:`q_t`; the optimizer's state
(Adam's moments) carries over from one proximal step to the next, as Pyro's optimizers keep
theirs. A fresh state per step was measured to stall: fresh Adam moves every coordinate by
about the learning rate whatever the gradient's size, so once the proximal move is smaller
than that the inner steps oscillate about :math:`q_t` (dense 3-d Gaussian target: mean error
stuck at 0.25 with lr 1e-2).

The model's own ``numpyro.param`` sites :math:`\\psi` are held fixed, or, with ``optim``, take
one optimizer step per accepted proximal step on the ELBO gradient
:math:`\\frac1S\\sum_k \\nabla_\\psi \\log \\hat p_\\psi(\\theta_k)` of the same particles (in
unconstrained space, as ``numpyro.infer.SVI`` steps its params; :math:`q_t` does not depend on
:math:`\\psi`, so no reparametrisation is needed).

The loss reported by :func:`update` is the negative ELBO estimate of the frozen :math:`q_t`,
:math:`-\\big(\\frac1S\\sum_k \\log\\hat p(\\theta_k) + H(q_t)\\big)`, comparable with the loss of
``numpyro.infer.SVI`` with ``Trace_ELBO``.

Reference: M. Kim, "Large-scale Score-based Variational Posterior Inference for Bayesian Deep
Neural Networks", arXiv:2602.05873, 2026.
"""

from __future__ import annotations

import logging
import numbers
import warnings
from collections import namedtuple
from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import tqdm
from jax import lax, random
from jax.example_libraries import optimizers
from numpyro import handlers
from numpyro.distributions import constraints
from numpyro.distributions.transforms import biject_to
from numpyro.infer.elbo import ELBO, RenyiELBO, Trace_ELBO
from numpyro.infer.util import helpful_support_errors, transform_fn
from numpyro.optim import Adam, _NumPyroOptim, optax_to_numpyro

from pyro_scorevi import defaults
from pyro_scorevi.config import (
    ScoreProximalConfig,
    diverging_fit_message,
    frozen_fit_message,
    particles_from_loss,
    warn_one_particle,
)
from pyro_scorevi.numpyro.adaptive import (
    CurvatureState,
    adaptive_update,
    dense_mean_score,
    init_curvature,
    init_rates,
    refresh_curvature,
    settled_precision,
    update_curvature,
)
from pyro_scorevi.numpyro.guides import (
    DiagonalFamily,
    MultivariateFamily,
    check_guide,
    family_of,
    gaussian_kl,
)
from pyro_scorevi.numpyro.proximal import diagonal_proximal_update, score_statistics
from pyro_scorevi.numpyro.scores import (
    check_model,
    make_log_joint,
    particle_log_joints,
    particle_scores,
    particle_scores_and_param_grads,
    standard_normal_particles,
)
from pyro_scorevi.schedules import ProxWeight
from pyro_scorevi.step_rules import (
    AdaptiveStep,
    StepRule,
    at_largest_step,
    cap_release,
    floor_decay,
    initial_noise,
    is_diverging,
    is_frozen,
    largest_frequency,
    loss_ceiling,
    noise_average,
    progress_means,
    should_restart,
    steps_above_ceiling,
)

__all__ = [
    "ScoreProximalConfig",
    "ScoreProximalState",
    "ScoreProximalRunResult",
    "ScoreProximalSVI",
    "init",
    "update",
    "evaluate",
]

logger = logging.getLogger(__name__)


class ScoreProximalState(NamedTuple):
    """State of :class:`ScoreProximalSVI` (a pytree: ``jit`` and ``lax.scan`` carry it).

    Attributes:
        params: the param sites of the guide and of the model (``numpyro.param``) in their
            constrained space, i.e. exactly what ``numpyro.infer.SVI.get_params`` would
            return: ``guide.sample_posterior(key, params)`` and ``Predictive(model,
            guide=guide, params=params)`` take it as is.
        optim_state: the inner optimizer's state for the multivariate guides (it holds their
            params in unconstrained space, the copy the steps work on, and the optimizer's
            moments, carried from one proximal step to the next); ``()`` for diagonal guides.
        step: the number :math:`t` of proximal steps taken (int32 scalar); the proximal weight
            of the next step is ``prox_weight(step)``.
        rng_key: the key the next step splits.
        average: with ``average_after``, ``(locs, squared scales, count)``: the running means
            of the iterates :math:`(m_t, s_t^2)` taken after step ``average_after`` and their
            number (read them with :meth:`ScoreProximalSVI.get_averaged_params`); else ``()``.
        rule: the :class:`AdaptiveState` of the adaptive step rule (diagonal guides); ``()``
            under ``FixedStep``.
        num_rejected: reverted and rejected steps so far (int32).
        rejected_in_a_row: consecutive reverted or rejected steps (int32); a fit whose count
            keeps growing is stuck.
        param_optim_state: with ``optim``, its state over the model's param sites in
            unconstrained space; ``()`` when they are held fixed (or there are none).
    """

    params: dict
    optim_state: Any
    step: jax.Array
    rng_key: jax.Array
    average: Any = ()
    rule: Any = ()
    num_rejected: Any = 0
    rejected_in_a_row: Any = 0
    param_optim_state: Any = ()


class AdaptiveState(NamedTuple):
    """The running state of :class:`~pyro_scorevi.step_rules.AdaptiveStep` (the JAX mirror of
    the rule part of :class:`pyro_scorevi.core.DiagonalState`).

    Attributes:
        rates: site name to :class:`~pyro_scorevi.numpyro.adaptive.RateState`.
        trust: :math:`\\kappa \\in (0, 1]`.
        backup_locs, backup_scales: the previous accepted iterate (valid when ``has_backup``).
        has_backup: whether there is one to revert to (false at the start and after a revert).
        backup_loss: its -ELBO estimate.
        loss_noise: running mean of :math:`(L_t - L_{t-1})^2/2` over accepted steps.
        loss_fast, loss_slow: running means of the accepted losses (the progress signal of
            :func:`~pyro_scorevi.step_rules.cap_release`; NaN before the first).
        released: the sum of the cap's ``release`` over the accepted steps.
        curvature: the :class:`~pyro_scorevi.numpyro.adaptive.CurvatureState` of a guide in
            the dense metric (``AdaptiveStep.dense_max_dim``), over the flat coordinates of the
            sites in order; ``()`` otherwise.
        largest_frequency: running frequency of the accepted steps that moved some mean by the
            largest trust region (``step_rules.largest_frequency``); ``run`` warns when the fit
            ``step_rules.is_frozen``.
        loss_ceiling: the ``step_rules.loss_ceiling`` of ``loss_fast`` (``inf`` before the
            first accepted step).
        steps_above_ceiling: the accepted steps in a row with ``loss_fast`` above it; ``run``
            warns when the fit ends ``step_rules.is_diverging``.
    """

    rates: dict
    trust: jax.Array
    backup_locs: dict
    backup_scales: dict
    has_backup: jax.Array
    backup_loss: jax.Array
    loss_noise: jax.Array
    loss_fast: jax.Array
    loss_slow: jax.Array
    released: jax.Array
    curvature: CurvatureState | tuple = ()
    largest_frequency: jax.Array | float = 0.0
    loss_ceiling: jax.Array | float = float("inf")
    steps_above_ceiling: jax.Array | int = 0


#: Floor of the trust kappa (as :data:`pyro_scorevi.core.MIN_TRUST`).
MIN_TRUST = 2.0**-10


class ScoreProximalRunResult(namedtuple("ScoreProximalRunResult", ["params", "state", "losses"])):
    """What :meth:`ScoreProximalSVI.run` returns, as ``SVIRunResult``.

    Attributes:
        params: the fitted guide parameters (constrained), for ``guide.sample_posterior`` and
            ``Predictive``.
        state: the final :class:`ScoreProximalState`, to resume with ``init_state=``.
        losses: the negative ELBO estimate of every step, shape ``(num_steps,)``.
        num_rejected_steps: reverted and rejected steps of the whole fit.
        stuck: whether the last ``STUCK_AFTER`` steps were all rejected.
    """

    @property
    def num_rejected_steps(self) -> int:
        return int(self.state.num_rejected)

    @property
    def stuck(self) -> bool:
        return int(self.state.rejected_in_a_row) >= STUCK_AFTER


#: Consecutive rejected steps after which a fit is reported stuck (as the Pyro class).
STUCK_AFTER = 100


def _warn_if_failing(result: ScoreProximalRunResult, rejected: int, num_steps: int) -> None:
    """One ``RuntimeWarning`` after :meth:`ScoreProximalSVI.run` when the fit is stuck or
    rejected most of its steps (``update`` inside ``lax.scan`` cannot warn per step)."""
    if not (result.stuck or 2 * rejected > num_steps):
        return
    warnings.warn(
        f"ScoreProximalSVI.run rejected {rejected} of {num_steps} steps"
        + (f" (the last {STUCK_AFTER} or more in a row: the fit is stuck)" if result.stuck else "")
        + ": at the guide's draws the model's scores were not finite, or the -ELBO estimate was "
        "sharply worse than the previous iterate's. "
        "A common cause is NumPyro's default init_to_uniform on a steep model (an exp link on "
        "raw-scale inputs overflows float32); start from AutoNormal(model, "
        "init_loc_fn=init_to_feasible), or enable float64 (numpyro.enable_x64()). See 'Far "
        "from the mode' in docs/pitfalls.md.",
        RuntimeWarning,
        stacklevel=3,
    )


def _warn_if_frozen(rule: Any, state: ScoreProximalState) -> None:
    """One ``RuntimeWarning`` after :meth:`ScoreProximalSVI.run` when the fit
    ``step_rules.is_frozen`` (``AdaptiveState.largest_frequency``; the torch class warns
    during the fit)."""
    adaptive = state.rule
    if not isinstance(rule, AdaptiveStep) or not isinstance(adaptive, AdaptiveState):
        return
    if not is_frozen(float(adaptive.largest_frequency), int(state.step)):
        return
    sites = [
        name
        for name, rates in adaptive.rates.items()
        if bool(jnp.any(rates.mean_radius >= rule.max_mean_radius))
    ]
    warnings.warn(frozen_fit_message(sites or list(adaptive.rates)), RuntimeWarning, stacklevel=3)


def _warn_if_diverging(rule: Any, state: ScoreProximalState) -> None:
    """One ``RuntimeWarning`` after :meth:`ScoreProximalSVI.run` when the fit
    ends ``step_rules.is_diverging`` (``AdaptiveState.steps_above_ceiling``; the torch class
    warns during the fit)."""
    adaptive = state.rule
    if not isinstance(rule, AdaptiveStep) or not isinstance(adaptive, AdaptiveState):
        return
    if is_diverging(int(adaptive.steps_above_ceiling)):
        message = diverging_fit_message(float(adaptive.loss_fast), float(adaptive.loss_ceiling))
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _as_numpyro_optim(optim: Any, name: str = "inner_optim") -> _NumPyroOptim:
    if optim is None:
        return Adam(defaults.INNER_LR)
    if isinstance(optim, _NumPyroOptim):
        return optim
    if isinstance(optim, optimizers.Optimizer):
        return _NumPyroOptim(lambda *args: args, *optim)
    try:
        import optax
    except ImportError:
        optax = None
    if optax is not None and isinstance(optim, optax.GradientTransformation):
        return optax_to_numpyro(optim)
    raise TypeError(
        f"{name} must be a numpyro.optim optimizer, a jax.example_libraries optimizer or "
        f"an optax GradientTransformation (got {type(optim).__name__}); e.g. "
        f"{name}=numpyro.optim.Adam(1e-2)."
    )


def _particles_from_loss(loss: Any, num_particles: int | None) -> int | None:
    """``num_particles`` from an ELBO passed as ``loss`` (``SVI``'s fourth argument)."""
    if loss is None:
        return num_particles
    if not isinstance(loss, ELBO):
        raise TypeError(
            "loss must be a numpyro.infer ELBO such as Trace_ELBO(num_particles=2) or None (got "
            f"{type(loss).__name__}); ScoreProximalSVI replaces ELBO gradients by scores, so "
            "the ELBO only sets num_particles and the estimator of svi.loss.loss(...)."
        )
    if isinstance(loss, RenyiELBO):
        raise TypeError(
            f"loss=RenyiELBO(alpha={loss.alpha}) is another objective than the one "
            "ScoreProximalSVI fits (the ELBO, KL(q || p)); pass Trace_ELBO(num_particles=S) or "
            "num_particles=S."
        )
    return particles_from_loss(num_particles, loss.num_particles)


def _model_param_sites(model_trace: dict) -> tuple[dict, dict]:
    """``(values, transforms)`` of the model's ``numpyro.param`` sites: constrained values and
    the bijections from unconstrained space onto their constraints."""
    values, transforms = {}, {}
    for name, site in model_trace.items():
        if site["type"] == "param":
            constraint = site["kwargs"].get("constraint", constraints.real)
            with helpful_support_errors(site):
                transforms[name] = biject_to(constraint)
            values[name] = site["value"]
    return values, transforms


class _Scorer:
    """One step's particle pass: log joints, scores and (learned params) their ELBO gradient.

    ``fixed``: constrained values of the model's param sites held fixed; ``learned``: the
    unconstrained values ``optim`` steps. ``constrain`` maps the latter to constrained values
    once the pass has run (it reads the constraints the model declared).
    """

    def __init__(self, model, args, kwargs, fixed, learned, forward_mode):
        self.model, self.args, self.kwargs = model, args, kwargs
        self.fixed, self.learned, self.forward_mode = fixed, learned, forward_mode
        self.log_joint = None

    def __call__(self, model_key, to_latents, thetas):
        self.log_joint = make_log_joint(self.model, self.args, self.kwargs, model_key, self.fixed)
        if self.learned is None:
            log_p, scores = particle_scores(
                self.log_joint, to_latents, thetas, forward_mode=self.forward_mode
            )
            return log_p, scores, None
        return particle_scores_and_param_grads(
            self.log_joint, to_latents, thetas, self.learned, forward_mode=self.forward_mode
        )

    def constrain(self, unconstrained: dict) -> dict:
        return self.log_joint.constrain(unconstrained)


# ----------------------------------------------------------------------------- functional core


def init(
    model: Callable,
    guide: Callable,
    config: ScoreProximalConfig,
    rng_key: jax.Array,
    *args,
    init_params: dict | None = None,
    optim: Any = None,
    **kwargs,
) -> ScoreProximalState:
    """The initial state: runs the model once (checks, its param sites) and the guide once.

    Args:
        model, guide: the NumPyro model and a supported autoguide of it.
        config: the hyper-parameters (the inner optimizer initialises its state).
        rng_key: a ``jax.random`` key.
        init_params: optional constrained values for some param sites of the guide or the
            model (as ``numpyro.infer.SVI.init``).
        optim: optional optimizer of the model's ``numpyro.param`` sites (see
            :class:`ScoreProximalSVI`); ``None`` holds them fixed at their initial values.
        args, kwargs: the model's arguments.

    Raises:
        TypeError: unsupported guide.
        ValueError: ``init_params`` names no param site; a param name is both the model's and
            the guide's; see also :func:`pyro_scorevi.numpyro.scores.check_model`.
        NotImplementedError: see :func:`pyro_scorevi.numpyro.scores.check_model`.
    """
    return _init(model, guide, config, rng_key, args, kwargs, init_params, optim)[0]


def _init(model, guide, config, rng_key, args, kwargs, init_params, optim):
    """:func:`init`, plus the transforms of the model's param sites (``constrain_fn``)."""
    check_guide(guide)
    rng_key, model_seed, guide_seed = random.split(rng_key, 3)
    model_trace = check_model(model, model_seed, args, kwargs, init_params)
    model_params, model_transforms = _model_param_sites(model_trace)
    guide_init = handlers.seed(guide, guide_seed)
    if init_params is not None:
        guide_init = handlers.substitute(guide_init, init_params)
    guide_trace = handlers.trace(guide_init).get_trace(*args, **kwargs)
    params = {name: site["value"] for name, site in guide_trace.items() if site["type"] == "param"}
    _check_guide_covers_model(model_trace, guide_trace)
    family = family_of(guide)
    shared = sorted(set(params) & set(model_params))
    if shared:
        raise ValueError(
            f"param site {shared[0]!r} is declared by both the model and the guide; "
            "ScoreProximalSVI fits the guide's by proximal steps and the model's by optim, so "
            "the names must differ: rename the model's numpyro.param site."
        )
    if init_params is not None:
        unknown = sorted(set(init_params) - set(params) - set(model_params))
        if unknown:
            raise ValueError(
                f"init_params names {unknown}, which are not param sites of the guide or the "
                f"model (param sites: {sorted(params) + sorted(model_params)}); latent values "
                "are set through the guide, e.g. AutoNormal(model, "
                "init_loc_fn=init_to_value(values=...))."
            )
        params.update({k: v for k, v in init_params.items() if k in params})
    if family.closed_form and not family.loc_names:
        # No latent site (AutoNormal of a model with params only): nothing for the proximal
        # step; each step is an optim step of the params on log p (what SVI does here).
        if not model_params:
            raise ValueError(
                "the model has no latent sample site and no numpyro.param site: there is "
                "nothing to fit. Check that the latents are not all observed (obs=...)."
            )
        if optim is None:
            raise ValueError(
                f"the model has no latent sample site, only the param sites "
                f"{sorted(model_params)}: without optim there is nothing to fit. Pass optim= "
                "(e.g. numpyro.optim.Adam(1e-2)) to fit them on log p, as numpyro.infer.SVI does."
            )
    param_optim_state = ()
    if model_params and optim is None:
        logger.warning(
            "The model has %d numpyro.param site(s) (%s); they are held fixed at their "
            "initial values. Pass optim= (e.g. numpyro.optim.Adam(1e-3)) to fit them on the "
            "ELBO.",
            len(model_params),
            ", ".join(sorted(model_params)),
        )
    elif optim is not None and not model_params:
        logger.warning(
            "optim is given but the model has no numpyro.param site, so it is unused: the "
            "guide's steps are closed-form (inner_optim= sets the inner steps of full- and "
            "low-rank guides)."
        )
    # Through the unconstrained space and back, as numpyro.infer.SVI holds them (an integer
    # initial value of a positive site becomes a float).
    unconstrained = {n: _as_float(model_transforms[n].inv(v)) for n, v in model_params.items()}
    if optim is not None and model_params:
        param_optim_state = _as_numpyro_optim(optim, "optim").init(unconstrained)
    params.update({n: model_transforms[n](u) for n, u in unconstrained.items()})
    # Weak types (Python floats) would change dtype after one step and re-trace jit/scan.
    params = jax.tree.map(lambda x: lax.convert_element_type(x, jnp.result_type(x)), params)
    for name in config.diagonal_only_options():
        if not family.closed_form:
            raise NotImplementedError(
                f"{name} supports AutoNormal and AutoDiagonalNormal guides (got "
                f"{type(guide).__name__}); leave it None for full- and low-rank guides."
            )
    average, rule = (), ()
    if family.closed_form and not family.loc_names:
        optim_state = ()
    elif family.closed_form:
        optim_state = ()
        if config.average_after is not None:
            locs, scales = family.locs_scales(params)
            average = (
                jax.tree.map(jnp.zeros_like, locs),
                jax.tree.map(jnp.zeros_like, scales),
                jnp.zeros((), jnp.int32),
            )
        if config.adaptive:
            rule = _init_adaptive(family, params, config.step_rule)
    else:
        params = family.break_symmetry(random.fold_in(guide_seed, 1), params, init_params)
        transforms = family.transforms(params)
        inner = _as_numpyro_optim(config.inner_optim)
        optim_state = inner.init({n: t.inv(params[n]) for n, t in transforms.items()})
    zero = jnp.zeros((), jnp.int32)
    state = ScoreProximalState(
        params, optim_state, zero, rng_key, average, rule, zero, zero, param_optim_state
    )
    return state, model_transforms


def _check_guide_covers_model(model_trace: dict, guide_trace: dict) -> None:
    """``ValueError`` for a latent model site the guide does not sample (a guide built for
    another version of the model): the step would draw it from its prior at every evaluation
    and fit another model. ``numpyro.infer.SVI`` warns here; the Pyro class raises the same."""
    sampled = {n for n, s in guide_trace.items() if s["type"] == "sample"}
    for name, site in model_trace.items():
        if site["type"] == "sample" and not site["is_observed"] and name not in sampled:
            raise ValueError(
                f"model sample site {name!r} is latent but the guide has no site for it (guide "
                f"sites: {sorted(n for n in sampled if not n.startswith('_'))}). Rebuild the "
                "guide after changing the model, or observe the site (obs=... or "
                "handlers.condition)."
            )


def _as_float(tree):
    """Floating copies of the leaves (an integer initial value cannot be differentiated)."""
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.result_type(x, float)), tree)


def _init_adaptive(family: DiagonalFamily, params: dict, rule: AdaptiveStep) -> AdaptiveState:
    locs, scales = family.locs_scales(params)
    dtype = jnp.result_type(*jax.tree.leaves(locs))
    return AdaptiveState(
        {k: init_rates(v, rule) for k, v in locs.items()},
        jnp.ones((), dtype),
        locs,
        scales,
        jnp.zeros((), bool),
        jnp.full((), jnp.nan, dtype),
        jnp.zeros((), dtype),
        jnp.full((), jnp.nan, dtype),
        jnp.full((), jnp.nan, dtype),
        jnp.zeros((), dtype),
        init_curvature(_flat(locs)) if rule.uses_dense_metric(_flat(locs).size) else (),
        jnp.zeros((), dtype),
        jnp.full((), jnp.inf, dtype),
        jnp.zeros((), jnp.int32),
    )


def _flat(tree: dict) -> jax.Array:
    """The leaves of a site dict, flat and concatenated in its order."""
    return jnp.concatenate([jnp.ravel(v) for v in tree.values()])


def _unflat(flat: jax.Array, like: dict) -> dict:
    out, start = {}, 0
    for k, v in like.items():
        out[k] = flat[start : start + v.size].reshape(v.shape)
        start += v.size
    return out


def _dense_step_statistics(st, locs, scales, offsets, scores, finite, rule, restart=False):
    """The dense metric of a small guide: ``(flat dense mean score, updated curvature, the same
    with refreshed factors)`` (see ``AdaptiveStep.dense_max_dim``)."""
    num = next(iter(offsets.values())).shape[0]
    off = jnp.concatenate([offsets[k].reshape(num, -1) for k in locs], -1)
    sc = jnp.concatenate([scores[k].reshape(num, -1) for k in locs], -1)
    flat = score_statistics(off, sc)
    moments = jnp.concatenate([sc.T @ off, off.T @ off]) / num
    finite = finite & jnp.all(jnp.isfinite(moments))
    curvature = update_curvature(st.curvature, moments, flat, rule, finite, restart)
    refreshed = refresh_curvature(curvature, _flat(scales), rule)
    score, _ = dense_mean_score(refreshed, flat.mean_score)
    return score, curvature, refreshed


def update(
    model: Callable,
    guide: Callable,
    config: ScoreProximalConfig,
    state: ScoreProximalState,
    *args,
    optim: Any = None,
    forward_mode_differentiation: bool = False,
    **kwargs,
) -> tuple[ScoreProximalState, jax.Array]:
    """One proximal step; returns ``(new_state, loss)`` with loss the negative ELBO of q_t.

    Diagonal guides follow ``config.step_rule`` (see :mod:`pyro_scorevi.core` for the accepted /
    reverted / rejected cases); ``step`` counts accepted steps and ``num_rejected`` the others.
    Full- and low-rank guides reject a step whose scores or inner solve are not finite. With
    ``optim`` (the one given to :func:`init`), each accepted step also takes one optimizer step
    of the model's param sites on the ELBO gradient of the same particles.
    ``forward_mode_differentiation`` takes the scores by ``jax.jacfwd`` (as
    ``numpyro.infer.SVI``: for models reverse mode cannot differentiate, e.g.
    ``lax.while_loop``).
    """
    rng_key, step_key = random.split(state.rng_key)
    family = family_of(guide)
    average, rule = state.average, state.rule
    names = sorted(set(state.params) - family.param_names(state.params))
    learn = optim is not None and bool(jax.tree.leaves(state.param_optim_state))
    if learn:
        optim = _as_numpyro_optim(optim, "optim")
        scorer = _Scorer(
            model,
            args,
            kwargs,
            None,
            optim.get_params(state.param_optim_state),
            forward_mode_differentiation,
        )
    else:
        fixed = {n: state.params[n] for n in names}
        scorer = _Scorer(model, args, kwargs, fixed, None, forward_mode_differentiation)
    if family.closed_form and not family.loc_names:
        params, loss, accepted, param_grads = _params_only_step(scorer, state, step_key)
        optim_state = state.optim_state
    elif family.closed_form:
        params, loss, rule, accepted, param_grads = _diagonal_step(
            scorer, family, config, state, step_key
        )
        optim_state = state.optim_state
        if config.average_after is not None:
            average = _accumulate_average(family, average, params, state.step + 1, config, accepted)
    else:
        params, optim_state, loss, accepted, param_grads = _multivariate_step(
            scorer, family, config, state, step_key
        )
    param_optim_state = state.param_optim_state
    if learn:
        # The ELBO's gradient in psi is (1/S) sum_k grad log p(theta_k): minimise its negative.
        stepped = optim.update(
            jax.tree.map(jnp.negative, param_grads), param_optim_state, value=loss
        )
        ok = accepted & _all_finite(param_grads)
        param_optim_state = _select(ok, stepped, param_optim_state)
        params = {**params, **scorer.constrain(optim.get_params(param_optim_state))}
    failed = (~accepted).astype(jnp.int32)
    new_state = ScoreProximalState(
        params,
        optim_state,
        state.step + accepted.astype(jnp.int32),
        rng_key,
        average,
        rule,
        state.num_rejected + failed,
        (state.rejected_in_a_row + failed) * failed,
        param_optim_state,
    )
    return new_state, loss


def _accumulate_average(family: DiagonalFamily, average, params, step, config, accepted=True):
    """Adds the iterate ``(m, s^2)`` after step ``step`` to the running means when
    ``step > average_after`` (a ``jnp.where``, so that ``jit``/``scan`` trace it once)."""
    avg_locs, avg_sq_scales, count = average
    locs, scales = family.locs_scales(params)
    take = (step > config.average_after) & accepted
    new_count = count + take.astype(count.dtype)
    weight = jnp.where(take, 1.0 / jnp.maximum(new_count, 1), 0.0)

    def mean(avg, x):
        return avg + (x - avg) * weight.astype(x.dtype)

    avg_locs = jax.tree.map(mean, avg_locs, locs)
    avg_sq_scales = jax.tree.map(lambda a, sc: mean(a, jnp.square(sc)), avg_sq_scales, scales)
    return avg_locs, avg_sq_scales, new_count


def evaluate(
    model: Callable, guide: Callable, config: ScoreProximalConfig, state, *args, **kwargs
) -> jax.Array:
    """The negative ELBO estimate of :func:`update` (same particles), without the step."""
    _, step_key = random.split(state.rng_key)
    particle_key, model_key = random.split(step_key)
    family = family_of(guide)
    names = set(state.params) - family.param_names(state.params)
    log_joint = make_log_joint(model, args, kwargs, model_key, {n: state.params[n] for n in names})
    if family.closed_form and not family.loc_names:
        return -log_joint({})
    if family.closed_form:
        locs, scales = family.locs_scales(state.params)
        thetas, _ = _diagonal_particles(particle_key, locs, scales, config)
        entropy = family.entropy(scales)
    else:
        posterior = family.posterior(state.params)
        thetas = _multivariate_particles(particle_key, posterior, config)
        entropy = posterior.entropy()
    log_p = particle_log_joints(log_joint, family.to_latents, thetas)
    return -(log_p.mean() + entropy)


def _diagonal_particles(key, locs: dict, scales: dict, config: ScoreProximalConfig):
    eps = standard_normal_particles(key, locs, config.num_particles, config.antithetic)
    # Offsets are s * eps exactly, so antithetic pairs average to exactly 0.
    offsets = {k: scales[k] * eps[k] for k in locs}
    thetas = {k: locs[k] + offsets[k] for k in locs}
    return thetas, offsets


def _multivariate_particles(key, posterior, config: ScoreProximalConfig):
    eps = standard_normal_particles(key, posterior.loc, config.num_particles, config.antithetic)
    return posterior.loc + eps @ posterior.scale_tril.T


def _diagonal_step(scorer: _Scorer, family: DiagonalFamily, config, state, step_key):
    """Returns ``(params, loss, rule_state, accepted, param_grads)``; the params are always
    finite; ``param_grads`` is the ELBO gradient of the learned model params (else ``None``)."""
    particle_key, model_key = random.split(step_key)
    locs, scales = family.locs_scales(state.params)
    thetas, offsets = _diagonal_particles(particle_key, locs, scales, config)
    log_p, scores, param_grads = scorer(model_key, family.to_latents, thetas)
    loss = -(log_p.mean() + family.entropy(scales))
    dtype = jnp.result_type(*jax.tree.leaves(locs))
    stats = {k: score_statistics(offsets[k], scores[k]) for k in locs}
    finite = jnp.isfinite(loss) & _all_finite(stats)
    if not config.adaptive:
        rule = config.step_rule
        weight, scale_weight = (jnp.asarray(w, dtype) for w in config.fixed_weights(state.step))
        new_locs, new_scales = {}, {}
        for k in locs:
            new_locs[k], new_scales[k] = diagonal_proximal_update(
                locs[k], scales[k], stats[k], weight, rule.num_alternations, scale_weight
            )
        positive = jnp.all(jnp.stack([jnp.all(v > 0) for v in jax.tree.leaves(new_scales)]))
        accepted = finite & _all_finite((new_locs, new_scales)) & positive
        new_locs = _select(accepted, new_locs, locs)
        new_scales = _select(accepted, new_scales, scales)
        params = family.with_locs_scales(state.params, new_locs, new_scales)
        return params, loss, (), accepted, param_grads
    rule, st = config.step_rule, state.rule
    tolerance = (
        rule.revert_tolerance * jnp.abs(st.backup_loss)
        + rule.revert_noise * jnp.sqrt(st.loss_noise)
        + 1.0
    )
    revert = st.has_backup & (~finite | (loss > st.backup_loss + tolerance))
    release = cap_release(rule, st.loss_fast, st.loss_slow, st.loss_noise, state.step, jnp)
    release = release.astype(dtype)
    decay = floor_decay(rule, st.released)  # one scalar for every site
    curvature, dense = st.curvature, isinstance(st.curvature, CurvatureState)
    if dense:
        restart = should_restart(rule, st.curvature.restarted, release, st.trust, jnp)
        score, curvature, refreshed = _dense_step_statistics(
            st, locs, scales, offsets, scores, finite, rule, restart
        )
        score = _unflat(score, locs)
        stats = {k: stats[k]._replace(mean_score=score[k]) for k in locs}
        settles = rule.settled_scale_rate > 0  # opt-in: nothing to trace on the default step
        precision = _unflat(settled_precision(refreshed), locs) if settles else None
    new_locs, new_scales, new_rates = {}, {}, {}
    for k in locs:
        new_locs[k], new_scales[k], new_rates[k], _ = adaptive_update(
            locs[k],
            scales[k],
            stats[k],
            st.rates[k],
            st.trust,
            rule,
            release,
            decay,
            apply_variance_ratio=not dense,
            precision=precision[k] if dense and precision is not None else None,
        )
    accepted = ~revert & finite & _all_finite((new_locs, new_scales))
    if dense:  # the refreshed factors are kept only if the step is accepted (as torch)
        curvature = _select(accepted, refreshed, curvature)
    out_locs = _select(accepted, new_locs, _select(revert, st.backup_locs, locs))
    out_scales = _select(accepted, new_scales, _select(revert, st.backup_scales, scales))
    trust = jnp.where(
        accepted,
        jnp.minimum(1.0, st.trust * rule.recovery),
        jnp.maximum(MIN_TRUST, st.trust * rule.backoff),
    ).astype(dtype)
    sample = noise_average(st.loss_noise, loss, st.backup_loss, jnp)
    noise = jnp.where(
        accepted & st.has_backup,
        sample,
        # No noise sample yet: 25% of the loss, as the torch core.
        jnp.where(accepted & (state.step == 0), initial_noise(loss, jnp), st.loss_noise),
    ).astype(dtype)
    fast, slow = progress_means(rule, st.loss_fast, st.loss_slow, loss, jnp, noise)
    largest = jnp.any(
        jnp.stack(
            [
                jnp.any(
                    at_largest_step(
                        rule,
                        new_rates[k].last_mean_step,
                        new_rates[k].mean_radius,
                        st.trust,
                        scales[k],
                        new_scales[k],
                        jnp,
                    )
                )
                for k in new_rates
            ]
        )
    )
    frequency = largest_frequency(st.largest_frequency, largest)
    ceiling = loss_ceiling(st.loss_ceiling, fast, noise, jnp)
    new_rule = AdaptiveState(
        _select(accepted, new_rates, st.rates),
        trust,
        _select(accepted, locs, st.backup_locs),
        _select(accepted, scales, st.backup_scales),
        jnp.where(accepted, True, jnp.where(revert, False, st.has_backup)),
        jnp.where(accepted, loss, st.backup_loss).astype(dtype),
        noise,
        jnp.where(accepted, fast, st.loss_fast).astype(dtype),
        jnp.where(accepted, slow, st.loss_slow).astype(dtype),
        jnp.where(accepted, st.released + release, st.released).astype(dtype),
        curvature,
        jnp.where(accepted, frequency, st.largest_frequency).astype(dtype),
        jnp.where(accepted, ceiling, st.loss_ceiling).astype(dtype),
        jnp.where(
            accepted,
            steps_above_ceiling(st.steps_above_ceiling, fast, ceiling, jnp),
            st.steps_above_ceiling,
        ).astype(jnp.int32),
    )
    params = family.with_locs_scales(state.params, out_locs, out_scales)
    return params, loss, new_rule, accepted, param_grads


def _params_only_step(scorer: _Scorer, state, step_key):
    """A model with no latent site: the loss is :math:`-\\log \\hat p_\\psi` (one pass; every
    particle would be the same) and ``param_grads`` its gradient, for ``optim``."""
    _, model_key = random.split(step_key)
    log_p, _, param_grads = scorer(model_key, lambda theta: {}, {"_": jnp.zeros((1,))})
    loss = -log_p.mean()
    accepted = jnp.isfinite(loss)
    return dict(state.params), loss, accepted, param_grads


def _all_finite(tree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def _select(pred, on_true, on_false):
    return jax.tree.map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)


def _multivariate_step(scorer: _Scorer, family: MultivariateFamily, config, state, step_key):
    """Returns ``(params, optim_state, loss, accepted, param_grads)``; a step whose scores or
    inner solve are not finite keeps :math:`q_t` and the inner optimizer's state."""
    particle_key, model_key = random.split(step_key)
    frozen = family.posterior(state.params)
    loc_t, tril_t = frozen.loc, frozen.scale_tril
    thetas = _multivariate_particles(particle_key, frozen, config)
    log_p, scores, param_grads = scorer(model_key, family.to_latents, thetas)
    loss = -(log_p.mean() + frozen.entropy())
    weight = jnp.asarray(config.fixed_weights(state.step)[0], loc_t.dtype)

    transforms = family.transforms(state.params)

    def constrain(unconstrained):
        return {**state.params, **{n: t(unconstrained[n]) for n, t in transforms.items()}}

    def objective(unconstrained):
        q = family.posterior(constrain(unconstrained))
        q_scores = jax.vmap(jax.grad(q.log_prob))(thetas)
        # ||r||^2_{Cov(q_t)} = ||L_t^T r||^2, row-wise for r_k = grad log q(theta_k) - g_k.
        fit = jnp.square((q_scores - scores) @ tril_t).sum(-1).mean()
        kl = gaussian_kl(loc_t, tril_t, q.loc, q.scale_tril)
        return fit + weight * kl, None

    optim = _as_numpyro_optim(config.inner_optim)

    def inner(_, opt_state):
        _, opt_state = optim.eval_and_update(objective, opt_state)
        return opt_state

    opt_state = lax.fori_loop(0, config.num_inner_steps, inner, state.optim_state)
    params = constrain(optim.get_params(opt_state))
    accepted = jnp.isfinite(loss) & _all_finite(scores) & _all_finite(params)
    params = _select(accepted, params, state.params)
    opt_state = _select(accepted, opt_state, state.optim_state)
    return params, opt_state, loss, accepted, param_grads


# ------------------------------------------------------------------------------- stateful class


class ScoreProximalSVI:
    """Score-based proximal variational inference with the surface of ``numpyro.infer.SVI``.

    ``ScoreProximalSVI(model, guide, optim, loss, **static_kwargs)`` accepts what
    ``numpyro.infer.SVI`` is given, with these meanings:

    Args:
        model: a NumPyro model with continuous global latents; its own ``numpyro.param``
            sites :math:`\\psi` (and ``numpyro.module`` networks) are fitted by ``optim``.
        guide: ``AutoNormal`` or ``AutoDiagonalNormal`` (closed-form step), or
            ``AutoMultivariateNormal`` / ``AutoLowRankMultivariateNormal`` (inner steps).
        optim: optional ``numpyro.optim`` optimizer (or a ``jax.example_libraries`` one, or
            an optax ``GradientTransformation``) for the model's param sites, stepped once per
            accepted proximal step on the ELBO gradient
            :math:`\\frac1S\\sum_k \\nabla_\\psi \\log \\hat p_\\psi(\\theta_k)` in unconstrained
            space, as ``numpyro.infer.SVI`` steps them. The guide never uses it (its step is
            closed-form). ``None``: the model's param sites stay at their initial values.
        loss: optional ELBO (``Trace_ELBO(num_particles=S)`` and the like), which sets
            :math:`S` = ``loss.num_particles``; nothing differentiates it. ``svi.loss`` is it
            (default ``Trace_ELBO(num_particles)``), so ``svi.loss.loss(key, params, model,
            guide, *args)`` is NumPyro's own estimate of the -ELBO that ``update`` reports.
            ``RenyiELBO`` (another objective) is refused.
        **hyperparameters: keyword-only ``num_particles``, ``step_rule``, ``prox_weight``,
            ``scale_prox_weight``, ``antithetic``, ``num_alternations``, ``inner_optim``,
            ``num_inner_steps`` and ``average_after``, as in the Pyro
            class; see :class:`ScoreProximalConfig`.
        static_kwargs: constant keyword arguments of the model / guide.

    Attributes:
        model, guide, optim, loss, static_kwargs: as given (``optim`` wrapped as a
            ``numpyro.optim`` optimizer, as ``numpyro.infer.SVI`` wraps it).
        num_particles: :math:`S`.
        config: the :class:`ScoreProximalConfig`.
        constrain_fn: after :meth:`init`, maps unconstrained values of the model's param
            sites (what ``optim`` holds) to constrained ones; ``None`` before.

    Example::

        guide = AutoNormal(model)
        svi = ScoreProximalSVI(model, guide)
        result = svi.run(random.PRNGKey(0), 2000, data, progress_bar=False)
        samples = guide.sample_posterior(random.PRNGKey(1), result.params, sample_shape=(100,))

    Reference: M. Kim, "Large-scale Score-based Variational Posterior Inference for Bayesian
    Deep Neural Networks", arXiv:2602.05873, 2026.
    """

    def __init__(
        self,
        model: Callable,
        guide: Callable,
        optim: Any = None,
        loss: Any = None,
        *,
        num_particles: int | None = None,
        step_rule: StepRule | None = None,
        prox_weight: ProxWeight | None = None,
        scale_prox_weight: ProxWeight | None = None,
        antithetic: bool = defaults.ANTITHETIC,
        num_alternations: int | None = None,
        inner_optim: Any = None,
        num_inner_steps: int = defaults.NUM_INNER_STEPS,
        average_after: int | None = None,
        **static_kwargs,
    ):
        if not callable(model):
            raise TypeError(f"model must be a callable NumPyro model (got {type(model).__name__}).")
        check_guide(guide)
        num_particles = _particles_from_loss(loss, num_particles)
        _as_numpyro_optim(inner_optim)  # validate at construction
        self.model = model
        self.guide = guide
        self.optim = None if optim is None else _as_numpyro_optim(optim, "optim")
        self.config = ScoreProximalConfig(
            num_particles=defaults.NUM_PARTICLES if num_particles is None else num_particles,
            step_rule=step_rule,
            prox_weight=prox_weight,
            antithetic=antithetic,
            num_alternations=num_alternations,
            inner_optim=inner_optim,
            num_inner_steps=num_inner_steps,
            scale_prox_weight=scale_prox_weight,
            average_after=average_after,
        )
        warn_one_particle(self.config.num_particles, loss)
        self.num_particles = self.config.num_particles
        self.loss = loss if loss is not None else Trace_ELBO(num_particles=self.num_particles)
        self.static_kwargs = static_kwargs
        self.constrain_fn = None

    def init(self, rng_key, *args, init_params=None, **kwargs) -> ScoreProximalState:
        """The initial :class:`ScoreProximalState` (see :func:`init`); sets ``constrain_fn``."""
        kwargs = {**kwargs, **self.static_kwargs}
        state, transforms = _init(
            self.model, self.guide, self.config, rng_key, args, kwargs, init_params, self.optim
        )
        self.constrain_fn = partial(transform_fn, transforms)
        return state

    def get_params(self, state: ScoreProximalState) -> dict:
        """The guide's constrained params, as ``numpyro.infer.SVI.get_params`` returns them."""
        return dict(state.params)

    def get_averaged_params(self, state: ScoreProximalState) -> dict:
        """The params with the averaged iterates (``average_after``): :math:`\\bar m` and
        :math:`\\bar s = (\\overline{s^2})^{1/2}`, for ``guide.sample_posterior`` and
        ``Predictive`` as :meth:`get_params`. Raises ``ValueError`` before any iterate has been
        averaged."""
        count = int(state.average[2]) if state.average else 0
        if count == 0:
            raise ValueError(
                f"no averaged iterates yet (average_after = {self.config.average_after!r}, "
                f"{int(state.step)} steps taken); pass average_after=N with a diagonal guide and "
                "take more than N steps."
            )
        family = family_of(self.guide)
        avg_locs, avg_sq_scales, _ = state.average
        return family.with_locs_scales(
            dict(state.params), avg_locs, jax.tree.map(jnp.sqrt, avg_sq_scales)
        )

    def update(
        self,
        state: ScoreProximalState,
        *args,
        forward_mode_differentiation: bool = False,
        **kwargs,
    ):
        """One proximal step; returns ``(state, loss)``, loss the negative ELBO of q_t.

        ``forward_mode_differentiation``: take the scores (and the model params' gradient) by
        ``jax.jacfwd``, as ``numpyro.infer.SVI.update`` does, for models that reverse mode
        cannot differentiate (``lax.while_loop``); it is not passed to the model.
        """
        return update(
            self.model,
            self.guide,
            self.config,
            state,
            *args,
            optim=self.optim,
            forward_mode_differentiation=forward_mode_differentiation,
            **kwargs,
            **self.static_kwargs,
        )

    def stable_update(
        self,
        state: ScoreProximalState,
        *args,
        forward_mode_differentiation: bool = False,
        **kwargs,
    ):
        """Like :meth:`update`, but a step whose loss or new params are not finite keeps the
        params, optimizer state and step count, and reports a NaN loss. The key still
        advances, so a retry draws new particles (as ``numpyro.infer.SVI.stable_update``).
        Under ``AdaptiveStep`` :meth:`update` already keeps the params finite (it reverts or
        rejects), so only the loss is masked."""
        new_state, loss = self.update(
            state, *args, forward_mode_differentiation=forward_mode_differentiation, **kwargs
        )
        if self.config.adaptive and family_of(self.guide).closed_form:
            return new_state, jnp.where(jnp.isfinite(loss), loss, jnp.nan)
        leaves = [loss] + jax.tree.leaves(new_state.params)
        ok = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))
        params = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new_state.params, state.params)
        optim_state = jax.tree.map(
            lambda n, o: jnp.where(ok, n, o), new_state.optim_state, state.optim_state
        )
        average = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new_state.average, state.average)
        param_optim_state = jax.tree.map(
            lambda n, o: jnp.where(ok, n, o), new_state.param_optim_state, state.param_optim_state
        )
        step = jnp.where(ok, new_state.step, state.step)
        loss = jnp.where(ok, loss, jnp.nan)
        failed = (~ok).astype(jnp.int32)
        num_rejected = jnp.where(ok, new_state.num_rejected, state.num_rejected + 1)
        in_a_row = jnp.where(ok, new_state.rejected_in_a_row, state.rejected_in_a_row + failed)
        return ScoreProximalState(
            params,
            optim_state,
            step,
            new_state.rng_key,
            average,
            new_state.rule,
            num_rejected,
            in_a_row,
            param_optim_state,
        ), loss

    def evaluate(self, state: ScoreProximalState, *args, **kwargs) -> jax.Array:
        """The loss :meth:`update` would report from ``state`` (same key), without stepping."""
        return evaluate(
            self.model, self.guide, self.config, state, *args, **kwargs, **self.static_kwargs
        )

    def run(
        self,
        rng_key,
        num_steps: int,
        *args,
        progress_bar: bool = True,
        stable_update: bool = False,
        forward_mode_differentiation: bool = False,
        init_state: ScoreProximalState | None = None,
        init_params: dict | None = None,
        **kwargs,
    ) -> ScoreProximalRunResult:
        """Runs ``num_steps`` steps; returns ``(params, state, losses)``.

        With ``progress_bar`` a jitted step runs in a Python loop under a ``tqdm`` bar;
        without, all steps run in one ``lax.scan``. Both give the same result for one key.
        ``init_state`` continues a previous run (``rng_key`` is then unused).
        ``forward_mode_differentiation`` is passed to :meth:`update` (not to the model).
        """
        if isinstance(num_steps, jax.Array) and num_steps.shape == ():
            if jnp.issubdtype(num_steps.dtype, jnp.integer):
                num_steps = int(num_steps)  # as numpyro.infer.SVI.run accepts
        if isinstance(num_steps, bool) or not isinstance(num_steps, numbers.Integral):
            raise TypeError(f"num_steps must be an int (got {type(num_steps).__name__}).")
        if num_steps < 1:
            raise ValueError(
                f"num_steps must satisfy num_steps >= 1 (got num_steps = {num_steps})."
            )
        step_fn = self.stable_update if stable_update else self.update

        def body_fn(state, _):
            return step_fn(
                state, *args, forward_mode_differentiation=forward_mode_differentiation, **kwargs
            )

        if init_state is None:
            state = self.init(rng_key, *args, init_params=init_params, **kwargs)
        else:
            state = init_state
        rejected_before = int(state.num_rejected)
        if progress_bar:
            losses = []
            jitted = jax.jit(body_fn)
            batch = max(num_steps // 20, 1)
            with tqdm.trange(1, num_steps + 1) as bar:
                for i in bar:
                    state, loss = jitted(state, None)
                    losses.append(loss)
                    if i % batch == 0:
                        # One transfer per batch instead of a device sync per step.
                        window = jax.device_get(losses[i - batch :])
                        losses[i - batch :] = window
                        finite = [float(x) for x in window if x == x]
                        avg = sum(finite) / len(finite) if finite else float("nan")
                        bar.set_postfix_str(
                            f"init loss: {float(losses[0]):.4f}, "
                            f"avg. loss [{i - batch + 1}-{i}]: {avg:.4f}",
                            refresh=False,
                        )
            losses = jnp.stack([jnp.asarray(x) for x in losses])
        else:
            state, losses = lax.scan(body_fn, state, None, length=num_steps)
        logger.debug("ScoreProximalSVI.run: %d steps done", num_steps)
        result = ScoreProximalRunResult(self.get_params(state), state, losses)
        _warn_if_failing(result, int(state.num_rejected) - rejected_before, num_steps)
        _warn_if_frozen(self.config.step_rule, state)
        _warn_if_diverging(self.config.step_rule, state)
        return result
