"""Runs the side-by-side fits under equal budgets and collects every figure.

Methods. Each row of a table is a :class:`Method`: an algorithm on a backend. The algorithms
(``--methods``): ``elbo`` (``SVI`` + ``Trace_ELBO``, Adam), ``scoreprox``
(``ScoreProximalSVI``), both with an ``AutoNormal`` guide in Pyro and, with ``--numpyro``, in
NumPyro; ``ivon`` (IVON through ``ivon-opt`` on the same torch network, network problems only,
:mod:`~pyro_scorevi.compare.ivon_fit`); ``gsm`` and ``bam`` (full-rank Gaussian score matching
and batch-and-match in JAX on the NumPyro twin of the model, the ``gaussian`` and ``posterior``
problems only, :mod:`~pyro_scorevi.compare.gsm_bam`). A method that does not apply to a problem
is skipped with a note in the result (``skipped``), never an error.

Budgets. A *gradient evaluation* is one forward/backward pass of the log joint on one particle:
``elbo``, ``scoreprox`` and ``ivon`` take ``S = num_particles`` of them per step, ``gsm`` and
``bam`` ``B = score_batch_size`` (:data:`FULL_RANK_BATCH` by default), so the equal-evaluation
budget ``G`` is ``ceil(G / S)`` (or ``ceil(G / B)``) steps each. The equal *wall-time* budget
``T`` is either given or, by default, the wall time the ELBO baseline needed for ``G``
evaluations (per seed and backend; the JAX methods take the NumPyro baseline's time when it
ran, else the Pyro one's; with no ELBO row at all, the first row's); each fit then runs until
it has reached both ``G`` and ``T``, and is evaluated at each crossing. Only the steps are
timed: evaluations, checkpoints and (for JAX) the first, compiling call are outside the clock.

Order. Per seed: the Pyro rows (baseline first), then the NumPyro rows, then the JAX rows, each
from the same initial means (``AutoNormal`` with ``init_to_median`` after seeding) in its own
Pyro param-store scope. IVON's initial spread is its own (``hess_init``), the full-rank methods
start from ``init_scale**2 * I``.

Metrics. Every fit is summarised by per-site unconstrained means and standard deviations (a
full-rank fit by the diagonal of its covariance), which the problem's metrics use. ``-ELBO``
comes from one estimator for all rows (:func:`neg_elbo`, ``Trace_ELBO`` on the full-data Pyro
model); a full-rank fit is scored with its full covariance (:func:`neg_elbo_full_rank`, exact on
the Gaussian problem).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from pyro_scorevi.compare.problems import Problem

__all__ = [
    "Method",
    "METHODS",
    "NoMethodApplies",
    "ALGORITHMS",
    "DEFAULT_ALGORITHMS",
    "Settings",
    "Budget",
    "run_comparison",
    "select_methods",
    "neg_elbo",
    "neg_elbo_full_rank",
    "numpyro_available",
    "ivon_available",
]

logger = logging.getLogger(__name__)


class NoMethodApplies(ValueError):
    """None of the selected methods applies to the problem (e.g. ``--methods gsm`` on a
    network); the command line reports it and goes on with the next problem."""


@dataclass(frozen=True)
class Method:
    """One row of the table: an algorithm on a backend (``options``: e.g. IVON's lr)."""

    key: str
    label: str
    backend: str  # "pyro", "numpyro" or "jax"
    algorithm: str  # "elbo", "scoreprox", "ivon", "gsm" or "bam"
    options: tuple[tuple[str, Any], ...] = ()


@dataclass(frozen=True)
class Algorithm:
    """An algorithm of ``--methods``: its backends and the problem kinds it applies to."""

    name: str
    description: str
    backends: tuple[str, ...]
    kinds: tuple[str, ...] | None  # None: every kind
    why_not: str = ""  # the note when a problem's kind is not in ``kinds``


#: The algorithms of ``--methods``, in the order of the rows.
ALGORITHMS: dict[str, Algorithm] = {
    a.name: a
    for a in (
        Algorithm("elbo", "SVI + Trace_ELBO (Adam), AutoNormal", ("pyro", "numpyro"), None),
        Algorithm("scoreprox", "ScoreProximalSVI, AutoNormal", ("pyro", "numpyro"), None),
        Algorithm(
            "ivon",
            "IVON (ivon-opt, PyTorch), mean-field on the same network",
            ("pyro",),
            ("classifier", "forecaster"),
            "IVON runs on the network problems (digits-mlp, digits-vit, sunspots)",
        ),
        Algorithm(
            "gsm",
            "GSM, full-rank Gaussian score matching (JAX)",
            ("jax",),
            ("gaussian", "posterior"),
            "full-rank methods run on the small dense problems (gaussian, logreg)",
        ),
        Algorithm(
            "bam",
            "BaM, full-rank batch-and-match (JAX)",
            ("jax",),
            ("gaussian", "posterior"),
            "full-rank methods run on the small dense problems (gaussian, logreg)",
        ),
    )
}

#: What ``pyro-scorevi compare`` runs without ``--methods``.
DEFAULT_ALGORITHMS = ("elbo", "scoreprox", "ivon")

_BACKEND_ORDER = ("pyro", "numpyro", "jax")

_LABELS = {
    ("pyro", "elbo"): "Pyro SVI+Trace_ELBO",
    ("pyro", "scoreprox"): "Pyro ScoreProximalSVI",
    ("numpyro", "elbo"): "NumPyro SVI+Trace_ELBO",
    ("numpyro", "scoreprox"): "NumPyro ScoreProximalSVI",
    ("pyro", "ivon"): "IVON (torch)",
    ("jax", "gsm"): "GSM full-rank (JAX)",
    ("jax", "bam"): "BaM full-rank (JAX)",
}

#: The rows with no option (IVON's default row is ``pyro-ivon`` at the problem's lr).
METHODS: dict[str, Method] = {
    f"{b}-{a}": Method(f"{b}-{a}", label, b, a) for (b, a), label in _LABELS.items()
}


@dataclass(frozen=True)
class Settings:
    """Algorithm settings shared by every problem (``None``: the problem's default).

    Attributes:
        num_particles: ``S``, particles (gradient evaluations) per step, for ``elbo``,
            ``scoreprox`` and IVON (its ``mc_samples``).
        prox_weight: :math:`\\lambda` of ``ScoreProximalSVI``.
        scale_prox_weight: its ``scale_prox_weight`` :math:`\\lambda_s`.
        elbo_lr: Adam learning rate of the ``Trace_ELBO`` baseline.
        eval_samples: posterior draws behind each predictive figure.
        elbo_particles: particles of the common full-data ``-ELBO`` estimate (``Trace_ELBO`` on
            the Pyro model, the same estimator for every method).
        checkpoints: problem-error evaluations per ``G`` evaluations (and as many again over
            the rest of the time budget), for the curves.
        ivon_lr: IVON's learning rate(s); several give one row each (``None``: the problem's
            default, :func:`pyro_scorevi.compare.ivon_fit.default_lr`).
        ivon_hess_init: IVON's initial Hessian ``hess_init`` (the package default, 1).
        score_batch_size: ``B``, draws (gradient evaluations) per GSM/BaM iteration
            (``None``: :data:`FULL_RANK_BATCH`, 2 for GSM and 5 for BaM).
        step_rule: keyword arguments of :class:`~pyro_scorevi.AdaptiveStep` for
            ``ScoreProximalSVI`` in both backends (``None``: the library's default rule).
    """

    num_particles: int = 2
    prox_weight: float | None = None
    scale_prox_weight: float | None = None
    elbo_lr: float | None = None
    eval_samples: int = 100
    elbo_particles: int = 16
    checkpoints: int = 20
    ivon_lr: tuple[float, ...] | None = None
    ivon_hess_init: float = 1.0
    score_batch_size: int | None = None
    step_rule: dict | None = None


@dataclass(frozen=True)
class Budget:
    """``grad_evals`` per fit; ``seconds`` of stepping per fit (``None``: the baseline's time)."""

    grad_evals: int
    seconds: float | None = None


def numpyro_available() -> tuple[bool, str]:
    """Whether the NumPyro columns can run, and why not."""
    try:
        import numpyro  # noqa: F401

        from pyro_scorevi.numpyro import ScoreProximalSVI  # noqa: F401
    except Exception as exc:  # ImportError, or a half-written backend raising anything
        return False, f"{type(exc).__name__}: {exc}"
    return True, ""


def jax_available() -> tuple[bool, str]:
    """Whether the JAX rows (GSM, BaM on the NumPyro twin of the model) can run."""
    try:
        import jax  # noqa: F401
        import numpyro  # noqa: F401
    except Exception as exc:
        return False, f"{type(exc).__name__}: {exc}"
    return True, ""


def ivon_available() -> tuple[bool, str]:
    """Whether the IVON rows can run (the ``ivon-opt`` package)."""
    try:
        import ivon  # noqa: F401
    except Exception as exc:
        return False, f"{type(exc).__name__}: {exc}"
    return True, ""


def _available(algorithm: str) -> tuple[bool, str]:
    if algorithm == "ivon":
        ok, why = ivon_available()
        return ok, "" if ok else f"ivon-opt is not installed ({why}); pip install ivon-opt"
    if algorithm in ("gsm", "bam"):
        ok, why = jax_available()
        fix = 'pip install "pyro_scorevi[numpyro]"'
        return ok, "" if ok else f"needs JAX and NumPyro ({why}); {fix}"
    return True, ""


def select_methods(
    problem: Problem,
    algorithms: tuple[str, ...] | list[str] = DEFAULT_ALGORITHMS,
    backends: tuple[str, ...] = ("pyro",),
    settings: Settings = Settings(),
) -> tuple[list[Method], list[str]]:
    """The rows of ``problem`` for ``algorithms``, and a note for each one left out.

    ``algorithms`` may contain ``"all"``. ``backends`` picks the Pyro and NumPyro columns of
    ``elbo`` and ``scoreprox``; the JAX-only methods (``gsm``, ``bam``) run whenever they are
    selected and apply. Unknown names raise ``ValueError`` listing the valid ones.
    """
    from pyro_scorevi.compare.ivon_fit import default_lr

    if "all" in algorithms:
        algorithms = tuple(ALGORITHMS)
    unknown = [a for a in algorithms if a not in ALGORITHMS]
    if unknown:
        raise ValueError(
            f"unknown method(s) {', '.join(map(repr, unknown))}; choose from "
            f"{', '.join(ALGORITHMS)} or 'all'."
        )
    rows: list[Method] = []
    notes: list[str] = []
    for name in (a for a in ALGORITHMS if a in algorithms):
        alg = ALGORITHMS[name]
        if alg.kinds is not None and problem.kind not in alg.kinds:
            notes.append(f"{name}: not run on {problem.name}; {alg.why_not}")
            continue
        ok, why = _available(name)
        if not ok:
            notes.append(f"{name}: skipped, {why}")
            continue
        if name == "ivon" and "numpyro" in backends:
            notes.append("ivon: no NumPyro column (ivon-opt is a PyTorch optimizer)")
        for backend in alg.backends:
            if backend != "jax" and backend not in backends:
                continue
            if name != "ivon":
                rows.append(METHODS[f"{backend}-{name}"])
                continue
            lrs = settings.ivon_lr or (default_lr(problem.name),)
            for lr in lrs:
                key = "pyro-ivon" if len(lrs) == 1 else f"pyro-ivon-lr{lr:g}"
                rows.append(Method(key, f"IVON lr={lr:g} (torch)", "pyro", "ivon", (("lr", lr),)))
    rows.sort(key=lambda m: _BACKEND_ORDER.index(m.backend))  # stable: algorithm order within
    return rows, notes


#: Draws per GSM/BaM iteration when ``Settings.score_batch_size`` is ``None``: GSM's is the
#: default of the authors' code (``gsmvi``, ``batch_size=2``); BaM's the best of the grid
#: {2, 5, 10, 20} on ``logreg`` (mean error vs NUTS at 4000 evaluations, seeds 0-1; issue 13).
FULL_RANK_BATCH = {"gsm": 2, "bam": 5}


def _evals_per_step(method: Method, settings: Settings) -> int:
    if method.algorithm in FULL_RANK_BATCH:
        return settings.score_batch_size or FULL_RANK_BATCH[method.algorithm]
    return settings.num_particles


# ---------------------------------------------------------------------------------------------
# Fits: a uniform (prepare, step, moments) surface over the methods
# ---------------------------------------------------------------------------------------------


class _PyroFit:
    def __init__(self, problem: Problem, method: Method, seed: int, settings: Settings):
        import pyro
        from pyro.infer import SVI, Trace_ELBO
        from pyro.infer.autoguide import AutoNormal
        from pyro.infer.autoguide.initialization import init_to_median

        import pyro_scorevi

        self.problem = problem
        self.model, self.args, self.kwargs = problem.pyro_model_and_args()
        pyro.set_rng_seed(seed)
        self.guide = AutoNormal(
            self.model, init_loc_fn=init_to_median, init_scale=problem.init_scale
        )
        self.guide(*self.args, **self.kwargs)  # creates the params: same start for both methods
        s = settings.num_particles
        if method.algorithm == "elbo":
            lr = settings.elbo_lr or problem.elbo_lr
            self.svi = SVI(self.model, self.guide, pyro.optim.Adam({"lr": lr}), Trace_ELBO(s))
        else:
            self.svi = pyro_scorevi.ScoreProximalSVI(
                self.model,
                self.guide,
                num_particles=s,
                **_score_proximal_options(problem, settings),
            )

    def step(self) -> float:
        return self.svi.step(*self.args, **self.kwargs)

    def moments(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        import torch

        loc, scale = {}, {}
        with torch.no_grad():
            for name in self.problem.latent_names():
                m, s = self.guide._get_loc_and_scale(name)
                loc[name] = m.detach().double().numpy().copy()
                scale[name] = s.detach().double().numpy().copy()
        return loc, scale


def _score_proximal_options(problem: Problem, settings: Settings) -> dict[str, Any]:
    """The keyword arguments of either backend's ``ScoreProximalSVI``."""
    options: dict[str, Any] = _proximal_weights(problem, settings)
    if settings.step_rule is not None:
        from pyro_scorevi import AdaptiveStep

        options["step_rule"] = AdaptiveStep(**settings.step_rule)
    return options


def _proximal_weights(problem: Problem, settings: Settings) -> dict[str, float | None]:
    """``prox_weight`` and ``scale_prox_weight``: the settings' where given, else the
    problem's (a given ``prox_weight`` alone keeps the paper's single weight)."""
    if settings.prox_weight is not None:
        return {
            "prox_weight": settings.prox_weight,
            "scale_prox_weight": settings.scale_prox_weight,
        }
    return {
        "prox_weight": problem.prox_weight,
        "scale_prox_weight": settings.scale_prox_weight or problem.scale_prox_weight,
    }


def _initial_loc(problem: Problem, seed: int) -> dict[str, np.ndarray]:
    """The unconstrained means every method starts from: the ``AutoNormal`` guide's initial
    ``loc`` (``init_to_median``) after ``pyro.set_rng_seed(seed)``, as :class:`_PyroFit`."""
    import pyro
    import torch
    from pyro.infer.autoguide import AutoNormal
    from pyro.infer.autoguide.initialization import init_to_median

    model, args, kwargs = problem.pyro_model_and_args()
    with pyro.get_param_store().scope():
        pyro.set_rng_seed(seed)
        guide = AutoNormal(model, init_loc_fn=init_to_median, init_scale=problem.init_scale)
        guide(*args, **kwargs)
        with torch.no_grad():
            return {
                name: guide._get_loc_and_scale(name)[0].detach().double().numpy().copy()
                for name in problem.latent_names()
            }


class _IVONRowFit:
    """IVON (:class:`~pyro_scorevi.compare.ivon_fit.IVONFit`) on the problem's torch network."""

    def __init__(self, problem: Problem, method: Method, seed: int, settings: Settings):
        from pyro_scorevi.compare.ivon_fit import IVONFit

        spec, data, _ = problem.load()
        self.fit = IVONFit(
            spec,
            data.x_train,
            data.y_train,
            _initial_loc(problem, seed),
            batch_size=problem.batch_size,
            lr=dict(method.options)["lr"],
            mc_samples=settings.num_particles,
            seed=seed,
            hess_init=settings.ivon_hess_init,
        )

    def step(self) -> float:
        return self.fit.step()

    @property
    def num_rejected(self) -> int:
        return self.fit.num_rejected

    def moments(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        return self.fit.moments()


def numpyro_score_fn(problem: Problem, full_batch: bool = False):
    """``score_fn(theta (B, d), key) -> (log_p (B,), grad (B, d))`` of the problem's NumPyro
    twin: the unconstrained log joint ``-potential_energy`` (log-Jacobians included, the
    likelihood scaled by ``N/B`` under the plate's mini-batch), on the flat vector of the latent
    sites in model order (each raveled row-major). All ``B`` draws share the mini-batch that
    ``key`` seeds."""
    import jax
    from numpyro import handlers
    from numpyro.infer.util import potential_energy

    model, args, kwargs = problem.numpyro_model_and_args(full_batch=full_batch)
    unflatten = _unflattener(problem)

    def score_fn(theta, key):
        seeded = handlers.seed(model, rng_seed=key)

        def log_p(th):
            return -potential_energy(seeded, args, kwargs, unflatten(th))

        return jax.vmap(jax.value_and_grad(log_p))(theta)

    return score_fn


def _layout(problem: Problem) -> list[tuple[str, tuple[int, ...], int]]:
    return [(s.name, tuple(s.shape), s.size) for s in problem.load()[0].latents]


def _unflattener(problem: Problem):
    layout = _layout(problem)

    def unflatten(theta):
        out, off = {}, 0
        for name, shape, size in layout:
            out[name] = theta[off : off + size].reshape(shape)
            off += size
        return out

    return unflatten


class _FullRankFit:
    """GSM or BaM (:mod:`~pyro_scorevi.compare.gsm_bam`) on the NumPyro twin, jitted step."""

    full_rank = True

    def __init__(self, problem: Problem, method: Method, seed: int, settings: Settings):
        import jax
        import jax.numpy as jnp

        from pyro_scorevi.compare import gsm_bam

        self.problem = problem
        self.layout = _layout(problem)
        init = _initial_loc(problem, seed)
        loc0 = np.concatenate([np.ravel(init[n]) for n, _, _ in self.layout])
        d = len(loc0)
        self.state = gsm_bam.init_state(
            jnp.asarray(loc0, jnp.float32), problem.init_scale**2 * jnp.eye(d, dtype=jnp.float32)
        )
        step = gsm_bam.make_step(
            method.algorithm, numpyro_score_fn(problem), _evals_per_step(method, settings)
        )

        def advance(state, key):
            key, sub = jax.random.split(key)
            state, loss = step(state, sub)
            return state, key, loss

        self._advance = jax.jit(advance)
        self.key = jax.random.PRNGKey(seed)
        # Compile outside the clock; the result is discarded.
        jax.block_until_ready(self._advance(self.state, self.key))

    def step(self) -> float:
        self.state, self.key, loss = self._advance(self.state, self.key)
        return float(loss)  # waits for the device: the clock sees the whole step

    @property
    def num_rejected(self) -> int:
        return int(self.state.num_rejected)

    def covariance(self) -> tuple[np.ndarray, np.ndarray]:
        """``(loc, cov)`` of the flat unconstrained vector (float64)."""
        return np.asarray(self.state.loc, float), np.asarray(self.state.cov, float)

    def moments(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        m, cov = self.covariance()
        sd = np.sqrt(np.diag(cov))
        loc, scale, off = {}, {}, 0
        for name, shape, size in self.layout:
            loc[name] = m[off : off + size].reshape(shape)
            scale[name] = sd[off : off + size].reshape(shape)
            off += size
        return loc, scale


class _NumPyroFit:
    def __init__(self, problem: Problem, method: Method, seed: int, settings: Settings):
        import jax
        import numpyro
        from numpyro.infer import SVI, Trace_ELBO
        from numpyro.infer.autoguide import AutoNormal
        from numpyro.infer.initialization import init_to_median

        self.problem = problem
        model, args, kwargs = problem.numpyro_model_and_args()
        model = functools.partial(model, *args, **kwargs)
        guide = AutoNormal(model, init_loc_fn=init_to_median, init_scale=problem.init_scale)
        s = settings.num_particles
        if method.algorithm == "elbo":
            lr = settings.elbo_lr or problem.elbo_lr
            svi = SVI(model, guide, numpyro.optim.Adam(lr), Trace_ELBO(num_particles=s))
        else:
            from pyro_scorevi.numpyro import ScoreProximalSVI

            svi = ScoreProximalSVI(
                model, guide, num_particles=s, **_score_proximal_options(problem, settings)
            )
        self.svi = svi
        self.state = svi.init(jax.random.PRNGKey(seed))
        self._update = jax.jit(svi.update)
        # Compile outside the clock; the result is discarded.
        jax.block_until_ready(self._update(self.state))

    def step(self) -> float:
        self.state, loss = self._update(self.state)
        return float(loss)  # waits for the device: the clock sees the whole step

    def moments(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        params = self.svi.get_params(self.state)
        loc, scale = {}, {}
        for name in self.problem.latent_names():
            loc[name] = np.asarray(params[f"{name}_auto_loc"], dtype=float)
            scale[name] = np.asarray(params[f"{name}_auto_scale"], dtype=float)
        return loc, scale


# ---------------------------------------------------------------------------------------------
# The common -ELBO estimate
# ---------------------------------------------------------------------------------------------


def neg_elbo(
    problem: Problem,
    loc: dict[str, np.ndarray],
    scale: dict[str, np.ndarray],
    num_particles: int = 16,
    seed: int = 0,
) -> float:
    """Full-data ``-ELBO`` of a mean-field Gaussian (unconstrained ``loc``, ``scale``).

    Estimated with Pyro's ``Trace_ELBO`` on the full-data Pyro model, whichever backend fitted
    the guide (the twins are the same model), so every method is scored by one estimator.
    The Gaussian problem has it in closed form (:meth:`Problem.evaluate`).
    """
    import pyro
    import pyro.distributions as dist
    import torch
    from pyro.distributions.transforms import ExpTransform

    spec, _, _ = problem.load()
    model, args, kwargs = problem.pyro_model_and_args(full_batch=True)

    def guide(*_args, **_kwargs):
        for s in spec.latents:
            m = torch.as_tensor(loc[s.name], dtype=torch.float32)
            sd = torch.as_tensor(scale[s.name], dtype=torch.float32)
            d = dist.Normal(m, sd).to_event(m.dim())
            if s.positive:
                d = dist.TransformedDistribution(d, ExpTransform())
            pyro.sample(s.name, d)

    return _trace_elbo_loss(model, guide, args, kwargs, num_particles, seed)


def neg_elbo_full_rank(
    problem: Problem,
    loc: np.ndarray,
    cov: np.ndarray,
    num_particles: int = 16,
    seed: int = 0,
) -> float:
    """Full-data ``-ELBO`` of a full-rank Gaussian on the flat unconstrained vector (the latent
    sites in model order, each raveled row-major).

    The same estimator as :func:`neg_elbo`: Pyro's ``Trace_ELBO`` on the full-data Pyro model.
    The guide draws the flat vector :math:`u \\sim \\mathcal N(\\mu, \\Sigma)` as an auxiliary
    site and puts each site at its (constrained) value with a ``Delta`` whose density is
    :math:`-\\log|J|`, so that :math:`\\log q(\\theta) = \\log q(u) - \\log|J(u)|`. On the
    Gaussian problem (normalised target) it is the exact :math:`\\mathrm{KL}(q \\Vert p)`.
    """
    spec, data, _ = problem.load()
    if problem.kind == "gaussian":
        return _gaussian_kl_full(loc, cov, data.extra["mu"], data.extra["precision"])
    import pyro
    import pyro.distributions as dist
    import torch

    model, args, kwargs = problem.pyro_model_and_args(full_batch=True)
    m = torch.as_tensor(loc, dtype=torch.float64)
    tril = torch.linalg.cholesky(torch.as_tensor(cov, dtype=torch.float64))

    def guide(*_args, **_kwargs):
        u = pyro.sample(
            "_full_rank_u",
            dist.MultivariateNormal(m, scale_tril=tril),
            infer={"is_auxiliary": True},
        ).float()
        off = 0
        for s in spec.latents:
            v = u[off : off + s.size].reshape(s.shape)
            off += s.size
            k = len(s.shape)
            if s.positive:
                pyro.sample(s.name, dist.Delta(v.exp(), log_density=-v.sum(), event_dim=k))
            else:
                pyro.sample(s.name, dist.Delta(v, event_dim=k))

    return _trace_elbo_loss(model, guide, args, kwargs, num_particles, seed)


def _trace_elbo_loss(model, guide, args, kwargs, num_particles: int, seed: int) -> float:
    """``Trace_ELBO(num_particles).loss`` on a seeded stream, in its own param-store scope.

    The estimate runs between training steps: it must not disturb the fit's random stream."""
    import pyro
    import torch
    from pyro.infer import Trace_ELBO

    rng_state = pyro.util.get_rng_state()
    try:
        with torch.no_grad(), pyro.get_param_store().scope():
            pyro.set_rng_seed(seed)
            return float(Trace_ELBO(num_particles).loss(model, guide, *args, **kwargs))
    finally:
        pyro.util.set_rng_state(rng_state)


def _gaussian_kl_full(loc, cov, mu, prec) -> float:
    """Exact ``KL(N(loc, cov) || N(mu, prec^-1))``."""
    d = len(mu)
    diff = np.asarray(loc, float) - mu
    cov = np.asarray(cov, float)
    _, logdet_prec = np.linalg.slogdet(prec)
    sign, logdet_cov = np.linalg.slogdet(cov)
    if sign <= 0:
        return math.inf
    return float(0.5 * (np.sum(prec * cov) + diff @ prec @ diff - d - logdet_prec - logdet_cov))


# ---------------------------------------------------------------------------------------------
# One fit under a budget
# ---------------------------------------------------------------------------------------------


#: Points kept per loss curve in the JSON (the per-step losses are averaged in bins).
CURVE_POINTS = 200


def _bin(values: list[float], points: int) -> list[float]:
    a = np.asarray(values, dtype=float)
    if len(a) <= points:
        return a.tolist()
    edges = np.linspace(0, len(a), points + 1).astype(int)
    return [float(np.mean(a[i:j])) for i, j in zip(edges[:-1], edges[1:])]


def _finite_or_none(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def _figures(problem, fit, settings, seed, num_samples, details):
    """The problem's figures of ``fit``.

    A full-rank fit reports the diagonal of its covariance for the mean-field metrics (moment
    errors) and its full covariance for ``-ELBO``; on the Gaussian problem its ``kl_gap`` is its
    full KL minus the mean-field optimum's (negative: closer than any mean-field fit can be).
    """
    loc, scale = fit.moments()
    if not all(np.all(np.isfinite(v)) for v in (*loc.values(), *scale.values())):
        # A diverged fit (e.g. IVON at too high a learning rate): every figure is NaN (null in
        # the JSON), with the same names as a finite fit's.
        ones = {k: np.ones_like(v) for k, v in loc.items()}
        names = problem.evaluate(ones, ones, 2, seed=seed, details=details)
        figures: dict[str, Any] = {k: math.nan for k in names if k != "_plot"}
        if "_plot" in names:
            figures["_plot"] = {  # the data axes stay; the fit's arrays are NaN
                k: v if k in ("time", "y") else np.full(np.shape(v), math.nan)
                for k, v in names["_plot"].items()
            }
        figures["neg_elbo"] = math.nan
        return loc, scale, figures
    figures = problem.evaluate(loc, scale, num_samples, seed=seed, details=details)
    if getattr(fit, "full_rank", False):
        m, cov = fit.covariance()
        value = neg_elbo_full_rank(problem, m, cov, settings.elbo_particles, seed)
        if problem.kind == "gaussian":
            figures["kl_gap"] = value - float(problem.load()[1].extra["optimal_kl"])
        figures["neg_elbo"] = value
    return loc, scale, figures


def _snapshot(problem, fit, seed, settings, evals, clock, details):
    loc, scale, figures = _figures(problem, fit, settings, seed, settings.eval_samples, details)
    plot = figures.pop("_plot", None)
    if "neg_elbo" not in figures:
        figures["neg_elbo"] = neg_elbo(problem, loc, scale, settings.elbo_particles, seed)
    out = {"grad_evals": evals, "wall_s": clock, "metrics": figures}
    if hasattr(fit, "num_rejected"):
        out["rejected_steps"] = fit.num_rejected
    if plot is not None:
        out["plot"] = {k: np.asarray(v, dtype=float).tolist() for k, v in plot.items()}
    return out


def _make_fit(problem: Problem, method: Method, seed: int, settings: Settings) -> Any:
    if method.algorithm == "ivon":
        return _IVONRowFit(problem, method, seed, settings)
    if method.algorithm in ("gsm", "bam"):
        return _FullRankFit(problem, method, seed, settings)
    if method.backend == "pyro":
        return _PyroFit(problem, method, seed, settings)
    return _NumPyroFit(problem, method, seed, settings)


def fit_once(
    problem: Problem,
    method: Method,
    seed: int,
    settings: Settings,
    grad_evals: int,
    seconds: float | None,
    on_step: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Fits ``method`` until it has made ``grad_evals`` evaluations and stepped ``seconds``.

    Returns the fit's figures at both crossings (``equal_evals``, ``equal_time``; the latter is
    the former when ``seconds`` is ``None``), the binned loss curve and the checkpoints
    (``settings.checkpoints`` evenly spaced in steps up to ``grad_evals``, then as many evenly
    spaced in time up to ``seconds``, so a fast method is not evaluated more often).
    """
    import pyro

    s = _evals_per_step(method, settings)
    steps_g = math.ceil(grad_evals / s)
    num_checkpoints = max(1, settings.checkpoints)
    every = max(1, steps_g // num_checkpoints)
    time_every = None if seconds is None else seconds / num_checkpoints
    with contextlib.ExitStack() as stack:
        stack.enter_context(pyro.get_param_store().scope())
        fit: Any = _make_fit(problem, method, seed, settings)
        losses, clocks = [], []
        checkpoints: dict[str, list[float]] = {"grad_evals": [], "wall_s": [], problem.headline: []}

        def checkpoint(evals, clock):
            # Fewer draws than the final figures: these only draw the curves.
            num = max(8, settings.eval_samples // 4)
            value = _figures(problem, fit, settings, seed, num, False)[2]
            checkpoints["grad_evals"].append(evals)
            checkpoints["wall_s"].append(clock)
            checkpoints[problem.headline].append(_finite_or_none(value[problem.headline]))

        snaps: dict[str, Any] = {}
        evals, clock, step = 0, 0.0, 0
        next_time = time_every
        checkpoint(0, 0.0)
        while True:
            hit_evals = evals >= grad_evals
            hit_time = seconds is not None and clock >= seconds
            if hit_evals and "equal_evals" not in snaps:
                snaps["equal_evals"] = _snapshot(problem, fit, seed, settings, evals, clock, True)
            if hit_time and "equal_time" not in snaps:
                snaps["equal_time"] = _snapshot(problem, fit, seed, settings, evals, clock, True)
            if hit_evals and (seconds is None or hit_time):
                break
            t0 = time.perf_counter()
            loss = fit.step()
            clock += time.perf_counter() - t0
            evals += s
            step += 1
            losses.append(loss)
            clocks.append(clock)
            if evals <= grad_evals:
                due = step % every == 0
            else:
                due = next_time is not None and clock >= next_time
            if due:
                checkpoint(evals, clock)
                if time_every is not None:
                    next_time = (math.floor(clock / time_every) + 1) * time_every
            if on_step is not None:
                on_step(s)
        if seconds is None:
            snaps["equal_time"] = snaps["equal_evals"]
    idx = np.linspace(0, len(losses), min(len(losses), CURVE_POINTS) + 1).astype(int)[1:] - 1
    curve = {
        "grad_evals": [int((i + 1) * s) for i in idx],
        "wall_s": [clocks[i] for i in idx],
        "loss": [_finite_or_none(v) for v in _bin(losses, CURVE_POINTS)],
    }
    logger.info(
        "%s %s seed %d: %d evals in %.2f s, final loss %.4g",
        problem.name,
        method.key,
        seed,
        evals,
        clock,
        losses[-1] if losses else float("nan"),
    )
    return {**snaps, "curve": curve, "checkpoints": checkpoints, "total_wall_s": clock}


# ---------------------------------------------------------------------------------------------
# The comparison
# ---------------------------------------------------------------------------------------------


def _summary(values: list[float | None]) -> dict[str, Any]:
    a = np.asarray([np.nan if v is None else v for v in values], dtype=float)
    ok = a[np.isfinite(a)]
    return {
        "mean": _finite_or_none(float(ok.mean())) if len(ok) else None,
        "sd": _finite_or_none(float(ok.std(ddof=1))) if len(ok) > 1 else 0.0 if len(ok) else None,
        "n": int(len(ok)),
        "values": [_finite_or_none(float(v)) for v in a],
    }


def _default_seconds(times: dict[str, float], backend: str) -> float | None:
    """The equal-time budget of a ``backend`` row: its ELBO baseline's time; the JAX rows take
    NumPyro's (both jitted), else Pyro's; with no baseline at all, the first row's."""
    order = {"pyro": ("pyro",), "numpyro": ("numpyro",), "jax": ("numpyro", "pyro")}[backend]
    for b in order:
        if b in times:
            return times[b]
    return times.get("first")


def run_comparison(
    problem: Problem,
    *,
    seeds: list[int],
    budget: Budget,
    settings: Settings = Settings(),
    backends: tuple[str, ...] = ("pyro",),
    progress: bool = True,
    methods: tuple[str, ...] | list[str] = DEFAULT_ALGORITHMS,
) -> dict[str, Any]:
    """Fits every row of ``methods`` (algorithm names, :data:`ALGORITHMS`) on ``problem`` for
    each seed under ``budget``; ``backends`` adds the NumPyro columns of ``elbo`` and
    ``scoreprox``. Rows that do not apply are left out with a note (``skipped``).

    Returns a JSON-ready dict: the configuration, each run's figures at equal gradient
    evaluations and at equal wall time with its curves, and per method the mean and sd over
    seeds of every figure (``summary[method][budget][metric]``).
    """
    from tqdm.auto import tqdm

    rows, notes = select_methods(problem, tuple(methods), backends, settings)
    for note in notes:
        logger.info("%s", note)
    if not rows:
        raise NoMethodApplies(f"no method of {', '.join(methods)} applies ({'; '.join(notes)})")
    steps = {m.key: math.ceil(budget.grad_evals / _evals_per_step(m, settings)) for m in rows}
    bar = tqdm(
        total=sum(steps[m.key] * _evals_per_step(m, settings) for m in rows) * len(seeds),
        desc=problem.name,
        unit="eval",
        disable=not progress,
        leave=True,
        dynamic_ncols=True,
    )
    runs = []
    try:
        for seed in seeds:
            times: dict[str, float] = {}
            for method in rows:
                bar.set_postfix_str(f"seed {seed} {method.key}")
                # The bar counts the equal-evaluation part of each fit; a fit that goes on
                # to the time budget leaves it still until it is done.
                left = [steps[method.key] * _evals_per_step(method, settings)]

                def on_step(n, left=left):
                    if left[0] >= n:
                        left[0] -= n
                        bar.update(n)

                seconds = budget.seconds
                if seconds is None and method.algorithm != "elbo":  # a baseline sets its own
                    seconds = _default_seconds(times, method.backend)
                run = fit_once(
                    problem,
                    method,
                    seed,
                    settings,
                    budget.grad_evals,
                    seconds,
                    on_step=on_step,
                )
                took = run["equal_evals"]["wall_s"]
                if method.algorithm == "elbo":
                    times.setdefault(method.backend, took)
                times.setdefault("first", took)
                runs.append({"seed": seed, "method": method.key, **run})
    finally:
        bar.close()
    summary: dict[str, Any] = {}
    for method in rows:
        mine = [r for r in runs if r["method"] == method.key]
        summary[method.key] = {}
        for which in ("equal_evals", "equal_time"):
            names = list(mine[0][which]["metrics"])
            block = {n: _summary([r[which]["metrics"][n] for r in mine]) for n in names}
            block["grad_evals"] = _summary([r[which]["grad_evals"] for r in mine])
            block["wall_s"] = _summary([r[which]["wall_s"] for r in mine])
            if "rejected_steps" in mine[0][which]:
                block["rejected_steps"] = _summary([r[which]["rejected_steps"] for r in mine])
            summary[method.key][which] = block
    spec = problem.load()[0]
    return {
        "problem": problem.name,
        "description": problem.description,
        "kind": problem.kind,
        "headline": problem.headline,
        "num_latents": int(sum(s.size for s in spec.latents)),
        "budget": {
            "grad_evals": budget.grad_evals,
            "seconds": budget.seconds,
            "seconds_rule": "given" if budget.seconds is not None else "baseline wall time",
            "num_particles": settings.num_particles,
            "batch_size": problem.batch_size,
            "seeds": list(seeds),
        },
        "settings": {
            **asdict(settings),
            **_proximal_weights(problem, settings),
            "elbo_lr": settings.elbo_lr or problem.elbo_lr,
            "init_scale": problem.init_scale,
            "score_batch_size": {
                a: settings.score_batch_size or b for a, b in FULL_RANK_BATCH.items()
            },
            "ivon_hess_init": settings.ivon_hess_init,
        },
        "methods": {m.key: {"label": m.label, **asdict(m)} for m in rows},
        "skipped": notes,
        "summary": summary,
        "runs": [_jsonable(r) for r in runs],
    }


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return _finite_or_none(float(x))
    if isinstance(x, np.integer):
        return int(x)
    return x
