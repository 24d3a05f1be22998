"""One comparison problem, one method, figures at several budgets (NumPyro backend, jitted).

A quick instrument for step-rule work: fits ``--problem`` (any name of ``pyro-scorevi list``)
with ``numpyro.infer.SVI`` + ``Trace_ELBO`` + Adam (``--method elbo``, the comparison's
learning rate) or with :class:`pyro_scorevi.numpyro.ScoreProximalSVI` under
``AdaptiveStep(**json.loads(--rule))`` (``--method scoreprox``), S = 2 particles, the
comparison's guide and initialisation, and prints the problem's figures and the full-data
-ELBO (the comparison's common estimator) at each step count of ``--checkpoints``, per seed.

Example (the table "Can one fit meet every digits-mlp target?" on docs/algorithm_sweeps.md)::

    python benchmarks/probe_fit.py --problem digits-mlp --method elbo \\
        --checkpoints 1500,5000,15000 --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import functools
import json
import time

import numpy as np


def make_svi(problem_name: str, method: str, rule: dict):
    """``(problem, model, svi)``: the comparison's NumPyro model (data bound), ``AutoNormal``
    guide and initialisation, with ``Trace_ELBO`` + Adam (``method="elbo"``) or
    ``ScoreProximalSVI`` under ``AdaptiveStep(**rule)``, S = 2."""
    import numpyro
    from numpyro.infer import SVI, Trace_ELBO
    from numpyro.infer.autoguide import AutoNormal
    from numpyro.infer.initialization import init_to_median

    from pyro_scorevi import AdaptiveStep
    from pyro_scorevi.compare.problems import get_problem
    from pyro_scorevi.numpyro import ScoreProximalSVI

    problem = get_problem(problem_name)
    model, args, kwargs = problem.numpyro_model_and_args()
    model = functools.partial(model, *args, **kwargs)
    guide = AutoNormal(model, init_loc_fn=init_to_median, init_scale=problem.init_scale)
    if method == "elbo":
        optim = numpyro.optim.Adam(problem.elbo_lr)
        svi = SVI(model, guide, optim, Trace_ELBO(num_particles=2))
    else:
        svi = ScoreProximalSVI(model, guide, num_particles=2, step_rule=AdaptiveStep(**rule))
    return problem, model, svi


def guide_moments(problem, svi, state) -> tuple[dict, dict]:
    """The ``AutoNormal`` guide's unconstrained ``(loc, scale)`` per latent, as numpy."""
    params = svi.get_params(state)
    names = problem.latent_names()
    loc = {n: np.asarray(params[f"{n}_auto_loc"], float) for n in names}
    scale = {n: np.asarray(params[f"{n}_auto_scale"], float) for n in names}
    return loc, scale


def probe(problem_name: str, method: str, rule: dict, checkpoints: list[int], seed: int):
    """Yields ``(steps, figures)`` at each checkpoint of one fit."""
    import jax

    from pyro_scorevi.compare.runner import neg_elbo

    problem, _, svi = make_svi(problem_name, method, rule)
    state = svi.init(jax.random.PRNGKey(seed))
    update = jax.jit(svi.update)
    steps = 0
    for target in checkpoints:
        while steps < target:
            state, _ = update(state)
            steps += 1
        loc, scale = guide_moments(problem, svi, state)
        evaluated = problem.evaluate(loc, scale, seed=seed)
        figures = {k: float(v) for k, v in evaluated.items() if np.isscalar(v)}
        figures["full_data_neg_elbo"] = neg_elbo(problem, loc, scale, seed=seed)
        all_scales = np.concatenate([v.ravel() for v in scale.values()])
        figures["median_scale"] = float(np.median(all_scales))
        yield steps, figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problem", default="digits-mlp")
    parser.add_argument("--method", choices=("elbo", "scoreprox"), default="scoreprox")
    parser.add_argument("--rule", default="{}", help="AdaptiveStep keyword arguments, as JSON")
    parser.add_argument("--checkpoints", default="1500", help="step counts, comma-separated")
    parser.add_argument("--seeds", default="0")
    args = parser.parse_args(argv)
    rule = json.loads(args.rule)
    checkpoints = sorted(int(c) for c in args.checkpoints.split(","))
    for seed in (int(s) for s in args.seeds.split(",")):
        t0 = time.perf_counter()
        for steps, figures in probe(args.problem, args.method, rule, checkpoints, seed):
            shown = " ".join(f"{k}={v:.4g}" for k, v in figures.items())
            elapsed = time.perf_counter() - t0
            print(f"{args.method} {rule} seed {seed} step {steps}: {shown} ({elapsed:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
