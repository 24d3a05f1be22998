"""A step rule on a comparison network, NumPyro, from its own or from the Pyro fits' starts.

For each seed: the comparison's NumPyro guide (``AutoNormal``, ``init_to_median``, the
problem's ``init_scale``), optionally given the initial means of the Pyro guide of the same
seed (``--starts pyro``; the comparison's Pyro fits start there, see
``benchmarks/experiments/vit_init_swap.py``), ``--steps`` steps of ``ScoreProximalSVI`` (S = 2)
under ``AdaptiveStep(**json.loads(--rule))`` in one ``lax.scan``, then the problem's figures
(the comparison's estimator, 100 draws). Prints the mean and the per-seed values.

    OMP_NUM_THREADS=1 python benchmarks/experiments/network_start_sweep.py --problem digits-vit \\
        --rule '{"max_variance_ratio": 10}' --seeds 0,1,2,3,4,5 --starts pyro

The table "M again, over twelve ViT starts" of ``docs/algorithm_sweeps.md``.
"""

from __future__ import annotations

import argparse
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np


def pyro_starts(problem, seeds: list[int]) -> dict[int, dict[str, np.ndarray]]:
    """The initial means of the comparison's Pyro guide, per seed."""
    import pyro
    import torch

    from pyro_scorevi.compare.runner import Settings, _PyroFit, select_methods

    torch.set_num_threads(1)
    settings = Settings()
    (method,), _ = select_methods(problem, ["scoreprox"], ("pyro",), settings)
    starts = {}
    for seed in seeds:
        with pyro.get_param_store().scope():
            starts[seed] = _PyroFit(problem, method, seed, settings).moments()[0]
    return starts


def with_initial_means(state, locs: dict):
    """A NumPyro ``ScoreProximalState`` whose ``AutoNormal`` means are ``locs`` (name to array),
    the adaptive rule's backup copy of them included (unused before a first step)."""
    params = dict(state.params)
    for name, value in locs.items():
        key = f"{name}_auto_loc"
        params[key] = jnp.asarray(value, params[key].dtype).reshape(params[key].shape)
    state = state._replace(params=params)
    if state.rule != ():
        backup = {k: params[f"{k}_auto_loc"] for k in state.rule.backup_locs}
        state = state._replace(rule=state.rule._replace(backup_locs=backup))
    return state


def fit(problem, model, rule: dict, seed: int, steps: int, start: dict | None) -> dict:
    from numpyro.infer.autoguide import AutoNormal
    from numpyro.infer.initialization import init_to_median

    from pyro_scorevi import AdaptiveStep
    from pyro_scorevi.numpyro import ScoreProximalSVI

    guide = AutoNormal(model, init_loc_fn=init_to_median, init_scale=problem.init_scale)
    svi = ScoreProximalSVI(model, guide, num_particles=2, step_rule=AdaptiveStep(**rule))
    state = svi.init(jax.random.PRNGKey(seed))
    if start is not None:
        state = with_initial_means(state, start)
    run = jax.jit(lambda s: jax.lax.scan(lambda c, _: svi.update(c), s, None, length=steps))
    state, _ = run(state)
    params = svi.get_params(state)
    names = problem.latent_names()
    loc = {n: np.asarray(params[f"{n}_auto_loc"], float) for n in names}
    scale = {n: np.asarray(params[f"{n}_auto_scale"], float) for n in names}
    return problem.evaluate(loc, scale, 100, seed=seed, details=False)


def main() -> None:
    from pyro_scorevi.compare.problems import get_problem

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problem", default="digits-vit")
    parser.add_argument("--rule", default="{}", help="AdaptiveStep keyword arguments, JSON")
    parser.add_argument("--seeds", default="0,1,2,3,4,5")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--starts", choices=("own", "pyro"), default="own")
    args = parser.parse_args()
    problem = get_problem(args.problem)
    seeds = [int(s) for s in args.seeds.split(",")]
    starts = pyro_starts(problem, seeds) if args.starts == "pyro" else {}
    model, margs, kwargs = problem.numpyro_model_and_args()
    model = functools.partial(model, *margs, **kwargs)
    rule = json.loads(args.rule)
    rows = [fit(problem, model, rule, s, args.steps, starts.get(s)) for s in seeds]
    keys = [k for k in ("nll", "accuracy", "ece", "crps") if k in rows[0]]
    text = " ".join(
        f"{k} {np.mean([r[k] for r in rows]):.3f} [{', '.join(f'{r[k]:.2f}' for r in rows)}]"
        for k in keys
    )
    print(f"{args.problem}, {args.starts} starts, rule {json.dumps(rule)}: {text}")


if __name__ == "__main__":
    main()
