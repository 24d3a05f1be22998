"""digits-vit: the Pyro and NumPyro ``ScoreProximalSVI`` fits from each other's starts.

The comparison's Pyro fits of the digits ViT trail the NumPyro ones (``docs/results.md``); the
two backends run the same step rule (``tests/test_adaptive.py``) but start from different
``init_to_median`` draws. This probe separates the two causes: for each seed it builds both
fits exactly as ``pyro-scorevi compare`` does (``AutoNormal``, ``init_to_median``,
``init_scale`` 0.01, S = 2, library defaults), gives the Pyro guide the NumPyro guide's initial
means and the NumPyro guide the Pyro guide's (unless ``--no-swap``), fits ``--steps`` steps
and prints the test NLL and accuracy (the comparison's estimator, 100 draws). Other rules and
the other networks, NumPyro only: ``network_start_sweep.py`` beside this file.

    OMP_NUM_THREADS=1 python benchmarks/experiments/vit_init_swap.py --seeds 0,1,2,3,4,5

``--rule JSON`` fits both backends under ``AdaptiveStep(**json.loads(JSON))`` (the
comparison's ``Settings.step_rule``).
"""

from __future__ import annotations

import argparse
import json
import time

import pyro
import torch
from network_start_sweep import with_initial_means

from pyro_scorevi.compare.problems import get_problem
from pyro_scorevi.compare.runner import Settings, _NumPyroFit, _PyroFit, select_methods


def fit_figures(problem, fit, steps: int, seed: int) -> tuple[dict, float]:
    start = time.perf_counter()
    for _ in range(steps):
        fit.step()
    loc, scale = fit.moments()
    figures = problem.evaluate(loc, scale, 100, seed=seed, details=False)
    return figures, time.perf_counter() - start


def swap_starts(pyro_fit: _PyroFit, numpyro_fit: _NumPyroFit) -> None:
    """Gives each fit the other's initial ``AutoNormal`` means (the scales are equal)."""
    pyro_loc, _ = pyro_fit.moments()
    numpyro_loc, _ = numpyro_fit.moments()
    store = pyro.get_param_store()
    with torch.no_grad():
        for name, value in numpyro_loc.items():
            param = store.get_param(f"AutoNormal.locs.{name}")
            param.copy_(torch.as_tensor(value, dtype=param.dtype).reshape(param.shape))
    numpyro_fit.state = with_initial_means(numpyro_fit.state, pyro_loc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument(
        "--no-swap", action="store_true", help="each from its own start (the comparison's fits)"
    )
    parser.add_argument("--rule", help="AdaptiveStep keyword arguments, JSON")
    args = parser.parse_args()
    torch.set_num_threads(1)
    problem = get_problem("digits-vit")
    settings = Settings(step_rule=json.loads(args.rule) if args.rule else None)
    methods, _ = select_methods(problem, ["scoreprox"], ("pyro", "numpyro"), settings)
    by_backend = {m.backend: m for m in methods}
    start = "its own start" if args.no_swap else "the other backend's start"
    for seed in (int(s) for s in args.seeds.split(",")):
        with pyro.get_param_store().scope():
            pyro_fit = _PyroFit(problem, by_backend["pyro"], seed, settings)
            numpyro_fit = _NumPyroFit(problem, by_backend["numpyro"], seed, settings)
            if not args.no_swap:
                swap_starts(pyro_fit, numpyro_fit)
            p, tp = fit_figures(problem, pyro_fit, args.steps, seed)
            n, tn = fit_figures(problem, numpyro_fit, args.steps, seed)
        print(
            f"seed {seed}, each from {start}: Pyro: NLL {p['nll']:.3f}, accuracy "
            f"{p['accuracy']:.3f} ({tp:.0f} s) | NumPyro: NLL {n['nll']:.3f}, "
            f"accuracy {n['accuracy']:.3f} ({tn:.0f} s)",
            flush=True,
        )


if __name__ == "__main__":
    main()
