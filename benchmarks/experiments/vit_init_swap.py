"""Pyro and NumPyro ``ScoreProximalSVI`` fits of a comparison network from each other's starts.

The comparison's Pyro fits of the digits ViT trail the NumPyro ones (``docs/results.md``); the
two backends run the same step rule (``tests/test_adaptive.py``) but start from different
``init_to_median`` draws. This probe separates the two causes: for each seed it builds both
fits exactly as ``pyro-scorevi compare`` does (``AutoNormal``, ``init_to_median``, the
problem's ``init_scale``, S = 2), gives the Pyro guide the NumPyro guide's initial means and the
NumPyro guide the Pyro guide's (unless ``--no-swap``), fits ``--steps`` steps under
``AdaptiveStep(**json.loads(--rule))`` (the defaults for ``{}``) and prints the problem's
figures (the comparison's estimator, 100 draws). ``--backends numpyro`` fits only the NumPyro
guide (from the Pyro start of the same seed, or its own with ``--no-swap``).

    OMP_NUM_THREADS=1 python benchmarks/experiments/vit_init_swap.py --seeds 0,1,2,3,4,5
    OMP_NUM_THREADS=1 python benchmarks/experiments/vit_init_swap.py --backends numpyro \\
        --rule '{"max_variance_ratio": 10}' --seeds 0,1,2,3,4,5 [--no-swap]
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import pyro
import torch

from pyro_scorevi import AdaptiveStep
from pyro_scorevi import ScoreProximalSVI as PyroScoreProximalSVI
from pyro_scorevi.compare.problems import get_problem
from pyro_scorevi.compare.runner import Settings, _NumPyroFit, _PyroFit, select_methods
from pyro_scorevi.numpyro import ScoreProximalSVI as NumPyroScoreProximalSVI


def fit_figures(problem, fit, steps: int, seed: int) -> tuple[dict, float]:
    start = time.perf_counter()
    for _ in range(steps):
        fit.step()
    loc, scale = fit.moments()
    figures = problem.evaluate(loc, scale, 100, seed=seed, details=False)
    return figures, time.perf_counter() - start


def use_rule(pyro_fit: _PyroFit, numpyro_fit: _NumPyroFit, rule: AdaptiveStep, seed: int):
    """Rebuilds both fits' ``ScoreProximalSVI`` under ``rule`` (same guides, same starts)."""
    pyro_fit.svi = PyroScoreProximalSVI(
        pyro_fit.model, pyro_fit.guide, num_particles=2, step_rule=rule
    )
    old = numpyro_fit.svi
    svi = NumPyroScoreProximalSVI(old.model, old.guide, num_particles=2, step_rule=rule)
    numpyro_fit.svi = svi
    numpyro_fit.state = svi.init(jax.random.PRNGKey(seed))
    numpyro_fit._update = jax.jit(svi.update)


def swap_starts(pyro_fit: _PyroFit, numpyro_fit: _NumPyroFit) -> None:
    """Gives each fit the other's initial ``AutoNormal`` means (the scales are equal)."""
    pyro_loc, _ = pyro_fit.moments()
    numpyro_loc, _ = numpyro_fit.moments()
    store = pyro.get_param_store()
    with torch.no_grad():
        for name, value in numpyro_loc.items():
            param = store.get_param(f"AutoNormal.locs.{name}")
            param.copy_(torch.as_tensor(value, dtype=param.dtype).reshape(param.shape))
    params = dict(numpyro_fit.state.params)
    for name, value in pyro_loc.items():
        key = f"{name}_auto_loc"
        params[key] = jnp.asarray(value, params[key].dtype).reshape(params[key].shape)
    state = numpyro_fit.state._replace(params=params)
    if state.rule != ():  # the rule's backup copy of the means (unused before a first step)
        backup = {k: params[f"{k}_auto_loc"] for k in state.rule.backup_locs}
        state = state._replace(rule=state.rule._replace(backup_locs=backup))
    numpyro_fit.state = state


def _figures_text(figures: dict) -> str:
    keys = [k for k in ("nll", "accuracy", "ece", "crps") if k in figures]
    return ", ".join(f"{k} {figures[k]:.3f}" for k in keys)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problem", default="digits-vit")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--rule", default="{}", help="AdaptiveStep keyword arguments, JSON")
    parser.add_argument("--backends", default="pyro,numpyro", help="the fits to run")
    parser.add_argument(
        "--no-swap", action="store_true", help="each from its own start (the comparison's fits)"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    problem, settings = get_problem(args.problem), Settings()
    rule = AdaptiveStep(**json.loads(args.rule))
    backends = args.backends.split(",")
    methods, _ = select_methods(problem, ["scoreprox"], ("pyro", "numpyro"), settings)
    by_backend = {m.backend: m for m in methods}
    start = "its own start" if args.no_swap else "the other backend's start"
    for seed in (int(s) for s in args.seeds.split(",")):
        with pyro.get_param_store().scope():
            fits = {
                "pyro": _PyroFit(problem, by_backend["pyro"], seed, settings),
                "numpyro": _NumPyroFit(problem, by_backend["numpyro"], seed, settings),
            }
            use_rule(fits["pyro"], fits["numpyro"], rule, seed)
            if not args.no_swap:
                swap_starts(fits["pyro"], fits["numpyro"])
            parts = []
            for backend in backends:
                figures, seconds = fit_figures(problem, fits[backend], args.steps, seed)
                parts.append(f"{backend}: {_figures_text(figures)} ({seconds:.0f} s)")
        print(f"{args.problem} seed {seed}, from {start}: " + " | ".join(parts), flush=True)


if __name__ == "__main__":
    main()
