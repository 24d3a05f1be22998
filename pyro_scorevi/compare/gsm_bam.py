"""Full-rank Gaussian VI from scores: Gaussian score matching (GSM) and batch-and-match (BaM).

Both fit :math:`q = \\mathcal N(\\mu, \\Sigma)` to an unnormalised density :math:`p` on
:math:`\\mathbb R^d` from a batch of :math:`B` draws :math:`z_b \\sim q_t` and their scores
:math:`g_b = \\nabla \\log p(z_b)` per iteration, with closed-form updates (no learning rate for
GSM, a proximal weight :math:`\\lambda_t` for BaM). One iteration costs :math:`B` gradient
evaluations, so a budget of :math:`G` evaluations is :math:`\\lceil G/B \\rceil` iterations.

**GSM** (Modi et al, "Variational Inference with Gaussian Score Matching", NeurIPS 2023,
Algorithm 1). For each draw, the Gaussian closest in KL to :math:`q_t` whose score matches
:math:`g_b` at :math:`z_b`: with :math:`\\varepsilon_b = \\Sigma_t g_b - \\mu_t + z_b`,
:math:`\\rho_b (1 + \\rho_b) = g_b^\\top \\Sigma_t g_b + ((\\mu_t - z_b)^\\top g_b)^2`,

.. math::

    \\Delta\\mu_b = \\frac{1}{1+\\rho_b}\\Big[I - \\frac{(\\mu_t - z_b) g_b^\\top}
        {1 + \\rho_b + (\\mu_t - z_b)^\\top g_b}\\Big]\\varepsilon_b, \\qquad
    \\Delta\\Sigma_b = (\\mu_t - z_b)(\\mu_t - z_b)^\\top
        - (\\mu_t + \\Delta\\mu_b - z_b)(\\mu_t + \\Delta\\mu_b - z_b)^\\top,

and :math:`(\\mu_{t+1}, \\Sigma_{t+1}) = (\\mu_t, \\Sigma_t) + \\frac1B\\sum_b
(\\Delta\\mu_b, \\Delta\\Sigma_b)`. GSM has no step-size schedule. The covariance update is a
difference of rank-one terms and can lose positive definiteness in floating point; such an
update is rejected (the state is kept), as the authors' reference code does.

**BaM** (Cai et al, "Batch and Match: Black-Box Variational Inference with a Score-Based
Divergence", ICML 2024, Algorithm 1). With batch means :math:`\\bar z, \\bar g` and (1/B)
covariances :math:`C, \\Gamma` of the draws and the scores,

.. math::

    U = \\lambda_t \\Gamma + \\tfrac{\\lambda_t}{1+\\lambda_t} \\bar g \\bar g^\\top, \\quad
    V = \\Sigma_t + \\lambda_t C + \\tfrac{\\lambda_t}{1+\\lambda_t}
        (\\mu_t - \\bar z)(\\mu_t - \\bar z)^\\top, \\\\
    \\Sigma_{t+1} = 2V\\big(I + (I + 4UV)^{1/2}\\big)^{-1}, \\quad
    \\mu_{t+1} = \\tfrac{1}{1+\\lambda_t}\\mu_t
        + \\tfrac{\\lambda_t}{1+\\lambda_t}(\\Sigma_{t+1}\\bar g + \\bar z).

:math:`\\Sigma_{t+1}` is the positive root of :math:`\\Sigma U \\Sigma + \\Sigma = V`, computed
here in the symmetric form :math:`\\Sigma_{t+1} = L\\, f(L^\\top U L)\\, L^\\top` with
:math:`V = LL^\\top` and :math:`f(M) = 2(I + (I + 4M)^{1/2})^{-1}` by an eigendecomposition, so
it is positive definite whenever :math:`\\Sigma_t` is. The default schedule is the one of the
paper's experiments, :math:`\\lambda_t = B d / (t + 1)` for :math:`t = 0, 1, \\dots`.

Mini-batch variants: ``score_fn`` may return an unbiased mini-batch estimate of the log density
and its gradient (all :math:`B` draws of one iteration share one mini-batch); the updates are
unchanged. Steps whose scores, or whose updated mean or covariance, are not finite (or whose
covariance has no Cholesky factor) are rejected and counted in ``num_rejected``; nothing raises.

Each iteration also returns the estimate :math:`-\\big(\\frac1B\\sum_b \\log\\hat p(z_b) +
H(q_t)\\big)` of the negative ELBO of :math:`q_t` (the quantity ``Trace_ELBO`` reports), kept in
:attr:`GaussianFit.history`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "GaussianFit",
    "GaussianState",
    "ScoreFn",
    "fit_gsm",
    "fit_bam",
    "gsm_update",
    "bam_update",
    "bam_schedule",
    "make_step",
    "init_state",
]

logger = logging.getLogger(__name__)

#: ``score_fn(theta, key) -> (log_p, grad)``: ``theta`` of shape ``(B, d)``; ``log_p`` of shape
#: ``(B,)`` and ``grad`` of shape ``(B, d)``, the (possibly mini-batch) log density of the
#: unconstrained target and its gradient. Must be JAX-traceable (it runs under ``jax.jit``).
ScoreFn = Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]


class GaussianFit(NamedTuple):
    """Result of :func:`fit_gsm` / :func:`fit_bam`.

    Attributes:
        loc: the mean, shape ``(d,)``.
        cov: the covariance, shape ``(d, d)``.
        num_rejected: iterations whose update was rejected (non-finite or not positive
            definite) and left the state unchanged.
        history: per-iteration estimate of the negative ELBO of :math:`q_t`, shape
            ``(num_steps,)`` (NumPy); ``nan`` where the scores were not finite.
    """

    loc: jax.Array
    cov: jax.Array
    num_rejected: int
    history: np.ndarray | None = None


class GaussianState(NamedTuple):
    """The iterate: mean, covariance, its Cholesky factor, iteration count, rejections."""

    loc: jax.Array
    cov: jax.Array
    chol: jax.Array
    step: jax.Array
    num_rejected: jax.Array


def bam_schedule(batch_size: int, dim: int) -> Callable[[jax.Array], jax.Array]:
    """BaM's published schedule :math:`\\lambda_t = B d / (t + 1)` (Cai et al 2024, Sec. 5)."""
    c = float(batch_size * dim)
    return lambda t: c / (t + 1.0)


def gsm_update(
    loc: jax.Array, cov: jax.Array, z: jax.Array, g: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """One GSM iteration (Modi et al 2023, Algorithm 1): the mean of the per-draw updates.

    Args:
        loc, cov: :math:`\\mu_t` ``(d,)`` and :math:`\\Sigma_t` ``(d, d)``.
        z, g: draws and their scores, ``(B, d)`` each.
    """
    diff = loc - z  # (B, d): mu_t - z_b
    sg = g @ cov  # (B, d): Sigma_t g_b (Sigma symmetric)
    gsg = jnp.sum(g * sg, -1)
    dg = jnp.sum(diff * g, -1)
    rho = 0.5 * jnp.sqrt(1.0 + 4.0 * (gsg + dg * dg)) - 0.5
    eps = sg - diff  # Sigma_t g_b - mu_t + z_b
    # (1 + rho + dg) > 1/2 always: rho (1 + rho) >= dg^2 gives rho + 1/2 > |dg|.
    coef = jnp.sum(g * eps, -1) / (1.0 + rho + dg)
    dmu = (eps - diff * coef[:, None]) / (1.0 + rho)[:, None]
    new_diff = diff + dmu  # mu_t + dmu_b - z_b
    dcov = (diff.T @ diff - new_diff.T @ new_diff) / z.shape[0]
    new_cov = cov + dcov
    return loc + jnp.mean(dmu, 0), 0.5 * (new_cov + new_cov.T)


def bam_update(
    loc: jax.Array, cov: jax.Array, z: jax.Array, g: jax.Array, lam: jax.Array | float
) -> tuple[jax.Array, jax.Array]:
    """One BaM iteration (Cai et al 2024, Algorithm 1) with proximal weight ``lam``.

    Args:
        loc, cov: :math:`\\mu_t` ``(d,)`` and :math:`\\Sigma_t` ``(d, d)``.
        z, g: draws and their scores, ``(B, d)`` each.
        lam: :math:`\\lambda_t > 0`; larger moves further (it is a step size, not an inverse).
    """
    zbar, gbar = jnp.mean(z, 0), jnp.mean(g, 0)
    zc, gc = z - zbar, g - gbar
    b = z.shape[0]
    c_mat = zc.T @ zc / b
    gamma = gc.T @ gc / b
    w = lam / (1.0 + lam)
    dm = loc - zbar
    u = lam * gamma + w * jnp.outer(gbar, gbar)
    v = cov + lam * c_mat + w * jnp.outer(dm, dm)
    v = 0.5 * (v + v.T)
    lv = jnp.linalg.cholesky(v)
    m = lv.T @ u @ lv
    evals, evecs = jnp.linalg.eigh(0.5 * (m + m.T))
    f = 2.0 / (1.0 + jnp.sqrt(1.0 + 4.0 * jnp.maximum(evals, 0.0)))
    half = lv @ (evecs * jnp.sqrt(f))
    new_cov = half @ half.T
    new_loc = loc / (1.0 + lam) + w * (new_cov @ gbar + zbar)
    return new_loc, new_cov


def init_state(init_loc: Any, init_cov: Any) -> GaussianState:
    """The starting iterate; ``ValueError`` if the shapes disagree or ``init_cov`` is not
    symmetric positive definite."""
    loc = jnp.asarray(init_loc)
    if loc.ndim != 1:
        raise ValueError(f"init_loc must be a vector of shape (d,), got shape {loc.shape}.")
    cov = jnp.asarray(init_cov, dtype=loc.dtype)
    d = loc.shape[0]
    if cov.shape != (d, d):
        raise ValueError(
            f"init_cov must have shape ({d}, {d}) to match init_loc, got {cov.shape}; pass e.g. "
            f"0.01 * jnp.eye({d})."
        )
    chol = jnp.linalg.cholesky(0.5 * (cov + cov.T))
    if not bool(jnp.all(jnp.isfinite(chol))):
        raise ValueError(
            "init_cov is not symmetric positive definite (no Cholesky factor); pass a "
            "covariance matrix such as 0.01 * jnp.eye(d)."
        )
    zero = jnp.zeros((), jnp.int32)
    return GaussianState(loc, cov, chol, zero, zero)


def make_step(
    method: str,
    score_fn: ScoreFn,
    batch_size: int,
    schedule: Callable[[jax.Array], jax.Array] | float | None = None,
) -> Callable[[GaussianState, jax.Array], tuple[GaussianState, jax.Array]]:
    """A pure ``step(state, key) -> (state, neg_elbo_estimate)`` for ``method`` in
    ``{"gsm", "bam"}``, ready for ``jax.jit`` or ``lax.scan``.

    ``schedule`` (BaM only): ``t -> lambda_t`` (JAX-traceable), a constant, or ``None`` for
    :func:`bam_schedule`.
    """
    if method not in ("gsm", "bam"):
        raise ValueError(f"method must be 'gsm' or 'bam', got {method!r}.")
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}.")
    if method == "gsm" and schedule is not None:
        raise ValueError("GSM has no step-size schedule; pass schedule=None.")

    def step(state: GaussianState, key: jax.Array) -> tuple[GaussianState, jax.Array]:
        d = state.loc.shape[0]
        k_draw, k_score = jax.random.split(key)
        eps = jax.random.normal(k_draw, (batch_size, d), state.loc.dtype)
        z = state.loc + eps @ state.chol.T
        log_p, g = score_fn(z, k_score)
        log_p = jnp.reshape(log_p, (batch_size,))
        g = jnp.reshape(g, (batch_size, d)).astype(state.loc.dtype)
        entropy = 0.5 * d * (1.0 + math.log(2 * math.pi)) + jnp.sum(
            jnp.log(jnp.diagonal(state.chol))
        )
        loss = -(jnp.mean(log_p) + entropy)
        if method == "gsm":
            loc, cov = gsm_update(state.loc, state.cov, z, g)
        else:
            lam_fn = (
                bam_schedule(batch_size, d)
                if schedule is None
                else (schedule if callable(schedule) else (lambda t, c=float(schedule): c))
            )
            lam = jnp.asarray(lam_fn(state.step.astype(state.loc.dtype)), state.loc.dtype)
            loc, cov = bam_update(state.loc, state.cov, z, g, lam)
        chol = jnp.linalg.cholesky(cov)
        ok = (
            jnp.all(jnp.isfinite(g))
            & jnp.all(jnp.isfinite(loc))
            & jnp.all(jnp.isfinite(chol))
            & jnp.all(jnp.diagonal(chol) > 0)
        )
        new = GaussianState(
            jnp.where(ok, loc, state.loc),
            jnp.where(ok, cov, state.cov),
            jnp.where(ok, chol, state.chol),
            state.step + 1,
            state.num_rejected + jnp.where(ok, 0, 1).astype(jnp.int32),
        )
        return new, loss

    return step


def _fit(method, score_fn, init_loc, init_cov, num_steps, batch_size, key, schedule):
    if not (isinstance(num_steps, int) and num_steps >= 0):
        raise ValueError(f"num_steps must be a non-negative int, got {num_steps!r}.")
    state = init_state(init_loc, init_cov)
    step = make_step(method, score_fn, batch_size, schedule)

    @jax.jit
    def run(state, keys):
        return jax.lax.scan(step, state, keys)

    keys = jax.random.split(key, num_steps)
    state, losses = run(state, keys)
    rejected = int(state.num_rejected)
    if rejected:
        logger.info("%s: %d of %d updates rejected", method.upper(), rejected, num_steps)
    return GaussianFit(state.loc, state.cov, rejected, np.asarray(losses))


def fit_gsm(
    score_fn: ScoreFn,
    init_loc: Any,
    init_cov: Any,
    num_steps: int,
    *,
    batch_size: int,
    key: jax.Array,
) -> GaussianFit:
    """Fits a full-rank Gaussian by GSM (Modi et al 2023, Algorithm 1).

    Args:
        score_fn: ``(theta (B, d), key) -> (log_p (B,), grad (B, d))`` of the unconstrained
            target (JAX-traceable; mini-batch estimates allowed).
        init_loc, init_cov: :math:`\\mu_0` ``(d,)`` and :math:`\\Sigma_0` ``(d, d)``; the
            dtype of ``init_loc`` is the working precision.
        num_steps: iterations (``num_steps * batch_size`` gradient evaluations).
        batch_size: draws :math:`B` per iteration.
        key: ``jax.random`` key (draws and the key passed to ``score_fn``).
    """
    return _fit("gsm", score_fn, init_loc, init_cov, num_steps, batch_size, key, None)


def fit_bam(
    score_fn: ScoreFn,
    init_loc: Any,
    init_cov: Any,
    num_steps: int,
    *,
    batch_size: int,
    key: jax.Array,
    schedule: Callable[[jax.Array], jax.Array] | float | None = None,
) -> GaussianFit:
    """Fits a full-rank Gaussian by BaM (Cai et al 2024, Algorithm 1).

    Args: as :func:`fit_gsm`, and ``schedule``: :math:`t \\mapsto \\lambda_t` (JAX-traceable,
    :math:`t = 0, 1, \\dots`), a constant :math:`\\lambda`, or ``None`` for the paper's
    :math:`\\lambda_t = B d / (t + 1)`.
    """
    return _fit("bam", score_fn, init_loc, init_cov, num_steps, batch_size, key, schedule)
