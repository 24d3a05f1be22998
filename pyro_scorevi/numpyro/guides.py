"""Adapters from NumPyro autoguides to the Gaussian families the proximal step works on.

Each adapter knows, for one guide class, where the variational parameters live in the guide's
parameter dict (constrained values, as returned by ``SVI.get_params``) and how a point
:math:`\\theta` of the guide's latent space maps to the model's unconstrained latent sites.

* :class:`DiagonalFamily` (``AutoNormal``, ``AutoDiagonalNormal``): blocks of
  :math:`(m, s)` updated by the closed form of :mod:`pyro_scorevi.numpyro.proximal`.
* :class:`MultivariateFamily` (``AutoMultivariateNormal``, ``AutoLowRankMultivariateNormal``):
  a distribution over the flat latent vector, fitted by inner optimizer steps.

These read private attributes of the autoguides (``_init_locs``, ``_unpack_latent``,
``prefix``), which define the guides' own latent layout.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from numpyro.distributions import constraints
from numpyro.distributions.transforms import biject_to
from numpyro.infer.autoguide import (
    AutoDiagonalNormal,
    AutoLowRankMultivariateNormal,
    AutoMultivariateNormal,
    AutoNormal,
)

__all__ = [
    "DIAGONAL_GUIDES",
    "MULTIVARIATE_GUIDES",
    "SUPPORTED_GUIDES",
    "DiagonalFamily",
    "MultivariateFamily",
    "check_guide",
    "family_of",
]

#: Guides with a closed-form proximal step.
DIAGONAL_GUIDES = (AutoNormal, AutoDiagonalNormal)
#: Guides fitted by ``num_inner_steps`` optimizer steps on the proximal objective.
MULTIVARIATE_GUIDES = (AutoMultivariateNormal, AutoLowRankMultivariateNormal)
SUPPORTED_GUIDES = DIAGONAL_GUIDES + MULTIVARIATE_GUIDES


def check_guide(guide: Any) -> None:
    """Raises ``TypeError`` unless ``guide`` is one of :data:`SUPPORTED_GUIDES`."""
    if not isinstance(guide, SUPPORTED_GUIDES):
        names = ", ".join(f"numpyro.infer.autoguide.{g.__name__}" for g in SUPPORTED_GUIDES)
        raise TypeError(
            f"guide must be one of {names} (got {type(guide).__name__}); wrap the model in "
            "one of these autoguides, e.g. guide = AutoNormal(model)."
        )


class DiagonalFamily:
    """:math:`q = \\prod_b \\mathcal N(m_b, \\operatorname{diag} s_b^2)` over named blocks ``b``.

    ``AutoNormal``: one block per latent site (params ``<site>_<prefix>_loc/_scale``), the
    block value is the site's unconstrained value. ``AutoDiagonalNormal``: one block holding
    the flat latent vector (params ``<prefix>_loc/_scale``), unpacked into sites by the guide.
    """

    closed_form = True

    def __init__(self, guide: AutoNormal | AutoDiagonalNormal):
        self.guide = guide
        prefix = guide.prefix
        if isinstance(guide, AutoNormal):
            self.loc_names = {k: f"{k}_{prefix}_loc" for k in guide._init_locs}
            self.scale_names = {k: f"{k}_{prefix}_scale" for k in guide._init_locs}
            self._flat_key = None
        else:
            self._flat_key = f"_{prefix}_latent"
            self.loc_names = {self._flat_key: f"{prefix}_loc"}
            self.scale_names = {self._flat_key: f"{prefix}_scale"}

    def param_names(self, params: dict) -> set[str]:
        """The names of the guide's own param sites (the rest of ``params`` is the model's)."""
        return set(self.loc_names.values()) | set(self.scale_names.values())

    def locs_scales(self, params: dict) -> tuple[dict, dict]:
        """``(m, s)`` per block from the constrained guide params."""
        locs = {k: params[n] for k, n in self.loc_names.items()}
        scales = {k: params[n] for k, n in self.scale_names.items()}
        return locs, scales

    def with_locs_scales(self, params: dict, locs: dict, scales: dict) -> dict:
        """A copy of ``params`` with the blocks' ``(m, s)`` replaced."""
        params = dict(params)
        for k, n in self.loc_names.items():
            params[n] = locs[k]
        for k, n in self.scale_names.items():
            params[n] = scales[k]
        return params

    def to_latents(self, theta: dict) -> dict:
        """Unconstrained model latents (one particle) from the blocks' values ``theta``."""
        if self._flat_key is None:
            return theta
        return self.guide._unpack_latent(theta[self._flat_key])

    @staticmethod
    def entropy(scales: dict) -> jax.Array:
        """:math:`H(q) = \\sum_j \\log s_j + \\tfrac d2 (1 + \\log 2\\pi)`."""
        leaves = jax.tree.leaves(scales)
        dim = sum(x.size for x in leaves)
        return sum(jnp.log(x).sum() for x in leaves) + 0.5 * dim * (1 + jnp.log(2 * jnp.pi))


class MultivariateFamily:
    """A Gaussian over the guide's flat latent vector, given by ``guide.get_posterior(params)``.

    The posterior exposes ``loc``, ``scale_tril`` and ``log_prob``; its score
    :math:`\\nabla_\\theta \\log q_\\phi(\\theta)` comes from autodiff at fixed :math:`\\theta`.
    """

    closed_form = False

    def __init__(self, guide: AutoMultivariateNormal | AutoLowRankMultivariateNormal):
        self.guide = guide

    def constraints(self, params: dict) -> dict:
        """Constraint of each param site of the guide's posterior, by param name."""
        prefix, guide = self.guide.prefix, self.guide
        if isinstance(guide, AutoMultivariateNormal):
            return {
                f"{prefix}_loc": constraints.real_vector,
                f"{prefix}_scale_tril": guide.scale_tril_constraint,
            }
        return {
            f"{prefix}_loc": constraints.real_vector,
            f"{prefix}_cov_factor": constraints.real_matrix,
            f"{prefix}_scale": guide.scale_constraint,
        }

    def param_names(self, params: dict) -> set[str]:
        """The names of the guide's own param sites (the rest of ``params`` is the model's)."""
        return set(self.constraints(params))

    def transforms(self, params: dict) -> dict:
        """Bijection from unconstrained space onto each param's support, by param name."""
        return {name: biject_to(c) for name, c in self.constraints(params).items()}

    def break_symmetry(self, rng_key: jax.Array, params: dict, init_params: dict | None):
        """Replaces an all-zero ``cov_factor`` of ``AutoLowRankMultivariateNormal``.

        The proximal objective is even in the low-rank factor :math:`F` (the covariance is
        :math:`D + FF^\\top`) and, unlike a reparametrised ELBO, has no sampling noise through
        :math:`F`, so :math:`F = 0` (the guide's own initial value) is a stationary point it
        never leaves. Entries :math:`\\sim \\mathcal N(0, 0.01^2)` leave the initial covariance
        unchanged to about 1e-4 and let the inner steps grow :math:`F`. A user-given
        ``cov_factor`` in ``init_params`` is kept.
        """
        name = f"{self.guide.prefix}_cov_factor"
        if name not in params or (init_params is not None and name in init_params):
            return params
        factor = params[name]
        noise = 0.01 * jax.random.normal(rng_key, factor.shape, factor.dtype)
        return {**params, name: jnp.where(jnp.all(factor == 0), noise, factor)}

    def posterior(self, params: dict):
        """The guide's distribution over the flat latent vector for constrained ``params``."""
        return self.guide.get_posterior(params)

    def to_latents(self, theta: jax.Array) -> dict:
        """Unconstrained model latents (one particle) from the flat latent vector."""
        return self.guide._unpack_latent(theta)


def family_of(guide: Any) -> DiagonalFamily | MultivariateFamily:
    """The adapter for an (already set-up) supported guide."""
    check_guide(guide)
    if isinstance(guide, DIAGONAL_GUIDES):
        return DiagonalFamily(guide)
    return MultivariateFamily(guide)


def gaussian_kl(loc_p, tril_p, loc_q, tril_q) -> jax.Array:
    """:math:`\\mathrm{KL}(\\mathcal N(m_p, L_pL_p^\\top) \\Vert \\mathcal N(m_q, L_qL_q^\\top))`.

    .. math::

        \\tfrac12\\big(\\lVert L_q^{-1}L_p\\rVert_F^2 + \\lVert L_q^{-1}(m_q-m_p)\\rVert^2 - d\\big)
        + \\sum_j \\log (L_q)_{jj} - \\sum_j \\log (L_p)_{jj}.
    """
    solve = jax.scipy.linalg.solve_triangular
    m = solve(tril_q, tril_p, lower=True)
    y = solve(tril_q, loc_q - loc_p, lower=True)
    logdet = jnp.log(jnp.diagonal(tril_q)).sum() - jnp.log(jnp.diagonal(tril_p)).sum()
    return 0.5 * (jnp.square(m).sum() + jnp.square(y).sum() - loc_p.shape[-1]) + logdet
