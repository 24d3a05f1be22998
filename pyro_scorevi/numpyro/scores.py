"""Log joint and scores of the unconstrained target for a batch of particles (NumPyro).

The target is NumPyro's own unconstrained log joint,
:math:`\\log \\hat p(\\theta) = -\\mathrm{potential\\_energy}(\\theta)`, which includes the
log-Jacobian of each constraining bijection and the :math:`N/B` scale of subsampled plates.
All particles of one step run the model under one seed, hence one shared mini-batch, so the
score estimate :math:`\\hat g(\\theta) = \\nabla_\\theta \\log \\hat p(\\theta)` of the step is
unbiased and antithetic pairs cancel the odd part of its noise.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import random
from numpyro import handlers
from numpyro.infer.util import potential_energy

__all__ = [
    "check_model",
    "make_log_joint",
    "particle_log_joints",
    "particle_scores",
    "standard_normal_particles",
]


def make_log_joint(
    model: Callable, model_args: tuple, model_kwargs: dict, rng_key: jax.Array
) -> Callable[[dict], jax.Array]:
    """:math:`\\theta \\mapsto \\log \\hat p(\\theta)` with the model seeded by ``rng_key``.

    Args:
        model: the NumPyro model.
        model_args, model_kwargs: its arguments.
        rng_key: seeds the model (plate subsample indices); one key per step.

    Returns:
        A function of a dict of unconstrained latent values (one particle).
    """
    seeded = handlers.seed(model, rng_seed=rng_key)

    def log_joint(latents: dict) -> jax.Array:
        return -potential_energy(seeded, model_args, model_kwargs, latents)

    return log_joint


def particle_scores(
    log_joint: Callable[[dict], jax.Array], to_latents: Callable[[Any], dict], thetas: Any
) -> tuple[jax.Array, Any]:
    """:math:`(\\log \\hat p(\\theta_k), \\hat g_k)` for particles stacked on axis 0.

    Args:
        log_joint: from :func:`make_log_joint`.
        to_latents: maps one particle (a pytree in the guide's coordinates) to the model's
            unconstrained latent dict.
        thetas: the particles, a pytree whose leaves have shape ``(S, ...)``.

    Returns:
        ``(log_p, scores)``: log_p of shape ``(S,)``, scores shaped like ``thetas``.
    """
    return jax.vmap(jax.value_and_grad(lambda th: log_joint(to_latents(th))))(thetas)


def particle_log_joints(
    log_joint: Callable[[dict], jax.Array], to_latents: Callable[[Any], dict], thetas: Any
) -> jax.Array:
    """:math:`\\log \\hat p(\\theta_k)` only, shape ``(S,)`` (no gradient pass)."""
    return jax.vmap(lambda th: log_joint(to_latents(th)))(thetas)


def standard_normal_particles(
    rng_key: jax.Array, like: Any, num_particles: int, antithetic: bool
) -> Any:
    """Standard normal draws :math:`\\varepsilon_k` with leaves of shape ``(S, *leaf.shape)``.

    With ``antithetic``, the first ``2 * (S // 2)`` draws are pairs :math:`\\pm\\varepsilon`
    (:math:`\\theta = m \\pm s\\varepsilon`), so their odd moments average to exactly zero; an
    odd last particle is drawn plainly, as in the Pyro class.
    """
    leaves, treedef = jax.tree.flatten(like)
    keys = random.split(rng_key, len(leaves))
    pairs = num_particles // 2 if antithetic else 0
    out = []
    for key, leaf in zip(keys, leaves):
        shape = (num_particles - pairs,) + jnp.shape(leaf)
        eps = random.normal(key, shape, dtype=jnp.result_type(leaf))
        out.append(jnp.concatenate([eps[:pairs], -eps[:pairs], eps[pairs:]]))
    return jax.tree.unflatten(treedef, out)


def check_model(model: Callable, rng_key: jax.Array, model_args: tuple, model_kwargs: dict):
    """Traces the model once and rejects what the proximal step cannot handle.

    Raises:
        ValueError: a latent (unobserved) sample site is discrete.
        NotImplementedError: a latent site sits inside a subsampled plate (a local latent), or
            the model has ``numpyro.param`` / ``numpyro.mutable`` sites.
    """
    model_trace = handlers.trace(handlers.seed(model, rng_seed=rng_key)).get_trace(
        *model_args, **model_kwargs
    )
    for name, site in model_trace.items():
        if site["type"] in ("param", "mutable"):
            raise NotImplementedError(
                f"model site {name!r} is a numpyro.{site['type']} site; ScoreProximalSVI fits "
                "only the guide. Make it a latent sample site with a prior, or pass it as a "
                "constant argument."
            )
        if site["type"] != "sample" or site["is_observed"]:
            continue
        if site["fn"].support.is_discrete:
            raise ValueError(
                f"latent site {name!r} is discrete ({type(site['fn']).__name__}); "
                "ScoreProximalSVI needs continuous latents (scores of the log joint). "
                "Marginalise it out of the model or observe it."
            )
        for frame in site["cond_indep_stack"]:
            full_size = model_trace[frame.name]["args"][0]
            if frame.size != full_size:
                raise NotImplementedError(
                    f"latent site {name!r} is local to the subsampled plate {frame.name!r} "
                    f"(subsample {frame.size} of {full_size}); local latents are not supported "
                    "yet. Use the full plate for that site, or make it global."
                )
