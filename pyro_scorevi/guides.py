"""Adapters from Pyro guides to the kinds of proximal step.

* :class:`DiagonalFamily` -- ``AutoNormal`` and ``AutoNormalMessenger`` (one block per site) and
  ``AutoDiagonalNormal`` (one flat block): :math:`q = \\mathcal N(m, \\operatorname{diag} s^2)`,
  updated by the closed form of :mod:`pyro_scorevi.proximal`. The blocks are the guide's own
  parameters in Pyro's param store, read and written in place, so ``Predictive``,
  ``guide.median()`` and ``pyro.get_param_store().save/load`` see the fit unchanged. Latents
  local to a subsampled plate are blocks with one row per data point; a step updates only the
  rows of the drawn indices (:meth:`DiagonalFamily.select`).
* :class:`GaussianFamily` -- ``AutoMultivariateNormal`` and ``AutoLowRankMultivariateNormal``:
  no closed form here; the proximal objective is minimised by inner optimiser steps.
* :class:`~pyro_scorevi.general.CompositeFamily` -- every other guide whose density can be
  evaluated at fixed points (flows, ``AutoDelta``, messenger guides, ``AutoGuideList``
  combinations, hand-written guides): the general inner-step path of
  :mod:`pyro_scorevi.general`, with the closed form kept for the diagonal parts of an
  ``AutoGuideList``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import pyro
import torch
from pyro import poutine
from pyro.distributions.transforms import biject_to
from pyro.infer.autoguide import (
    AutoContinuous,
    AutoDiagonalNormal,
    AutoDiscreteParallel,
    AutoGuideList,
    AutoLowRankMultivariateNormal,
    AutoMultivariateNormal,
    AutoNormal,
    AutoNormalizingFlow,
    AutoNormalMessenger,
)
from pyro.poutine.util import site_is_subsample
from pyro.util import get_rng_state, set_rng_state
from torch.distributions import constraints, transform_to

__all__ = [
    "ActiveSet",
    "DiagonalFamily",
    "GaussianFamily",
    "check_guide",
    "closed_form",
    "make_family",
    "SUPPORTED_GUIDES",
]

#: Guides with a closed-form (diagonal) or a dedicated inner-step (Gaussian) family. Every
#: other guide whose density can be evaluated goes through the general path.
SUPPORTED_GUIDES = (
    AutoNormal,
    AutoDiagonalNormal,
    AutoNormalMessenger,
    AutoMultivariateNormal,
    AutoLowRankMultivariateNormal,
)

_HALF_LOG_2PI_E = 0.5 * (1.0 + math.log(2 * math.pi))


def check_guide(guide) -> None:
    """Raises ``TypeError`` unless ``guide`` is a callable Pyro guide this library can fit."""
    if isinstance(guide, AutoDiscreteParallel):
        raise TypeError(
            "guide must be a guide over continuous latents (got AutoDiscreteParallel); scores "
            "exist for continuous latents only. Marginalise the discrete sites in the model "
            "and use AutoNormal(model), or fit the model with pyro.infer.TraceEnum_ELBO."
        )
    if not callable(guide):
        raise TypeError(
            f"guide must be a callable Pyro guide, e.g. pyro.infer.autoguide.AutoNormal(model) "
            f"(got {type(guide).__name__})."
        )


def closed_form(guide) -> bool:
    """Whether ``guide`` is fitted by the closed-form diagonal step: ``AutoNormal``,
    ``AutoDiagonalNormal``, or an ``AutoNormalMessenger`` that keeps the mean-field posterior at
    every site and shares no parameter across a plate."""
    if isinstance(guide, (AutoNormal, AutoDiagonalNormal)):
        return True
    return (
        isinstance(guide, AutoNormalMessenger)
        and type(guide).get_posterior is AutoNormalMessenger.get_posterior
        and not guide.amortized_plates
    )


def make_family(guide, args: tuple, kwargs: dict):
    """Sets the guide up on the model's arguments and returns its family adapter."""
    check_guide(guide)
    setup_guide(guide, args, kwargs)
    for part in guide if isinstance(guide, AutoGuideList) else [guide]:
        if isinstance(part, AutoNormalizingFlow):
            raise NotImplementedError(
                f"guide {type(part).__name__} is a normalizing flow, which the general inner "
                "step does not fit reliably: matching the flow's score to the model's at a few "
                "particles per step leaves its network free where the particles carry no "
                "information (measured on a two-parameter normal model: the flow stayed about "
                "20 times too wide after 3000 steps, whatever the inner learning rate or "
                "number of particles). Use AutoMultivariateNormal(model) or AutoNormal(model) "
                "with ScoreProximalSVI, or fit the flow with pyro.infer.SVI and Trace_ELBO."
            )
        if isinstance(part, AutoContinuous):
            _check_no_local_latents(part)
    if closed_form(guide):
        family = DiagonalFamily([guide])
        if not family.blocks:
            from pyro_scorevi.general import CompositeFamily

            return CompositeFamily(guide, [], [], args, kwargs)  # the model's params only
        return family
    if isinstance(guide, (AutoMultivariateNormal, AutoLowRankMultivariateNormal)):
        if not any(True for _ in guide.prototype_trace.iter_stochastic_nodes()):
            from pyro_scorevi.general import CompositeFamily

            return CompositeFamily(guide, [], [], args, kwargs)
        return GaussianFamily(guide)
    from pyro_scorevi.general import CompositeFamily

    if isinstance(guide, AutoGuideList):
        diagonal = [part for part in guide if closed_form(part)]
        rest = [part for part in guide if not closed_form(part)]
        return CompositeFamily(guide, diagonal, rest, args, kwargs)
    return CompositeFamily(guide, [], [guide], args, kwargs)


def setup_guide(guide, args: tuple, kwargs: dict, force: bool = False) -> None:
    """Runs ``guide`` once (blocked) so that its parameters exist in the param store.

    The RNG state is restored, so that setting a guide up draws nothing: a run resumed with a
    fresh guide (param store loaded, RNG state restored) then continues exactly as the
    uninterrupted run. A model with a discrete latent raises ``NotImplementedError`` naming it.
    ``force``: run it even if it is set up already (after ``pyro.clear_param_store()`` its
    next call registers its parameters again, as under ``SVI``).
    """
    if force:
        pass
    elif isinstance(guide, AutoNormalMessenger):
        if getattr(guide, "_scorevi_sites", None) is not None:
            return
    elif getattr(guide, "prototype_trace", None) is not None:
        return
    rng_state = get_rng_state()
    try:
        with poutine.block():
            guide(*args, **kwargs)
    except ValueError as error:
        if "Continuous inference cannot handle discrete sample site" in str(error):
            raise NotImplementedError(
                f"{str(error).split('.')[0]}: scores exist for continuous latents only. "
                "Marginalise the site in the model (a mixture: dist.MixtureSameFamily, or a "
                "logsumexp over its values) and build the guide from the marginalised model, "
                "or fit the model with pyro.infer.TraceEnum_ELBO. Hiding the site from the "
                "guide and the model (poutine.block) would draw it from its prior at every "
                "evaluation, which fits a different model."
            ) from error
        raise
    finally:
        set_rng_state(rng_state)
    if isinstance(guide, AutoNormalMessenger):
        model_trace, _ = guide.get_traces()
        guide._scorevi_sites = [
            (name, site)
            for name, site in model_trace.nodes.items()
            if site["type"] == "sample" and not site["is_observed"] and not site_is_subsample(site)
        ]


def _check_no_local_latents(guide: AutoContinuous) -> None:
    """``AutoContinuous`` guides size a local latent by the mini-batch: every batch would share
    the same coordinates. Raises ``NotImplementedError`` naming the site."""
    for name, site in guide.prototype_trace.iter_stochastic_nodes():
        for frame in site["cond_indep_stack"]:
            full = frame.full_size or frame.size
            if frame.vectorized and full != frame.size:
                raise NotImplementedError(
                    f"latent site {name!r} is local to the subsampled plate {frame.name!r} "
                    f"(size {full}, subsample {frame.size}); {type(guide).__name__} (an "
                    "AutoContinuous guide) would give every mini-batch the same coordinates. "
                    "Use AutoNormal(model) or AutoNormalMessenger(model), which fit local "
                    "latents row by row, or move the site out of the subsampled plate."
                )


def site_transforms(guide) -> dict[str, torch.distributions.Transform]:
    """The bijection from unconstrained space to each latent site's support."""
    return {name: biject_to(site["fn"].support) for name, site in _latent_sites(guide)}


def _latent_sites(guide):
    if isinstance(guide, AutoNormalMessenger):
        return list(guide._scorevi_sites)
    return list(guide.prototype_trace.iter_stochastic_nodes())


def _join(prefix: str, *names: str) -> str:
    return ".".join(n for n in (prefix, *names) if n)


class Block(NamedTuple):
    """One ``(loc, scale)`` pair of param-store entries of a diagonal guide.

    Attributes:
        loc_name, scale_name: the param-store names.
        scale_transform: from the store's unconstrained leaf to the scale.
        shape: shape of the leaves (the full plates, for a local site).
        sites: the latent sites the block covers.
        unpack: flat block to ``{site: value}`` (``AutoDiagonalNormal``), or ``None`` for a
            one-site block.
        local: ``(plate name, dim of the leaf)`` of each subsampled plate the site lies in.
    """

    loc_name: str
    scale_name: str
    scale_transform: Any
    shape: torch.Size
    sites: tuple[str, ...]
    unpack: Callable | None
    local: tuple[tuple[str, int], ...]


class ActiveSet(NamedTuple):
    """The coordinates a step updates: all of them, or the globals and the rows of the drawn
    indices of each local site.

    Attributes:
        index: flat indices of the active coordinates, or ``None`` for all.
        shapes: per block, the shape of its active part.
        weight: per active coordinate, the :math:`N/B` of its subsampled plates (1 for global
            coordinates), or ``None`` when all are 1.
    """

    index: torch.Tensor | None
    shapes: tuple[torch.Size, ...]
    weight: torch.Tensor | None


class DiagonalFamily:
    """Diagonal Gaussian guides seen as one flat block :math:`(m, s) \\in \\mathbb R^{2d}`.

    For ``AutoNormal`` and ``AutoNormalMessenger`` the flat block concatenates the per-site
    ``locs``/``scales`` entries of the param store, so the proximal update runs as a few
    elementwise operations over all coordinates at once; ``AutoDiagonalNormal`` is flat already.
    Several guides (the diagonal parts of an ``AutoGuideList``) make one family.

    Args:
        guides: the closed-form guides (:func:`closed_form`), set up already.

    Attributes:
        guide: the first guide.
        transforms: site name to bijection onto its support.
        blocks: the :class:`Block` s, in flat order.
        local_plates: ``{plate name: (full size, dim, subsample size)}`` of the subsampled
            plates that hold a local latent.
    """

    def __init__(self, guides):
        guides = list(guides) if isinstance(guides, (list, tuple)) else [guides]
        self.guides = guides
        self.guide = guides[0]
        self.transforms: dict[str, Any] = {}
        self.blocks: list[Block] = []
        self.local_plates: dict[str, tuple[int, int, int]] = {}
        for guide in guides:
            self._add_guide(guide)
        store = pyro.get_param_store()
        for block in self.blocks:
            if block.loc_name not in store or block.scale_name not in store:
                raise RuntimeError(
                    f"{type(self.guide).__name__} parameters {block.loc_name!r}/"
                    f"{block.scale_name!r} are missing from the param store; call "
                    "pyro.clear_param_store() only before building the guide."
                )
        self._sizes = [math.prod(block.shape) for block in self.blocks]
        self._full = ActiveSet(None, tuple(block.shape for block in self.blocks), None)

    # -------------------------------------------------------------- construction

    def _add_guide(self, guide) -> None:
        prefix = guide._pyro_name
        if isinstance(guide, AutoDiagonalNormal):
            transforms = site_transforms(guide)
            self.transforms.update(transforms)
            loc = pyro.get_param_store().get_param(_join(prefix, "loc"))
            self.blocks.append(
                Block(
                    _join(prefix, "loc"),
                    _join(prefix, "scale"),
                    transform_to(guide.scale_constraint),
                    loc.shape,
                    tuple(transforms),
                    guide._unpack_latent,
                    (),
                )
            )
            return
        messenger = isinstance(guide, AutoNormalMessenger)
        scale_transform = transform_to(
            constraints.positive if messenger else guide.scale_constraint
        )
        leaves = dict(pyro.get_param_store().named_parameters())
        for name, site in _latent_sites(guide):
            transform = biject_to(site["fn"].support)
            self.transforms[name] = transform
            loc_name = _join(prefix, "locs", name)
            event_dim = transform.domain.event_dim if messenger else guide._event_dims[name]
            local = []
            for frame in site["cond_indep_stack"]:
                full = frame.full_size or frame.size
                if frame.vectorized and full != frame.size:
                    local.append((frame.name, frame.dim - event_dim))
                    self.local_plates[frame.name] = (full, frame.dim, frame.size)
            shape = leaves[loc_name].shape if loc_name in leaves else torch.Size()
            self.blocks.append(
                Block(
                    loc_name,
                    _join(prefix, "scales", name),
                    scale_transform,
                    shape,
                    (name,),
                    None,
                    tuple(local),
                )
            )

    # -------------------------------------------------------------- the param store

    def _leaves(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The unconstrained param-store leaves, looked up each time (the store may be reloaded)."""
        # named_parameters() is the store's own name -> unconstrained-leaf view: no transform
        # is evaluated on this hot path (store[name] would compute each constrained value).
        leaves = dict(pyro.get_param_store().named_parameters())
        locs = [leaves[block.loc_name] for block in self.blocks]
        scales = [leaves[block.scale_name] for block in self.blocks]
        return locs, scales

    def read(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The current flat ``(loc, scale)``, detached."""
        locs, scales = self._leaves()
        loc = torch.cat([leaf.detach().reshape(-1) for leaf in locs])
        scale = torch.cat(
            [
                block.scale_transform(leaf.detach()).reshape(-1)
                for block, leaf in zip(self.blocks, scales)
            ]
        )
        return loc, scale

    @torch.no_grad()
    def write(self, loc: torch.Tensor, scale: torch.Tensor) -> None:
        """Stores a new flat ``(loc, scale)`` in place in the param store."""
        locs, scales = self._leaves()
        for block, loc_leaf, scale_leaf, m, s in zip(
            self.blocks, locs, scales, loc.split(self._sizes), scale.split(self._sizes)
        ):
            loc_leaf.copy_(m.view(block.shape))
            scale_leaf.copy_(block.scale_transform.inv(s).view(block.shape))

    # -------------------------------------------------------------- coordinates

    @property
    def has_local(self) -> bool:
        """Whether some site is local to a subsampled plate."""
        return bool(self.local_plates)

    def draw_subsample(self, args: tuple, kwargs: dict) -> dict[str, torch.Tensor]:
        """Indices of the subsampled plates that hold local latents, drawn as the guide's own
        plates draw them (``create_plates`` included), to replay in the model."""
        guide = self.guide
        if isinstance(guide, AutoNormalMessenger):

            def make_plates(*args, **kwargs):
                for name, (full, dim, size) in self.local_plates.items():
                    pyro.plate(name, full, dim=dim, subsample_size=size)

        else:
            root = guide if guide.master is None else guide.master()
            make_plates = root._create_plates
        trace = poutine.trace(make_plates).get_trace(*args, **kwargs)
        return {
            name: site["value"]
            for name, site in trace.nodes.items()
            if site["type"] == "sample" and site_is_subsample(site)
        }

    def select(self, subsample: dict[str, torch.Tensor] | None) -> ActiveSet:
        """The :class:`ActiveSet` of a step whose subsampled plates drew ``subsample``."""
        if not self.has_local:
            return self._full
        indices, weights, shapes, offset = [], [], [], 0
        for block, size in zip(self.blocks, self._sizes):
            index = torch.arange(offset, offset + size).view(block.shape)
            factor = 1.0
            for plate, dim in block.local:
                drawn = subsample[plate].to(index.device)
                factor *= block.shape[dim] / len(drawn)
                index = index.index_select(dim, drawn)
            indices.append(index.reshape(-1))
            weights.append(torch.full((index.numel(),), factor))
            shapes.append(index.shape)
            offset += size
        return ActiveSet(torch.cat(indices), tuple(shapes), torch.cat(weights))

    def to_sites(self, theta: torch.Tensor, active: ActiveSet | None = None) -> dict:
        """Unconstrained site values (views) of a flat vector (of the ``active`` coordinates)."""
        shapes = (active or self._full).shapes
        pieces = theta.split([math.prod(shape) for shape in shapes])
        sites = {}
        for block, piece, shape in zip(self.blocks, pieces, shapes):
            if block.unpack is not None:
                sites.update({site["name"]: v for site, v in block.unpack(piece)})
            else:
                sites[block.sites[0]] = piece.view(shape)
        return sites

    @staticmethod
    def entropy(scale: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """:math:`H(q) = \\sum_j c_j(\\log s_j + \\tfrac12 (1 + \\log 2\\pi))`, with
        :math:`c_j` the ``weight`` (:math:`N/B` of a local coordinate, else 1)."""
        if weight is None:
            return scale.log().sum() + _HALF_LOG_2PI_E * scale.numel()
        return (weight * (scale.log() + _HALF_LOG_2PI_E)).sum()


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
