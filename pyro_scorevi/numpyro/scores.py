"""Log joint and scores of the unconstrained target for a batch of particles (NumPyro).

The target is NumPyro's own unconstrained log joint,
:math:`\\log \\hat p_\\psi(\\theta) = -\\mathrm{potential\\_energy}(\\theta)`, which includes the
log-Jacobian of each constraining bijection and the :math:`N/B` scale of subsampled plates;
:math:`\\psi` are the model's own ``numpyro.param`` sites (held fixed, or learned by ``optim``
on :math:`\\frac1S\\sum_k \\nabla_\\psi \\log \\hat p_\\psi(\\theta_k)`, the ELBO gradient, since
:math:`q` does not depend on :math:`\\psi`). All particles of one step run the model under one
seed, hence one shared mini-batch, so the score estimate
:math:`\\hat g(\\theta) = \\nabla_\\theta \\log \\hat p(\\theta)` of the step is unbiased and
antithetic pairs cancel the odd part of its noise.

Every run of the model (the check at ``init`` and each step's log joint, at trace time under
``jit``) records its structure, so that a latent site that becomes local to a subsampled plate
later (a fit initialised on full data and updated on subsets) is refused at that step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpyro
from jax import random
from numpyro import handlers
from numpyro.distributions import constraints
from numpyro.distributions.transforms import biject_to
from numpyro.infer.initialization import init_to_uniform
from numpyro.infer.util import helpful_support_errors, potential_energy
from numpyro.primitives import Messenger

__all__ = [
    "LogJoint",
    "check_model",
    "make_log_joint",
    "particle_log_joints",
    "particle_scores",
    "particle_scores_and_param_grads",
    "standard_normal_particles",
]


class _StructureRecorder(Messenger):
    """Records what the proximal step must check while a model runs (no effect on the run).

    Entered before the model's own handlers, it processes each message last, when every plate
    has added its frame, and raises at the site for a plate name used with two shapes and for
    a latent local to a subsampled plate; it records each param site's constraint.
    """

    def __init__(self):
        super().__init__()
        self._plates: dict[str, tuple] = {}
        self._latent_plates: dict[str, list[tuple]] = {}
        self.param_constraints: dict[str, Any] = {}
        self.mutable: list[str] = []

    def process_message(self, msg):
        if msg["type"] == "param":
            self.param_constraints[msg["name"]] = msg["kwargs"].get("constraint", constraints.real)
        elif msg["type"] == "mutable":
            self.mutable.append(msg["name"])
        elif msg["type"] == "sample":
            active = [h for h in numpyro.primitives._PYRO_STACK if isinstance(h, numpyro.plate)]
            plates = []
            for frame in msg["cond_indep_stack"]:
                match = [h for h in active if h.name == frame.name and h.dim == frame.dim]
                # A plate entered outside this run (e.g. under a control-flow primitive) is
                # not on the stack: its full size is unknown here (None).
                full = match[-1].size if match else None
                plates.append((frame.name, frame.dim, full, frame.size))
            self._check_site(msg["name"], not msg["is_observed"], plates)

    def _check_site(self, site: str, latent: bool, plates: list[tuple]) -> None:
        # At the site itself: a substituted value of a latent that became local would fail
        # later with a bare broadcasting error.
        for name, dim, full, size in plates:
            if name in self._plates:
                (other_dim, other_full, other_size), other_site = self._plates[name]
                fulls = {other_full, full} - {None}
                if (other_dim, other_size) != (dim, size) or len(fulls) > 1:
                    # NumPyro itself then fails with "Model and guide shapes disagree".
                    raise ValueError(
                        f"plate {name!r} is used with two shapes: size {other_full} "
                        f"(subsample {other_size}, dim {other_dim}) at site {other_site!r} "
                        f"and size {full} (subsample {size}, dim {dim}) at site {site!r}. "
                        f"Give each plate its own name, e.g. numpyro.plate('{name}_2', ...)."
                    )
            self._plates.setdefault(name, ((dim, full, size), site))
            if latent and full is not None and size != full:
                raise NotImplementedError(
                    f"latent site {site!r} is local to the subsampled plate {name!r} "
                    f"(subsample {size} of {full}); local latents are not supported "
                    "yet. Use the full plate for that site, or make it global."
                )
        if latent:
            self._latent_plates[site] = plates

    def check_unresolved(self, plate_sizes: dict[str, int]) -> None:
        """The local-latent check for frames whose plate was not on the stack (under a
        control-flow primitive), with full sizes by plate name from a trace."""
        for site, plates in self._latent_plates.items():
            for name, _, full, size in plates:
                full = plate_sizes.get(name) if full is None else full
                if full is not None and size != full:
                    raise NotImplementedError(
                        f"latent site {site!r} is local to the subsampled plate {name!r} "
                        f"(subsample {size} of {full}); local latents are not supported "
                        "yet. Use the full plate for that site, or make it global."
                    )


def _constrain_param(unconstrained: dict, constraints_: dict, site: dict):
    """``substitute_fn``: a learned param site's value from its unconstrained value."""
    name = site["name"]
    if site["type"] != "param" or name not in unconstrained:
        return None
    constraint = site["kwargs"].get("constraint", constraints.real)
    constraints_[name] = constraint
    with helpful_support_errors(site):
        return biject_to(constraint)(unconstrained[name])


class LogJoint:
    """:math:`\\theta \\mapsto \\log \\hat p_\\psi(\\theta)` with the model seeded for one step.

    Args:
        model: the NumPyro model.
        model_args, model_kwargs: its arguments.
        rng_key: seeds the model (plate subsample indices); one key per step.
        params: constrained values of the model's ``numpyro.param`` sites held fixed
            (``None``: the sites' own initial values).

    Calling it with a dict of unconstrained latent values (one particle) returns the log
    joint; ``model_params``, unconstrained values of learned param sites, makes it a function
    of those too. ``param_constraints`` holds the constraint of each param site the model
    declared (known once it has run, at trace time under ``jit``).
    """

    def __init__(
        self,
        model: Callable,
        model_args: tuple,
        model_kwargs: dict,
        rng_key: jax.Array,
        params: dict | None = None,
    ):
        seeded = handlers.seed(model, rng_seed=rng_key)
        self._model = handlers.substitute(seeded, data=dict(params)) if params else seeded
        self._args, self._kwargs = model_args, model_kwargs
        self.param_constraints: dict[str, Any] = {}

    def __call__(self, latents: dict, model_params: dict | None = None) -> jax.Array:
        model = self._model
        if model_params:
            model = handlers.substitute(
                model,
                substitute_fn=lambda site: _constrain_param(
                    model_params, self.param_constraints, site
                ),
            )
        recorder = _StructureRecorder()
        try:
            with recorder:
                value = -potential_energy(model, self._args, self._kwargs, latents)
        except ValueError as error:
            if "Incompatible shapes for broadcasting" not in str(error):
                raise
            raise ValueError(
                f"{error}: a value from the guide does not fit the model's site at this step. "
                "The guide took its shapes when init traced the model; a latent site inside a "
                "plate that is subsampled now but was not then (a local latent, e.g. under "
                "scan) is not supported. Make the latent global, or keep that plate full."
            ) from error
        for name, constraint in recorder.param_constraints.items():
            self.param_constraints.setdefault(name, constraint)
        return value

    def constrain(self, model_params: dict) -> dict:
        """Constrained values of unconstrained ``model_params`` (after the model has run)."""
        return {
            name: biject_to(self.param_constraints.get(name, constraints.real))(value)
            for name, value in model_params.items()
        }


def make_log_joint(
    model: Callable,
    model_args: tuple,
    model_kwargs: dict,
    rng_key: jax.Array,
    params: dict | None = None,
) -> LogJoint:
    """The :class:`LogJoint` of ``model`` for one step (see there for the arguments)."""
    return LogJoint(model, model_args, model_kwargs, rng_key, params)


def _value_and_grad(fn: Callable, argnums, forward_mode: bool) -> Callable:
    """``jax.value_and_grad``, or the same pair by ``jax.jacfwd`` (forward mode: models with
    ``lax.while_loop`` and other primitives reverse mode cannot differentiate), as
    ``numpyro.infer.SVI`` does with ``forward_mode_differentiation=True``."""
    if not forward_mode:
        return jax.value_and_grad(fn, argnums)
    jacobian = jax.jacfwd(lambda *a: (fn(*a),) * 2, argnums, has_aux=True)

    def value_and_grad(*a):
        grads, value = jacobian(*a)
        return value, grads

    return value_and_grad


def particle_scores(
    log_joint: Callable[[dict], jax.Array],
    to_latents: Callable[[Any], dict],
    thetas: Any,
    *,
    forward_mode: bool = False,
) -> tuple[jax.Array, Any]:
    """:math:`(\\log \\hat p(\\theta_k), \\hat g_k)` for particles stacked on axis 0.

    Args:
        log_joint: a :class:`LogJoint`.
        to_latents: maps one particle (a pytree in the guide's coordinates) to the model's
            unconstrained latent dict.
        thetas: the particles, a pytree whose leaves have shape ``(S, ...)``.
        forward_mode: differentiate in forward mode (``jax.jacfwd``).

    Returns:
        ``(log_p, scores)``: log_p of shape ``(S,)``, scores shaped like ``thetas``.
    """
    fn = _value_and_grad(lambda th: log_joint(to_latents(th)), 0, forward_mode)
    return jax.vmap(fn)(thetas)


def particle_scores_and_param_grads(
    log_joint: LogJoint,
    to_latents: Callable[[Any], dict],
    thetas: Any,
    model_params: dict,
    *,
    forward_mode: bool = False,
) -> tuple[jax.Array, Any, dict]:
    """As :func:`particle_scores`, plus the mean gradient
    :math:`\\frac1S\\sum_k \\nabla_u \\log \\hat p_{\\psi(u)}(\\theta_k)` with respect to the
    unconstrained values ``model_params`` :math:`u` of the model's learned param sites (the
    gradient of the ELBO of the frozen :math:`q_t`, from the same passes)."""
    fn = _value_and_grad(lambda th, u: log_joint(to_latents(th), u), (0, 1), forward_mode)
    log_p, (scores, param_grads) = jax.vmap(fn, in_axes=(0, None))(thetas, model_params)
    return log_p, scores, jax.tree.map(lambda g: g.mean(0), param_grads)


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


def check_model(
    model: Callable,
    rng_key: jax.Array,
    model_args: tuple,
    model_kwargs: dict,
    init_params: dict | None = None,
) -> dict:
    """Traces the model once, rejects what the proximal step cannot handle, returns the trace.

    Latent sites take a point drawn as ``init_to_uniform`` does (in ``(-2, 2)`` unconstrained),
    so that priors with no sampler (``ImproperUniform``) are traced as
    ``numpyro.infer.SVI`` traces them; ``init_params`` sets param sites (and latents) by name.

    Raises:
        ValueError: a latent (unobserved) sample site is discrete, a latent support has no
            bijection (NumPyro's own message), or one plate name is used with two sizes or
            dims at latent sites.
        NotImplementedError: a latent site sits inside a subsampled plate (a local latent),
            or the model has ``numpyro.mutable`` sites.
    """
    seeded = handlers.seed(model, rng_seed=rng_key)
    if init_params:
        seeded = handlers.substitute(seeded, data=dict(init_params))

    def init_point(site):
        if site["type"] != "sample" or site["is_observed"]:
            return None
        if site["fn"].support.is_discrete:
            raise ValueError(
                f"latent site {site['name']!r} is discrete ({type(site['fn']).__name__}); "
                "ScoreProximalSVI needs continuous latents (scores of the log joint). "
                "Marginalise it out of the model or observe it."
            )
        return init_to_uniform(site) if site["value"] is None else None

    recorder = _StructureRecorder()
    with recorder:
        model_trace = handlers.trace(
            handlers.substitute(seeded, substitute_fn=init_point)
        ).get_trace(*model_args, **model_kwargs)
    if recorder.mutable:
        raise NotImplementedError(
            f"model site {recorder.mutable[0]!r} is a numpyro.mutable site; ScoreProximalSVI "
            "carries no mutable state (numpyro's Trace_ELBO also ignores it for "
            "num_particles > 1, and a step here evaluates several particles). Pass the value "
            "as an argument of the model, or use numpyro.infer.SVI with num_particles=1."
        )
    plate_sizes = {
        name: site["args"][0] for name, site in model_trace.items() if site["type"] == "plate"
    }
    recorder.check_unresolved(plate_sizes)
    return model_trace
