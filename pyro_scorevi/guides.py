"""Adapters from Pyro autoguides to the two kinds of proximal step.

* :class:`DiagonalFamily` -- ``AutoNormal`` (one block per site) and ``AutoDiagonalNormal``
  (one flat block): :math:`q = \\mathcal N(m, \\operatorname{diag} s^2)`, updated by the closed
  form of :mod:`pyro_scorevi.proximal`. The blocks are the guide's own parameters in Pyro's
  param store, read and written in place, so ``Predictive``, ``guide.median()`` and
  ``pyro.get_param_store().save/load`` see the fit unchanged.
* :class:`GaussianFamily` -- ``AutoMultivariateNormal`` and ``AutoLowRankMultivariateNormal``:
  no closed form here; the proximal objective is minimised by inner optimiser steps.
"""

from __future__ import annotations

import math

import pyro
import torch
from pyro import poutine
from pyro.distributions.transforms import biject_to
from pyro.infer.autoguide import (
    AutoContinuous,
    AutoDiagonalNormal,
    AutoLowRankMultivariateNormal,
    AutoMultivariateNormal,
    AutoNormal,
)
from pyro.util import get_rng_state, set_rng_state
from torch.distributions import transform_to

__all__ = ["DiagonalFamily", "GaussianFamily", "check_guide", "make_family", "SUPPORTED_GUIDES"]

SUPPORTED_GUIDES = (
    AutoNormal,
    AutoDiagonalNormal,
    AutoMultivariateNormal,
    AutoLowRankMultivariateNormal,
)

_HALF_LOG_2PI_E = 0.5 * (1.0 + math.log(2 * math.pi))


def check_guide(guide) -> None:
    """Raises ``TypeError`` listing the supported autoguides unless ``guide`` is one of them."""
    if not isinstance(guide, SUPPORTED_GUIDES):
        names = ", ".join(cls.__name__ for cls in SUPPORTED_GUIDES)
        raise TypeError(
            f"guide must be one of {names} (got {type(guide).__name__}). Closed-form steps "
            "need a diagonal Gaussian; build e.g. pyro.infer.autoguide.AutoNormal(model)."
        )


def make_family(guide, args: tuple, kwargs: dict):
    """Sets the guide up on the model's arguments and returns its family adapter."""
    check_guide(guide)
    if guide.prototype_trace is None:
        # Creates the prototype trace and the params in the store. The RNG state is restored so
        # that setting a guide up draws nothing: a run resumed with a fresh guide (param store
        # loaded, RNG state restored) then continues exactly as the uninterrupted run.
        rng_state = get_rng_state()
        with poutine.block():
            guide(*args, **kwargs)
        set_rng_state(rng_state)
    if not any(True for _ in guide.prototype_trace.iter_stochastic_nodes()):
        raise ValueError(
            "the model has no latent sample sites (every site is observed or deterministic), "
            "so there is no posterior to fit; check the model's pyro.sample statements."
        )
    _check_sites(guide)
    if isinstance(guide, (AutoNormal, AutoDiagonalNormal)):
        return DiagonalFamily(guide)
    return GaussianFamily(guide)


def site_transforms(guide) -> dict[str, torch.distributions.Transform]:
    """The bijection from unconstrained space to each latent site's support."""
    return {
        name: biject_to(site["fn"].support)
        for name, site in guide.prototype_trace.iter_stochastic_nodes()
    }


def _check_sites(guide) -> None:
    for name, site in guide.prototype_trace.iter_stochastic_nodes():
        for frame in site["cond_indep_stack"]:
            if frame.vectorized and (frame.full_size or frame.size) != frame.size:
                raise NotImplementedError(
                    f"latent site {name!r} is local to the subsampled plate {frame.name!r} "
                    f"(size {frame.full_size}, subsample {frame.size}); ScoreProximalSVI "
                    "supports global latents only. Move the site out of the subsampled plate, "
                    "marginalise it, or use pyro.infer.SVI for this model."
                )


class DiagonalFamily:
    """A diagonal Gaussian guide seen as one flat block :math:`(m, s) \\in \\mathbb R^{2d}`.

    For ``AutoNormal`` the flat block concatenates the per-site ``locs``/``scales`` entries of
    the param store, so the proximal update runs as a few elementwise operations over all
    coordinates at once; ``AutoDiagonalNormal`` is flat already.

    Attributes:
        guide: the autoguide.
        transforms: site name to bijection onto its support.
    """

    def __init__(self, guide):
        self.guide = guide
        self.transforms = site_transforms(guide)
        prefix = guide._pyro_name
        if isinstance(guide, AutoNormal):
            self._names = [(f"{prefix}.locs.{n}", f"{prefix}.scales.{n}") for n in self.transforms]
            self._flat = False
        else:
            self._names = [(f"{prefix}.loc", f"{prefix}.scale")]
            self._flat = True
        store = pyro.get_param_store()
        for loc_name, scale_name in self._names:
            if loc_name not in store or scale_name not in store:
                raise RuntimeError(
                    f"{type(guide).__name__} parameters {loc_name!r}/{scale_name!r} are missing "
                    "from the param store; call pyro.clear_param_store() only before building "
                    "the guide."
                )
        self._scale_transform = transform_to(guide.scale_constraint)
        loc, _ = self._leaves()
        self._shapes = [leaf.shape for leaf in loc]
        self._sizes = [leaf.numel() for leaf in loc]

    def _leaves(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The unconstrained param-store leaves, looked up each time (the store may be reloaded)."""
        # named_parameters() is the store's own name -> unconstrained-leaf view: no transform
        # is evaluated on this hot path (store[name] would compute each constrained value).
        leaves = dict(pyro.get_param_store().named_parameters())
        locs = [leaves[loc] for loc, _ in self._names]
        scales = [leaves[scale] for _, scale in self._names]
        return locs, scales

    def read(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The current flat ``(loc, scale)``, detached."""
        locs, scales = self._leaves()
        loc = torch.cat([leaf.detach().reshape(-1) for leaf in locs])
        raw_scale = torch.cat([leaf.detach().reshape(-1) for leaf in scales])
        return loc, self._scale_transform(raw_scale)

    def to_sites(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        """Unconstrained site values (views) of a flat vector."""
        if self._flat:
            return {site["name"]: v for site, v in self.guide._unpack_latent(theta)}
        pieces = theta.split(self._sizes)
        return {
            name: piece.view(shape)
            for name, piece, shape in zip(self.transforms, pieces, self._shapes)
        }

    @torch.no_grad()
    def write(self, loc: torch.Tensor, scale: torch.Tensor) -> None:
        """Stores a new flat ``(loc, scale)`` in place in the param store."""
        locs, scales = self._leaves()
        raw_scale = self._scale_transform.inv(scale)
        torch._foreach_copy_(
            locs, [p.view(s) for p, s in zip(loc.split(self._sizes), self._shapes)]
        )
        torch._foreach_copy_(
            scales, [p.view(s) for p, s in zip(raw_scale.split(self._sizes), self._shapes)]
        )

    @staticmethod
    def entropy(scale: torch.Tensor) -> torch.Tensor:
        """:math:`H(q) = \\sum_j \\log s_j + \\tfrac d2 (1 + \\log 2\\pi)`."""
        return scale.log().sum() + _HALF_LOG_2PI_E * scale.numel()


class GaussianFamily:
    """A full-rank or low-rank Gaussian autoguide over the flat unconstrained latent.

    :meth:`posterior_and_params` rebuilds :math:`q_\\phi` from the param store with gradients
    to the unconstrained parameter leaves (which it also returns), as the guide's own forward
    does.
    """

    def __init__(self, guide: AutoContinuous):
        self.guide = guide
        self.transforms = site_transforms(guide)

    def posterior_and_params(self) -> tuple[torch.distributions.Distribution, list[torch.Tensor]]:
        with poutine.trace(param_only=True) as tape:
            with self.guide._pyro_context:  # as PyroModule.__call__: read params from the store
                posterior = self.guide.get_posterior()
        params = [site["value"].unconstrained() for site in tape.trace.nodes.values()]
        return posterior, params

    def to_sites(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        """Unconstrained site values (views) of a flat vector."""
        return {site["name"]: v for site, v in self.guide._unpack_latent(theta)}


def frozen_copy(posterior: torch.distributions.Distribution) -> torch.distributions.Distribution:
    """A detached copy of a (low-rank) multivariate normal :math:`q_t`."""
    if isinstance(posterior, torch.distributions.LowRankMultivariateNormal):
        return torch.distributions.LowRankMultivariateNormal(
            posterior.loc.detach(), posterior.cov_factor.detach(), posterior.cov_diag.detach()
        )
    return torch.distributions.MultivariateNormal(
        posterior.loc.detach(), scale_tril=posterior.scale_tril.detach()
    )
