"""The general inner-step path: any guide whose density can be evaluated at fixed points.

A guide is seen through its trace. Its *random roots* are the sample sites whose distribution
is not a ``Delta`` (an autoguide's auxiliary latent, a hand-written guide's ``pyro.sample``
sites); each root :math:`r` has unconstrained coordinates
:math:`\\theta_r = T_r^{-1}(v_r)`, :math:`T_r` = ``biject_to(support)``. Its ``Delta`` sites are
either functions of the roots (an autoguide's model sites, whose ``log_density`` carries the
Jacobian) or fixed by parameters alone (``AutoDelta``, a hand-written MAP site). For the particles
:math:`\\theta_k \\sim q_{\\phi_t}` of a step, with :math:`c_r` the scale of root :math:`r` (the
:math:`N/B` of its subsampled plates) and :math:`F` the part of the ELBO integrand that the
step differentiates,

.. math::

    F(\\theta) = \\log p(z(\\theta)) - \\sum_{\\text{Delta sites}} c\\,\\log q
        + \\sum_r c_r \\log\\lvert\\det J_{T_r}(\\theta_r)\\rvert,
    \\qquad \\hat g_{k,r} = \\nabla_{\\theta_r} F(\\theta_k) / c_r,

the guide's parameters then take ``num_inner_steps`` optimiser steps on

.. math::

    J(\\phi) = \\frac1S\\sum_k\\sum_r c_r w_r
        \\lVert \\nabla_{\\theta_r}\\log q_\\phi(\\theta_k) / c_r - \\hat g_{k,r}\\rVert^2
        + \\frac\\lambda2 \\sum_j F_j (\\phi_j - \\phi_{t,j})^2,

the score-matching term with the score of :math:`\\log q_\\phi` by autograd at the fixed
:math:`\\theta_k` (no reparametrisation), and :math:`\\lambda\\,\\mathrm{KL}(q_t\\Vert q_\\phi)`
to second order, with :math:`F` a running estimate of the diagonal Fisher information
:math:`\\mathbb E_q[(\\nabla_\\phi \\log q_\\phi)^2]` (a Monte Carlo KL over the step's few
particles instead would be minimised by a narrower :math:`q` at every step). :math:`w_r` is a
running estimate of the variance of root :math:`r` under :math:`q` (the weighting
:math:`W = \\mathrm{Cov}(q_t)` of the closed form, one number per root); :math:`\\lambda` is the
``FixedStep`` weight, else ``defaults.PROX_WEIGHT``. Only parameters that the objective reaches
take these steps. Parameters that act through ``Delta`` sites alone take one optimiser step on
:math:`-\\frac1S\\sum_k\\nabla_\\phi F(\\theta_k)`, the gradient ``Trace_ELBO`` gives them:
MAP for ``AutoDelta``, and the reparametrised ELBO gradient for a guide that draws
parameter-free noise and maps it through its parameters (``AutoStructured``). The step returns
:math:`-\\frac1S\\sum_k [\\log p(z_k) - \\log q(z_k)]` (+ the closed-form entropy of the
diagonal parts), the estimate ``Trace_ELBO`` reports.

:class:`CompositeFamily` combines this path with the closed form: the closed-form parts of an
``AutoGuideList`` (``AutoNormal``, ``AutoDiagonalNormal``, ``AutoNormalMessenger``) keep their
closed-form step on the same particles and scores, under the step rule of the diagonal path.
"""

from __future__ import annotations

import logging
import math
from typing import Any, NamedTuple

import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions.transforms import biject_to
from pyro.distributions.util import scale_and_mask
from pyro.infer.autoguide import AutoGuideList
from pyro.infer.util import zero_grads
from pyro.poutine.util import site_is_subsample
from pyro.util import get_rng_state, set_rng_state

from pyro_scorevi import core
from pyro_scorevi.guides import DiagonalFamily
from pyro_scorevi.proximal import ScoreStatistics
from pyro_scorevi.scores import LogJoint

__all__ = ["CompositeFamily", "GeneralFamily", "gather_state", "scatter_state"]

logger = logging.getLogger(__name__)

#: Decay of the running per-root variance :math:`w_r` (about 20 steps of memory): the guide
#: moves slowly compared with that, and the weighting is fixed within a step.
VARIANCE_DECAY = 0.95


def _is_delta(fn) -> bool:
    while True:
        if isinstance(fn, dist.Delta):
            return True
        base = getattr(fn, "base_dist", None)
        if base is None or isinstance(fn, dist.TransformedDistribution):
            return False
        fn = base


def _factor(site, like: torch.Tensor):
    """The site's scale as a float, or a tensor that broadcasts against ``like``."""
    scale = site["scale"]
    if isinstance(scale, torch.Tensor):
        if scale.numel() == 1:
            return float(scale)
        return scale.reshape(scale.shape + (1,) * (like.dim() - scale.dim()))
    return float(scale)


class GeneralFamily:
    """One or several guides fitted by the general inner-step path (see the module docstring).

    Args:
        parts: the guides (callables with the model's arguments); for an ``AutoGuideList`` the
            parts other than the closed-form ones.
        args, kwargs: the model's arguments, to set the family up.
        model_param_names: ``pyro.param`` names of the model (a messenger guide runs the model,
            so its trace shows them): they are the model's, fitted by ``optim=``.
    """

    def __init__(self, parts, args: tuple, kwargs: dict, model_param_names=()):
        self.parts = list(parts)
        self.model_param_names = set(model_param_names)
        self.roots: list[str] = []
        self.deltas: list[str] = []
        self.sites: list[str] = []  # the model's latent sites whose values the guide gives
        self.root_transforms: dict[str, Any] = {}
        rng_state = get_rng_state()  # setting up draws nothing (a resumed run stays exact)
        try:
            with torch.no_grad():
                self._classify(self._trace({}, args, kwargs))
        finally:
            set_rng_state(rng_state)
        self.variance: dict[str, float] = {}
        self.metric: dict[str, torch.Tensor] = {}

    def _classify(self, trace) -> list[str]:
        """The trace's random roots (recorded, with their bijections); a model whose site names
        change between calls (a sequential plate's subsample) adds its new names."""
        roots = []
        for name, site in trace.nodes.items():
            if site["type"] != "sample" or site["is_observed"] or site_is_subsample(site):
                continue
            fn = site["fn"]
            if getattr(fn.support, "is_discrete", False):
                raise NotImplementedError(
                    f"guide sample site {name!r} is discrete ({type(fn).__name__}, in "
                    f"{self._describe()}); the score-proximal step needs continuous guide "
                    "sites. Marginalise the discrete latent in the model and use a continuous "
                    "guide (e.g. AutoNormal(model)), or fit with pyro.infer.TraceEnum_ELBO."
                )
            if not site["infer"].get("is_auxiliary", False) and name not in self.sites:
                self.sites.append(name)
            if _is_delta(fn):
                if name not in self.deltas:
                    self.deltas.append(name)
                continue
            roots.append(name)
            if name not in self.root_transforms:
                self.roots.append(name)
                self.root_transforms[name] = biject_to(fn.support)
        return roots

    def _describe(self) -> str:
        return ", ".join(
            type(p).__name__ if not _is_function(p) else "a hand-written guide" for p in self.parts
        )

    def _guide(self, *args, **kwargs):
        for part in self.parts:
            part(*args, **kwargs)

    def _trace(self, data: dict, args: tuple, kwargs: dict):
        guide = poutine.condition(self._guide, data=data) if data else self._guide
        return poutine.trace(guide).get_trace(*args, **kwargs)

    @torch.no_grad()
    def sample(self, args: tuple, kwargs: dict, subsample: dict | None):
        """One draw from the current guide: ``(theta, subsample)``, the unconstrained root
        values and the plate indices the guide used."""
        trace = self._trace(dict(subsample or {}), args, kwargs)
        theta = {}
        for name in self._classify(trace):
            value = trace.nodes[name]["value"]
            theta[name] = self.root_transforms[name].inv(value).detach().clone()
        used = {
            name: site["value"]
            for name, site in trace.nodes.items()
            if site["type"] == "sample" and site_is_subsample(site)
        }
        return theta, used

    def evaluate(self, theta: dict, args: tuple, kwargs: dict, subsample: dict | None):
        """The guide at fixed root coordinates ``theta``, with live parameters.

        Returns a :class:`GuideEvaluation`.
        """
        data = dict(subsample or {})
        log_det, factors = 0.0, {}
        for name, value in theta.items():
            transform = self.root_transforms[name]
            data[name] = transform(value)
        trace = self._trace(data, args, kwargs)
        log_q_roots, log_q_deltas, params, names, values = 0.0, 0.0, [], [], {}
        for name, site in trace.nodes.items():
            if site["type"] == "param":
                if name not in self.model_param_names and name not in names:
                    leaf = site["value"].unconstrained()
                    if leaf.requires_grad:
                        params.append(leaf)
                        names.append(name)
                continue
            if site["type"] != "sample" or site_is_subsample(site):
                continue
            if name not in theta and (site["is_observed"] or not _is_delta(site["fn"])):
                continue  # the model's own observed and deterministic sites (messenger guides)
            if not site["infer"].get("is_auxiliary", False):
                values[name] = site["value"]
            log_p = site["fn"].log_prob(site["value"], *site["args"], **site["kwargs"])
            term = scale_and_mask(log_p, site["scale"], site["mask"]).sum()
            if name in theta:
                log_q_roots = log_q_roots + term
                transform = self.root_transforms[name]
                factors[name] = _factor(site, theta[name])
                jac = transform.log_abs_det_jacobian(theta[name], data[name])
                log_det = log_det + (_factor(site, jac) * jac).sum()
            else:
                log_q_deltas = log_q_deltas + term
        return GuideEvaluation(values, log_q_roots, log_q_deltas, log_det, factors, params, names)

    def update_metric(self, names: list[str], squares: list[torch.Tensor]) -> None:
        """Running diagonal Fisher information :math:`F = \\mathbb E[(\\nabla_\\phi\\log
        q_\\phi)^2]` of the parameters, from the step's particles."""
        for name, square in zip(names, squares):
            if not bool(torch.isfinite(square).all()):
                continue
            old = self.metric.get(name)
            self.metric[name] = (
                square
                if old is None or old.shape != square.shape
                else old.lerp(square, 1 - VARIANCE_DECAY)
            )

    def update_variance(self, thetas: list[dict]) -> None:
        """Running per-root variance :math:`w_r` from the spread of the step's particles."""
        if len(thetas) < 2:
            return
        for name in thetas[0]:
            if not all(name in t and t[name].shape == thetas[0][name].shape for t in thetas):
                continue
            stack = torch.stack([t[name] for t in thetas])
            if stack.numel() == 0:
                continue
            spread = float(stack.var(0, unbiased=True).mean())
            if not math.isfinite(spread) or spread <= 0:
                continue
            old = self.variance.get(name)
            self.variance[name] = (
                spread if old is None else VARIANCE_DECAY * old + (1 - VARIANCE_DECAY) * spread
            )

    def inner_steps(self, thetas, scores, args, kwargs, subsample, optim, num_steps, weight):
        """``num_steps`` optimiser steps on :math:`J(\\phi)`; returns the guide's parameters.

        The proximal term is :math:`\\mathrm{KL}(q_t\\Vert q_\\phi)` to second order,
        :math:`\\tfrac12\\sum_j F_j(\\phi_j - \\phi_{t,j})^2` with the running Fisher
        information :math:`F` (:meth:`update_metric`): exact at :math:`\\phi_t` and free of the
        Monte Carlo noise of a sampled KL, whose minimiser over the step's few particles
        shrinks the scales step after step.
        """
        params, start = [], None
        for _ in range(num_steps):
            objective = 0.0
            for theta, score in zip(thetas, scores):
                leaves = {n: v.detach().requires_grad_() for n, v in theta.items()}
                evaluation = self.evaluate(leaves, args, kwargs, subsample)
                params, names = evaluation.params, evaluation.names
                grads = torch.autograd.grad(
                    evaluation.log_q_roots + evaluation.log_det,
                    list(leaves.values()),
                    create_graph=True,
                    allow_unused=True,
                )
                for (name, leaf), g in zip(leaves.items(), grads):
                    g = torch.zeros_like(leaf) if g is None else g
                    factor = evaluation.factors[name]
                    residual = g / factor - score[name]
                    w = self.variance.get(name, 1.0)
                    objective = objective + (factor * w * residual.square()).sum()
            if not params or not isinstance(objective, torch.Tensor):
                return params
            if start is None:
                start = [p.detach().clone() for p in params]
            objective = objective / len(thetas)
            for name, p, p0 in zip(names, params, start):
                metric = self.metric.get(name)
                if metric is not None and metric.shape == p.shape:
                    objective = objective + 0.5 * weight * (metric * (p - p0).square()).sum()
            objective.backward()
            # Only the parameters of the roots' densities: a parameter the objective does not
            # reach (a MAP site's, or one acting through a Delta site alone) must not take
            # Adam's momentum steps here.
            moved = [p for p in params if p.grad is not None and bool((p.grad != 0).any())]
            if not moved:
                zero_grads(params)
                return params
            optim(moved)
            zero_grads(params)
        return params


class GuideEvaluation(NamedTuple):
    """The guide at fixed root coordinates (:meth:`GeneralFamily.evaluate`).

    Attributes:
        values: the model sites' constrained values.
        log_q_roots: summed scaled log densities of the roots (in their support).
        log_q_deltas: summed scaled log densities of the ``Delta`` sites.
        log_det: summed scaled log-Jacobians :math:`\\log\\lvert\\det J_{T_r}\\rvert`.
        factors: each root's scale :math:`c_r`.
        params, names: the guide's parameter leaves (the model's own excluded) and names.
    """

    values: dict
    log_q_roots: Any
    log_q_deltas: Any
    log_det: Any
    factors: dict
    params: list
    names: list


def _is_validation_error(error: ValueError) -> bool:
    """The ``ValueError`` of ``Distribution.__init__`` / ``_validate_sample`` argument checks."""
    return str(error).startswith(("Expected parameter", "Expected value argument"))


def _is_function(part) -> bool:
    return not isinstance(part, torch.nn.Module)


def gather_state(state: core.DiagonalState, index: torch.Tensor) -> core.DiagonalState:
    """The state of the coordinates ``index`` (the active set of a step with local latents)."""
    rates = state.rates
    if rates is not None:
        rates = type(rates)(*(t[index] for t in rates))
    return state._replace(
        loc=state.loc[index],
        scale=state.scale[index],
        rates=rates,
        backup_loc=None if state.backup_loc is None else state.backup_loc[index],
        backup_scale=None if state.backup_scale is None else state.backup_scale[index],
    )


def scatter_state(
    full: core.DiagonalState, new: core.DiagonalState, info: core.StepInfo, index: torch.Tensor
) -> core.DiagonalState:
    """The full state after a step of the coordinates ``index``: an accepted step moves them
    (the others keep their values, and the backup is the whole previous iterate); a revert
    returns every coordinate to the backup; a rejected step changes no coordinate."""
    if info.reverted:
        return new._replace(loc=full.backup_loc, scale=full.backup_scale, rates=full.rates)
    if not info.accepted:
        return new._replace(
            loc=full.loc,
            scale=full.scale,
            rates=full.rates,
            backup_loc=full.backup_loc,
            backup_scale=full.backup_scale,
        )
    rates = full.rates
    if rates is not None:
        rates = type(rates)(*(t.index_copy(0, index, s) for t, s in zip(rates, new.rates)))
    return new._replace(
        loc=full.loc.index_copy(0, index, new.loc),
        scale=full.scale.index_copy(0, index, new.scale),
        rates=rates,
        backup_loc=full.loc,
        backup_scale=full.scale,
    )


def diagonal_sampler(loc: torch.Tensor, scale: torch.Tensor, antithetic: bool):
    """``draw(k) -> (offset, theta)`` with :math:`\\theta = m + s\\varepsilon`; the odd ``k`` of
    an antithetic pair reuses :math:`-\\varepsilon`."""
    last = None

    def draw(k: int):
        nonlocal last
        offset = -last if antithetic and k % 2 == 1 else scale * torch.randn_like(scale)
        last = offset
        return offset, loc + offset

    return draw


class CompositeFamily:
    """A guide fitted by the general path, with its closed-form parts (if any) kept.

    Args:
        guide: the whole guide.
        diagonal_parts: guides fitted by the closed form (the ``AutoNormal``,
            ``AutoDiagonalNormal``, ``AutoNormalMessenger`` parts of an ``AutoGuideList``).
        general_parts: the other guides (the general path).
        args, kwargs: the model's arguments.

    A guide with no latent site at all (a model whose only unknowns are ``pyro.param`` sites)
    is a composite with no parts: each step fits the model's parameters with ``optim=``.

    Attributes:
        diagonal: the :class:`~pyro_scorevi.guides.DiagonalFamily` of the closed-form parts.
        general: the :class:`GeneralFamily` of the others.
        transforms: site name to bijection, for the closed-form parts' sites.
        state: the diagonal parts' :class:`~pyro_scorevi.core.DiagonalState`.
    """

    def __init__(self, guide, diagonal_parts, general_parts, args: tuple, kwargs: dict):
        self.guide = guide
        self.diagonal = DiagonalFamily(diagonal_parts) if diagonal_parts else None
        self.transforms = dict(self.diagonal.transforms) if self.diagonal else {}
        self.general = GeneralFamily(general_parts, args, kwargs) if general_parts else None
        if self.general is not None and not (self.general.roots or self.general.deltas):
            self.general = None  # an empty guide: the model's parameters only
        self.guide_sites = tuple(self.general.sites) if self.general else ()
        self.state: core.DiagonalState | None = None
        self.num_steps = 0
        self.num_rejected = 0

    @property
    def has_latents(self) -> bool:
        return self.diagonal is not None or self.general is not None

    def _plates(self, args, kwargs) -> dict | None:
        """An ``AutoGuideList`` creates its plates once for all parts: their indices."""
        if isinstance(self.guide, AutoGuideList):
            trace = poutine.trace(self.guide._create_plates).get_trace(*args, **kwargs)
            return {
                name: site["value"]
                for name, site in trace.nodes.items()
                if site["type"] == "sample" and site_is_subsample(site)
            }
        if self.diagonal is not None and self.diagonal.has_local:
            return self.diagonal.draw_subsample(args, kwargs)
        return None

    def particles(
        self, log_joint: LogJoint, args, kwargs, *, num_particles, antithetic, update=True
    ):
        """Draws the step's particles and evaluates them; see the module docstring.
        ``update=False`` leaves the running Fisher information as it is (``evaluate_loss``)."""
        subsample = self._plates(args, kwargs)
        diagonal = self.diagonal
        if diagonal is not None:
            loc, scale = diagonal.read()
            active = diagonal.select(subsample)
            if active.index is not None:
                loc, scale = loc[active.index], scale[active.index]
            draw = diagonal_sampler(loc, scale, antithetic)
            sums = torch.zeros((4,) + loc.shape, dtype=loc.dtype, device=loc.device)
        else:
            active, loc, scale, draw, sums = None, None, None, None, None
        thetas, scores, total = [], [], 0.0
        model_subsample = subsample
        map_params, map_grads, model_params, model_grads = [], None, [], None
        squares, guide_names = None, []
        for k in range(num_particles):
            inputs, unconstrained, constrained, extra, log_q = [], {}, {}, 0.0, 0.0
            if diagonal is not None:
                offset, theta_d = draw(k)
                theta_d = theta_d.detach().requires_grad_()
                inputs.append(theta_d)
                unconstrained = diagonal.to_sites(theta_d, active)
            general_theta, factors, guide_params = {}, {}, []
            with torch.enable_grad():
                if self.general is not None:
                    general_theta, used = self.general.sample(args, kwargs, model_subsample)
                    if used:  # the guide's own plates (not the list's): the model replays them
                        model_subsample = {**used, **(model_subsample or {})}
                    general_theta = {n: v.requires_grad_() for n, v in general_theta.items()}
                    evaluation = self.general.evaluate(general_theta, args, kwargs, model_subsample)
                    constrained, factors = evaluation.values, evaluation.factors
                    guide_params, guide_names = evaluation.params, evaluation.names
                    extra = evaluation.log_det - evaluation.log_q_deltas
                    log_q = evaluation.log_q_roots + evaluation.log_q_deltas
                    inputs.extend(general_theta.values())
                log_p, used, params, names = log_joint.evaluate(
                    unconstrained, args, kwargs, model_subsample, constrained
                )
                model_subsample = used or model_subsample
                params = [p for p in params if p.requires_grad]
                if self.general is not None:
                    self.general.model_param_names.update(names)
                    ids = {id(p) for p in params}
                    kept = [i for i, q in enumerate(guide_params) if id(q) not in ids]
                    guide_params = [guide_params[i] for i in kept]
                    guide_names = [guide_names[i] for i in kept]
                    if guide_params and self.general.roots:
                        score_q = torch.autograd.grad(
                            evaluation.log_q_roots,
                            guide_params,
                            retain_graph=True,
                            allow_unused=True,
                        )
                        squares = _accumulate(
                            squares,
                            [
                                torch.zeros_like(q) if g is None else g.square()
                                for q, g in zip(guide_params, score_q)
                            ],
                        )
                wrt = inputs + guide_params + params
                grads = torch.autograd.grad(log_p + extra, wrt, allow_unused=True) if wrt else []
            grads = [torch.zeros_like(x) if g is None else g for x, g in zip(wrt, grads)]
            total = total + (log_p - log_q).detach()
            if diagonal is not None:
                score = grads[0]
                if active.weight is not None:
                    score = score / active.weight
                sums = sums + torch.stack([offset, offset * offset, offset * score, score])
            start = 1 if diagonal is not None else 0
            n_roots = len(general_theta)
            score_g = {
                name: g / factors[name]
                for name, g in zip(general_theta, grads[start : start + n_roots])
            }
            thetas.append({n: v.detach() for n, v in general_theta.items()})
            scores.append(score_g)
            pg = grads[start + n_roots : start + n_roots + len(guide_params)]
            map_params, map_grads = guide_params, _accumulate(map_grads, pg)
            model_params = params
            model_grads = _accumulate(model_grads, grads[start + n_roots + len(guide_params) :])
        if squares is not None and update:
            self.general.update_metric(guide_names, [q / num_particles for q in squares])
        return _Particles(
            subsample=model_subsample,
            active=active,
            loc=loc,
            scale=scale,
            sums=sums,
            total=total,
            thetas=thetas,
            scores=scores,
            map_params=map_params,
            map_grads=map_grads or [],
            model_params=model_params,
            model_grads=model_grads or [],
        )

    def step(
        self,
        log_joint: LogJoint,
        args,
        kwargs,
        *,
        num_particles: int,
        antithetic: bool,
        rule,
        weight: float,
        inner_optim,
        num_inner_steps: int,
    ):
        """One step of every part: returns ``(loss, accepted, model_params, model_grads)``."""
        if not self.has_latents:
            loss, ok, params, grads = self._params_only_step(log_joint, args, kwargs)
            return loss, ok, params, [g * num_particles for g in grads]
        try:
            p = self.particles(
                log_joint, args, kwargs, num_particles=num_particles, antithetic=antithetic
            )
        except ValueError as error:
            if not _is_validation_error(error):
                raise
            # A value drawn from the guide that the model's distributions refuse: a failed
            # step, rejected (or reverted, for the closed-form parts), not a crash.
            logger.debug("a particle failed the model's argument validation: %s", error)
            if self.diagonal is not None:
                self._diagonal_failure(rule)
            self._count(False)
            return math.nan, False, [], []
        entropy = 0.0
        if self.diagonal is not None:
            entropy = self.diagonal.entropy(p.scale, p.active.weight)
        loss = float(-(p.total / num_particles + entropy))
        finite = math.isfinite(loss) and all(
            bool(torch.isfinite(s).all()) for sc in p.scores for s in sc.values()
        )
        accepted = finite
        if self.diagonal is not None:
            accepted = self._diagonal_update(p, loss, rule, num_particles) and finite
        if not finite:
            self._count(False)
            return loss, False, [], []
        if self.general is not None and self.general.roots:
            self.general.update_variance(p.thetas)
            snapshot = [q.detach().clone() for q in p.map_params]
            try:
                params = self.general.inner_steps(
                    p.thetas,
                    p.scores,
                    args,
                    kwargs,
                    p.subsample,
                    inner_optim,
                    num_inner_steps,
                    weight,
                )
                ok = all(bool(torch.isfinite(q).all()) for q in params)
            except ValueError as error:
                if not _is_validation_error(error):
                    raise
                ok = False
            if not ok:  # restore q_t: a failed inner solve must not corrupt the guide
                with torch.no_grad():
                    for q, old in zip(p.map_params, snapshot):
                        q.copy_(old)
                self._count(False)
                return loss, False, [], []
        self._map_step(p, inner_optim, num_particles)
        self._count(accepted)
        return loss, accepted, p.model_params, p.model_grads

    def _diagonal_failure(self, rule) -> None:
        loc, scale = self.diagonal.read()
        state = self.state if self.state is not None else core.init(loc, scale, rule)
        nan = torch.full((4,) + loc.shape, math.nan, dtype=loc.dtype, device=loc.device)
        new, info = core.update(state, ScoreStatistics(*nan.unbind()), math.nan, rule)
        self.state = new
        if info.reverted:
            self.diagonal.write(new.loc, new.scale)
            loc, scale = self.diagonal.read()
            self.state = new._replace(loc=loc, scale=scale)

    def _count(self, accepted: bool) -> None:
        self.num_steps += accepted
        self.num_rejected += not accepted

    def _map_step(self, p, optim, num_particles: int) -> None:
        """Parameters that fix a ``Delta`` site: one step on the ELBO gradient."""
        pairs = [(q, g) for q, g in zip(p.map_params, p.map_grads) if bool((g != 0).any())]
        if not pairs:
            return
        params = [q for q, _ in pairs]
        for q, g in pairs:
            q.grad = -g / num_particles
        optim(params)
        zero_grads(params)

    def _diagonal_update(self, p, loss: float, rule, num_particles: int) -> bool:
        diagonal = self.diagonal
        loc, scale = diagonal.read()
        state = self.state
        if state is None:
            state = core.init(loc, scale, rule)
        elif not (torch.equal(loc, state.loc) and torch.equal(scale, state.scale)):
            state = state._replace(loc=loc, scale=scale, backup_loc=None, backup_scale=None)
        stats = ScoreStatistics(*(p.sums.detach() / num_particles).unbind())
        index = p.active.index
        sub = state if index is None else gather_state(state, index)
        new, info = core.update(sub, stats, loss, rule)
        new = new if index is None else scatter_state(state, new, info, index)
        self.state = new
        if info.accepted or info.reverted:
            diagonal.write(new.loc, new.scale)
            loc, scale = diagonal.read()
            self.state = new._replace(loc=loc, scale=scale)
        return info.accepted

    def _params_only_step(self, log_joint: LogJoint, args, kwargs):
        """No latent site: one gradient step of the model's own parameters on
        :math:`\\log p_\\psi(\\mathcal D)`, as ``SVI`` with an empty guide."""
        with torch.enable_grad():
            value, _, params, _ = log_joint.evaluate({}, args, kwargs)
            params = [q for q in params if q.requires_grad]
            if not params:
                raise ValueError(
                    "the model has no latent sample sites and no pyro.param sites, so there is "
                    "nothing to fit; check the model's pyro.sample statements."
                )
            grads = torch.autograd.grad(value, params, allow_unused=True)
        grads = [torch.zeros_like(q) if g is None else g for q, g in zip(params, grads)]
        loss = -float(value.detach())
        ok = math.isfinite(loss) and all(bool(torch.isfinite(g).all()) for g in grads)
        self._count(ok)
        return loss, ok, (params if ok else []), (grads if ok else [])

    @torch.no_grad()
    def evaluate_loss(self, log_joint: LogJoint, args, kwargs, num_particles: int) -> float:
        """The -ELBO estimate of the current guide from ``num_particles`` draws."""
        if not self.has_latents:
            return -float(log_joint.evaluate({}, args, kwargs)[0].detach())
        with torch.enable_grad():
            p = self.particles(
                log_joint,
                args,
                kwargs,
                num_particles=num_particles,
                antithetic=False,
                update=False,
            )
        entropy = 0.0
        if self.diagonal is not None:
            entropy = self.diagonal.entropy(p.scale, p.active.weight)
        return -float(p.total / num_particles + entropy)

    def state_dict(self) -> dict:
        """Counters, the diagonal parts' state, the running root variances and the running
        Fisher information of the guide's parameters."""
        return {
            "num_steps": self.num_steps,
            "num_rejected": self.num_rejected,
            "diagonal_state": None if self.state is None else self.state._asdict(),
            "variance": dict(self.general.variance) if self.general else {},
            "metric": dict(self.general.metric) if self.general else {},
        }

    def load_state_dict(self, state: dict) -> None:
        """Restores :meth:`state_dict` (tensors are used as given: pass copies)."""
        self.num_steps = int(state.get("num_steps", 0))
        self.num_rejected = int(state.get("num_rejected", 0))
        diagonal = state.get("diagonal_state")
        self.state = None if diagonal is None else core.state_from_dict(diagonal)
        if self.general is not None:
            self.general.variance = dict(state.get("variance", {}))
            self.general.metric = dict(state.get("metric", {}))


class _Particles:
    """What :meth:`CompositeFamily.particles` measured (a plain record)."""

    def __init__(self, **fields):
        self.__dict__.update(fields)


def _accumulate(total, grads):
    if total is None:
        return list(grads)
    return [t + g for t, g in zip(total, grads)]
