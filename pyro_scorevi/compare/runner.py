"""Runs the side-by-side fits under equal budgets and collects every figure.

Budgets. A *gradient evaluation* is one forward/backward pass of the log joint on one particle:
both methods take ``S = num_particles`` of them per step, so the equal-evaluation budget ``G``
is ``ceil(G / S)`` steps each. The equal *wall-time* budget ``T`` is either given or, by default,
the wall time the ELBO baseline needed for ``G`` evaluations (per seed and backend); each fit then
runs until it has reached both ``G`` and ``T``, and its guide is evaluated at each crossing.
Only the steps are timed: evaluations, checkpoints and (for NumPyro) the first, compiling call
are outside the clock.

Order. Per seed and backend the baseline (``SVI`` + ``Trace_ELBO``) runs first, then
``ScoreProximalSVI``, each from the same ``AutoNormal`` initialisation (``init_to_median`` after
seeding) in its own Pyro param-store scope.
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
    "Settings",
    "Budget",
    "run_comparison",
    "neg_elbo",
    "numpyro_available",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Method:
    """One column of the table: a backend and an algorithm."""

    key: str
    label: str
    backend: str  # "pyro" or "numpyro"
    algorithm: str  # "elbo" or "scoreprox"


METHODS: dict[str, Method] = {
    m.key: m
    for m in (
        Method("pyro-elbo", "Pyro SVI+Trace_ELBO", "pyro", "elbo"),
        Method("pyro-scoreprox", "Pyro ScoreProximalSVI", "pyro", "scoreprox"),
        Method("numpyro-elbo", "NumPyro SVI+Trace_ELBO", "numpyro", "elbo"),
        Method("numpyro-scoreprox", "NumPyro ScoreProximalSVI", "numpyro", "scoreprox"),
    )
}


@dataclass(frozen=True)
class Settings:
    """Algorithm settings shared by every problem (``None``: the problem's default).

    Attributes:
        num_particles: ``S``, particles (gradient evaluations) per step, for both methods.
        prox_weight: :math:`\\lambda` of ``ScoreProximalSVI``.
        scale_prox_weight: its ``scale_prox_weight`` :math:`\\lambda_s`.
        elbo_lr: Adam learning rate of the ``Trace_ELBO`` baseline.
        eval_samples: posterior draws behind each predictive figure.
        elbo_particles: particles of the common full-data ``-ELBO`` estimate (``Trace_ELBO`` on
            the Pyro model, the same estimator for every method).
        checkpoints: problem-error evaluations per ``G`` evaluations, for the curves.
    """

    num_particles: int = 2
    prox_weight: float | None = None
    scale_prox_weight: float | None = None
    elbo_lr: float | None = None
    eval_samples: int = 100
    elbo_particles: int = 16
    checkpoints: int = 20


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


# ---------------------------------------------------------------------------------------------
# Fits: a uniform (prepare, step, moments) surface over the four methods
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
                self.model, self.guide, num_particles=s, **_proximal_weights(problem, settings)
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
                model, guide, num_particles=s, **_proximal_weights(problem, settings)
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
    from pyro.infer import Trace_ELBO

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

    # The estimate runs between training steps: it must not disturb the fit's random stream.
    rng_state = pyro.util.get_rng_state()
    try:
        with torch.no_grad(), pyro.get_param_store().scope():
            pyro.set_rng_seed(seed)
            return float(Trace_ELBO(num_particles).loss(model, guide, *args, **kwargs))
    finally:
        pyro.util.set_rng_state(rng_state)


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


def _snapshot(problem, fit, seed, settings, evals, clock, details):
    loc, scale = fit.moments()
    figures = problem.evaluate(loc, scale, settings.eval_samples, seed=seed, details=details)
    plot = figures.pop("_plot", None)
    if "neg_elbo" not in figures:
        figures["neg_elbo"] = neg_elbo(problem, loc, scale, settings.elbo_particles, seed)
    out = {"grad_evals": evals, "wall_s": clock, "metrics": figures}
    if plot is not None:
        out["plot"] = {k: np.asarray(v, dtype=float).tolist() for k, v in plot.items()}
    return out


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

    Returns the guide's figures at both crossings (``equal_evals``, ``equal_time``; the latter is
    the former when ``seconds`` is ``None``), the binned loss curve and the checkpoints.
    """
    import pyro

    s = settings.num_particles
    steps_g = math.ceil(grad_evals / s)
    every = max(1, steps_g // max(1, settings.checkpoints))
    with contextlib.ExitStack() as stack:
        if method.backend == "pyro":
            stack.enter_context(pyro.get_param_store().scope())
            fit: Any = _PyroFit(problem, method, seed, settings)
        else:
            fit = _NumPyroFit(problem, method, seed, settings)
        losses, clocks = [], []
        checkpoints: dict[str, list[float]] = {"grad_evals": [], "wall_s": [], problem.headline: []}

        def checkpoint(evals, clock):
            loc, scale = fit.moments()
            # Fewer draws than the final figures: these only draw the curves.
            value = problem.evaluate(loc, scale, max(8, settings.eval_samples // 4), seed)
            checkpoints["grad_evals"].append(evals)
            checkpoints["wall_s"].append(clock)
            checkpoints[problem.headline].append(_finite_or_none(value[problem.headline]))

        snaps: dict[str, Any] = {}
        evals, clock, step = 0, 0.0, 0
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
            if step % every == 0:
                checkpoint(evals, clock)
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


def run_comparison(
    problem: Problem,
    *,
    seeds: list[int],
    budget: Budget,
    settings: Settings = Settings(),
    backends: tuple[str, ...] = ("pyro",),
    progress: bool = True,
) -> dict[str, Any]:
    """Fits every method of ``backends`` on ``problem`` for each seed under ``budget``.

    Returns a JSON-ready dict: the configuration, each run's figures at equal gradient
    evaluations and at equal wall time with its curves, and per method the mean and sd over
    seeds of every figure (``summary[method][budget][metric]``).
    """
    from tqdm.auto import tqdm

    methods = [m for m in METHODS.values() if m.backend in backends]
    steps_per_fit = math.ceil(budget.grad_evals / settings.num_particles)
    bar = tqdm(
        total=steps_per_fit * settings.num_particles * len(methods) * len(seeds),
        desc=problem.name,
        unit="eval",
        disable=not progress,
        leave=True,
        dynamic_ncols=True,
    )
    runs = []
    try:
        for seed in seeds:
            for backend in backends:
                seconds = budget.seconds
                for method in (m for m in methods if m.backend == backend):
                    bar.set_postfix_str(f"seed {seed} {method.key}")
                    # The bar counts the equal-evaluation part of each fit; a fit that goes on
                    # to the time budget leaves it still until it is done.
                    left = [steps_per_fit * settings.num_particles]

                    def on_step(n, left=left):
                        if left[0] >= n:
                            left[0] -= n
                            bar.update(n)

                    run = fit_once(
                        problem,
                        method,
                        seed,
                        settings,
                        budget.grad_evals,
                        seconds,
                        on_step=on_step,
                    )
                    if seconds is None:  # the baseline ran first: its time is the budget
                        seconds = run["equal_evals"]["wall_s"]
                    runs.append({"seed": seed, "method": method.key, **run})
    finally:
        bar.close()
    summary: dict[str, Any] = {}
    for method in methods:
        mine = [r for r in runs if r["method"] == method.key]
        summary[method.key] = {}
        for which in ("equal_evals", "equal_time"):
            names = list(mine[0][which]["metrics"])
            block = {n: _summary([r[which]["metrics"][n] for r in mine]) for n in names}
            block["grad_evals"] = _summary([r[which]["grad_evals"] for r in mine])
            block["wall_s"] = _summary([r[which]["wall_s"] for r in mine])
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
        },
        "methods": {m.key: {"label": m.label, **asdict(m)} for m in methods},
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
