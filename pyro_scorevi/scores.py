"""Mini-batch log-joint scores of a Pyro model in the unconstrained space of a guide.

For unconstrained latents :math:`\\theta` and the guide's bijections :math:`z = T(\\theta)`,

.. math::

    \\log \\hat p(\\theta) = \\log p(T(\\theta))
        + \\sum_i c_i \\log\\lvert\\det J_{T_i}(\\theta_i)\\rvert,
    \\qquad \\hat g(\\theta) = \\nabla_\\theta \\log \\hat p(\\theta),

where :math:`\\log p` is the model's traced log joint, :math:`i` runs over the sites and
:math:`c_i` is the :math:`N/B` of the subsampled plates site :math:`i` lies in (1 for a global
site), the factor by which Pyro scales that site's terms: the log-Jacobian belongs to the site's
density, as in the ``log_density`` of an autoguide's ``Delta`` site. Pyro's
``plate(..., subsample_size=B)`` already scales the likelihood by :math:`N/B`, so
:math:`\\hat g` is an unbiased estimate of :math:`\\nabla \\log p(\\theta \\mid \\mathcal D)`.
The subsample indices drawn by the first particle of a step are replayed for the others (they
share one mini-batch, so antithetic pairs cancel the odd part of the noise), exactly as
``Trace_ELBO`` replays the guide's indices.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from pyro import poutine
from pyro.distributions.util import scale_and_mask
from pyro.poutine.util import site_is_subsample
from torch.distributions import Transform

__all__ = ["LogJoint", "subsample_factor"]


def subsample_factor(site: Mapping[str, Any]) -> float:
    """:math:`\\prod N/B` over the subsampled plates of a traced site (1 outside them)."""
    factor = 1.0
    for frame in site["cond_indep_stack"]:
        full = frame.full_size or frame.size
        if full is not None and frame.size not in (None, -1) and full != frame.size:
            factor *= float(full) / float(frame.size)
    return factor


class LogJoint:
    """The unconstrained log joint :math:`\\log\\hat p(\\theta)` of ``model`` and its scores.

    Args:
        model: a Pyro model.
        transforms: for each latent site fitted in unconstrained space, the bijection :math:`T`
            from unconstrained space to the site's support (``biject_to(site["fn"].support)``).
        guide_sites: names of further latent sites whose (constrained) values the caller passes
            itself (``constrained=`` of :meth:`evaluate`), e.g. those of a general guide.
    """

    def __init__(
        self,
        model: Callable,
        transforms: Mapping[str, Transform],
        guide_sites: Sequence[str] = (),
    ):
        self.model = model
        self.transforms = dict(transforms)
        self.guide_sites = tuple(guide_sites)

    def evaluate(
        self,
        unconstrained: Mapping[str, torch.Tensor],
        args: tuple,
        kwargs: dict,
        subsample: Mapping[str, torch.Tensor] | None = None,
        constrained: Mapping[str, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], list[torch.Tensor], list[str]]:
        """Evaluates :math:`\\log\\hat p` at one particle.

        Args:
            unconstrained: site name to unconstrained value :math:`\\theta` (transformed here,
                with the log-Jacobian).
            args, kwargs: the model's arguments.
            subsample: plate name to subsample indices to replay (``None``: draw new ones).
            constrained: site name to a value in the site's support, used as it is (no
                log-Jacobian: the caller accounts for its density).

        Returns:
            ``(log_joint, subsample, model_params, model_param_names)``: a scalar tensor, the
            plate indices that were used (to replay for the next particle) and the
            unconstrained leaves of the model's own ``pyro.param`` sites with their names.
        """
        data: dict[str, Any] = {} if subsample is None else dict(subsample)
        log_dets = {}
        for name, theta in unconstrained.items():
            transform = self.transforms[name]
            value = transform(theta)
            log_dets[name] = transform.log_abs_det_jacobian(theta, value).sum()
            data[name] = value
        if constrained:
            data.update(constrained)
        trace = poutine.trace(poutine.condition(self.model, data=data)).get_trace(*args, **kwargs)
        used_subsample, seen, model_params, names = {}, {}, [], []
        known = set(self.transforms) | set(self.guide_sites)
        for name, site in trace.nodes.items():
            if site["type"] == "param":
                model_params.append(site["value"].unconstrained())
                names.append(name)
                continue
            if site["type"] != "sample":
                continue
            if site_is_subsample(site):
                _record_subsample(name, site, used_subsample, seen)
            elif not site["is_observed"]:
                raise _missing_site_error(name, site, sorted(known))
            elif constrained and name in constrained:
                _check_shape(name, site)
        # As Trace.log_prob_sum, without its per-site NaN/Inf warnings: the step checks the
        # finiteness of what it uses once, and rejects the step if needed.
        log_joint = 0.0
        for name, log_det in log_dets.items():
            site = trace.nodes.get(name)
            factor = 1.0 if site is None else subsample_factor(site)
            log_joint = log_joint + factor * log_det
        for name, site in trace.nodes.items():
            if site["type"] == "sample" and not site_is_subsample(site):
                log_p = _log_prob(name, site, observed=name not in data)
                log_joint = log_joint + scale_and_mask(log_p, site["scale"], site["mask"]).sum()
        if not isinstance(log_joint, torch.Tensor):
            log_joint = torch.tensor(float(log_joint))
        return log_joint, used_subsample, model_params, names

    def __call__(
        self,
        unconstrained: Mapping[str, torch.Tensor],
        args: tuple,
        kwargs: dict,
        subsample: Mapping[str, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], list[torch.Tensor]]:
        """:meth:`evaluate` without the parameter names: ``(log_joint, subsample, params)``."""
        value, used, params, _ = self.evaluate(unconstrained, args, kwargs, subsample)
        return value, used, params

    def scores(
        self,
        unconstrained: Mapping[str, torch.Tensor],
        inputs: torch.Tensor,
        args: tuple,
        kwargs: dict,
        subsample: Mapping[str, torch.Tensor] | None,
        learn_params: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor], list, list]:
        """One forward and backward pass: :math:`\\log\\hat p` and its gradients.

        ``inputs`` is the flat leaf tensor (with ``requires_grad``) of which the
        ``unconstrained`` site values are views.

        Returns:
            ``(log_joint, score, subsample, model_params, model_param_grads)``.
        """
        value, used, params = self(unconstrained, args, kwargs, subsample)
        params = [p for p in params if p.requires_grad]
        if not learn_params:  # held fixed: no gradient, and constants of a traced graph
            (score,) = torch.autograd.grad(value, [inputs], allow_unused=True)
            score = torch.zeros_like(inputs) if score is None else score
            return value.detach(), score, used, params, []
        grads = torch.autograd.grad(value, [inputs, *params], allow_unused=True)
        grads = [torch.zeros_like(x) if g is None else g for x, g in zip([inputs, *params], grads)]
        return value.detach(), grads[0], used, params, grads[1:]


def _log_prob(name: str, site, observed: bool) -> torch.Tensor:
    """The site's log density at its value. Data outside the support of an observed site's
    distribution (a NaN, a negative count) is the user's to fix, not a failed step: it raises
    a ``ValueError`` naming the site, as ``Trace_ELBO`` does (a latent value the guide drew
    outside its support stays a rejected step)."""
    fn = site["fn"]
    try:
        return fn.log_prob(site["value"], *site["args"], **site["kwargs"])
    except ValueError as error:
        if not (observed and str(error).startswith("Expected value argument")):
            raise
        raise ValueError(
            f"the observed data of site {name!r} lie outside the support of its distribution "
            f"{type(fn).__name__} (support {fn.support}); check the data for NaN or "
            f"out-of-range values. Pyro's message: {error}"
        ) from error


def _record_subsample(name: str, site, used: dict, seen: dict) -> None:
    """Keeps a plate's indices for replay, unless the plate name is reused with other indices
    (two plates of one name and different sizes): each of those then draws its own."""
    value = site["value"]
    if name in seen:
        previous = seen[name]
        if previous is not None and (
            previous.shape != value.shape or not torch.equal(previous, value)
        ):
            seen[name] = None
            used.pop(name, None)
        return
    seen[name] = value
    fn = site["fn"]
    full, size = getattr(fn, "size", None), getattr(fn, "subsample_size", None)
    if size is None or full is None or size >= full:
        return  # the whole plate: nothing to replay (and nothing to disagree on later)
    used[name] = value


def _check_shape(name: str, site) -> None:
    """A guide value must have the model site's shape (as ``Trace_ELBO`` checks)."""
    expected = site["fn"].shape()
    if tuple(site["value"].shape) != tuple(expected):
        raise ValueError(
            f"Model and guide shapes disagree at site {name!r}: the model's distribution has "
            f"shape {tuple(expected)} (batch + event), the guide's value "
            f"{tuple(site['value'].shape)}. Fix the guide's distribution at that site."
        )


def _missing_site_error(name: str, site, known: list[str]) -> Exception:
    """The error for a latent model site that no part of the guide covers."""
    fn = site["fn"]
    support = getattr(fn, "support", None)
    if support is not None and getattr(support, "is_discrete", False):
        return NotImplementedError(
            f"model sample site {name!r} is a discrete latent ({type(fn).__name__}); scores "
            f"exist for continuous latents only. Marginalise it in the model (a mixture: "
            f"dist.MixtureSameFamily, or a logsumexp over its values) or fit the model with "
            f"pyro.infer.TraceEnum_ELBO. Do not hide it with poutine.block: a blocked site is "
            f"drawn from its prior at every evaluation, which fits a different model (a "
            f"mixture's components all collapse onto one place)."
        )
    return ValueError(
        f"model sample site {name!r} is latent but the guide has no site for it (guide sites: "
        f"{known}). Rebuild the guide after changing the model, or observe the site "
        f"(obs=... or poutine.condition)."
    )
