"""Mini-batch log-joint scores of a Pyro model in the unconstrained space of an autoguide.

For unconstrained latents :math:`\\theta` and the guide's bijections :math:`z = T(\\theta)`,

.. math::

    \\log \\hat p(\\theta) = \\log p(T(\\theta)) + \\log\\lvert\\det J_T(\\theta)\\rvert,
    \\qquad \\hat g(\\theta) = \\nabla_\\theta \\log \\hat p(\\theta),

where :math:`\\log p` is the model's traced log joint. Pyro's ``plate(..., subsample_size=B)``
already scales the likelihood by :math:`N/B`, so :math:`\\hat g` is an unbiased estimate of
:math:`\\nabla \\log p(\\theta \\mid \\mathcal D)`. The subsample indices drawn by the first
particle of a step are replayed for the others (they share one mini-batch, so antithetic pairs
cancel the odd part of the noise), exactly as ``Trace_ELBO`` replays the guide's indices.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from pyro import poutine
from pyro.distributions.util import scale_and_mask
from pyro.poutine.util import site_is_subsample
from torch.distributions import Transform

__all__ = ["LogJoint"]


class LogJoint:
    """The unconstrained log joint :math:`\\log\\hat p(\\theta)` of ``model`` and its scores.

    Args:
        model: a Pyro model.
        transforms: for each latent site, the bijection :math:`T` from unconstrained space to the
            site's support (``biject_to(site["fn"].support)``).
    """

    def __init__(self, model: Callable, transforms: Mapping[str, Transform]):
        self.model = model
        self.transforms = dict(transforms)

    def __call__(
        self,
        unconstrained: Mapping[str, torch.Tensor],
        args: tuple,
        kwargs: dict,
        subsample: Mapping[str, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], list[torch.Tensor]]:
        """Evaluates :math:`\\log\\hat p(\\theta)` at one particle.

        Args:
            unconstrained: site name to unconstrained value :math:`\\theta`.
            args, kwargs: the model's arguments.
            subsample: plate name to subsample indices to replay (``None``: draw new ones).

        Returns:
            ``(log_joint, subsample, model_params)``: a scalar tensor, the plate indices that
            were used and the unconstrained leaves of the model's own ``pyro.param`` sites.
        """
        data: dict[str, Any] = {} if subsample is None else dict(subsample)
        log_det = 0.0
        for name, theta in unconstrained.items():
            transform = self.transforms[name]
            value = transform(theta)
            log_det = log_det + transform.log_abs_det_jacobian(theta, value).sum()
            data[name] = value
        trace = poutine.trace(poutine.condition(self.model, data=data)).get_trace(*args, **kwargs)
        used_subsample, model_params = {}, []
        for name, site in trace.nodes.items():
            if site["type"] == "param":
                model_params.append(site["value"].unconstrained())
                continue
            if site["type"] != "sample":
                continue
            if site_is_subsample(site):
                used_subsample[name] = site["value"]
            elif not site["is_observed"]:
                raise ValueError(
                    f"model sample site {name!r} is latent but the guide has no site for it "
                    f"(guide sites: {sorted(self.transforms)}). Rebuild the autoguide after "
                    "changing the model, or observe/block the site with poutine.block."
                )
        # As Trace.log_prob_sum, without its per-site NaN/Inf warnings: the step checks the
        # finiteness of what it uses once, and rejects the step if needed.
        log_joint = log_det
        for site in trace.nodes.values():
            if site["type"] == "sample" and not site_is_subsample(site):
                log_p = site["fn"].log_prob(site["value"], *site["args"], **site["kwargs"])
                log_joint = log_joint + scale_and_mask(log_p, site["scale"], site["mask"]).sum()
        return log_joint, used_subsample, model_params

    def scores(
        self,
        unconstrained: Mapping[str, torch.Tensor],
        inputs: torch.Tensor,
        args: tuple,
        kwargs: dict,
        subsample: Mapping[str, torch.Tensor] | None,
        learn_params: bool = True,
    ) -> tuple[torch.Tensor, list[torch.Tensor], dict[str, torch.Tensor], list, list]:
        """One forward and backward pass: :math:`\\log\\hat p` and its gradients.

        ``inputs`` is the flat leaf tensor (with ``requires_grad``) of which the
        ``unconstrained`` site values are views.

        Returns:
            ``(log_joint, score, subsample, model_params, model_param_grads)``.
        """
        value, used, params = self(unconstrained, args, kwargs, subsample)
        params = [p for p in params if p.requires_grad]
        if not learn_params:  # held fixed: no gradient, and constants of a traced graph
            (score,) = torch.autograd.grad(value, [inputs])
            return value.detach(), score, used, params, []
        grads = torch.autograd.grad(value, [inputs, *params], allow_unused=True)
        grads = [torch.zeros_like(x) if g is None else g for x, g in zip([inputs, *params], grads)]
        return value.detach(), grads[0], used, params, grads[1:]
