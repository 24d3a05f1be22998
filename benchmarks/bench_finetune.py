"""Bayesian fine-tuning of a pretrained network: ``ScoreProximalSVI`` against ``Trace_ELBO``.

The user's case: a network already trained (here: the MAP of the comparison's model, the prior
as weight decay, ``AutoDelta`` + Adam(0.01) for ``--pretrain-steps`` mini-batch steps), then
made Bayesian by an ``AutoNormal`` guide started at the pretrained weights
(``init_loc_fn=init_to_value``) with a small ``init_scale``, and fitted by

* ``ScoreProximalSVI(model, guide)``, nothing else set;
* ``SVI`` + ``Trace_ELBO`` + Adam at lr 1e-3 (the usual fine-tuning rate) and 1e-2,

at equal gradient evaluations (``num_particles`` = 2 for all), Pyro backend, on the comparison's
``digits-mlp`` (test NLL, accuracy, ECE) and ``sunspots`` (CRPS, 90% coverage) problems.
Each row is the mean over ``--seeds`` (the pretraining and the fine-tuning share the seed);
``-ELBO`` is the comparison's full-data estimator (``pyro_scorevi.compare.runner.neg_elbo``).
A row also gives the median guide sd and the steps ``ScoreProximalSVI`` rejected.

Run: ``python benchmarks/bench_finetune.py [--problems digits-mlp,sunspots] [--seeds 0,1,2]
[--evals 1000,3000] [--init-scales 1e-3,1e-6]``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pyro
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoDelta, AutoNormal
from pyro.infer.autoguide.initialization import init_to_median, init_to_value

from pyro_scorevi import ScoreProximalSVI
from pyro_scorevi.compare.problems import get_problem
from pyro_scorevi.compare.runner import neg_elbo

PARTICLES = 2
METRICS = {"digits-mlp": ("nll", "accuracy", "ece"), "sunspots": ("crps", "coverage90", "mse")}


def pretrain(problem, seed: int, steps: int) -> dict[str, torch.Tensor]:
    """MAP weights (constrained values) by ``AutoDelta`` + Adam(0.01) on mini-batches."""
    model, args, kwargs = problem.pyro_model_and_args()
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    guide = AutoDelta(model, init_loc_fn=init_to_median)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), Trace_ELBO())
    for _ in range(steps):
        svi.step(*args, **kwargs)
    with torch.no_grad():
        return {k: v.detach().clone() for k, v in guide.median(*args, **kwargs).items()}


def moments(problem, guide) -> tuple[dict, dict]:
    loc, scale = {}, {}
    with torch.no_grad():
        for name in problem.latent_names():
            m, s = guide._get_loc_and_scale(name)
            loc[name], scale[name] = m.double().numpy().copy(), s.double().numpy().copy()
    return loc, scale


def figures(problem, loc, scale, seed, elbo=True) -> dict[str, float]:
    out = {k: float(v) for k, v in problem.evaluate(loc, scale, seed=seed).items()}
    if elbo:  # undefined for the MAP (a point mass)
        out["-ELBO"] = float(neg_elbo(problem, loc, scale, seed=seed))
    out["median sd"] = float(np.median(np.concatenate([np.ravel(s) for s in scale.values()])))
    return out


def finetune(problem, method, init_scale, map_values, seed, checkpoints):
    """Figures at each budget in ``checkpoints`` (gradient evaluations) of one fine-tuning run."""
    model, args, kwargs = problem.pyro_model_and_args()
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    # Clones: AutoNormal's locs share storage with init_to_value's tensors (Pyro's behaviour,
    # under SVI too), so a fit would otherwise move the next fit's start.
    start = {k: v.clone() for k, v in map_values.items()}
    guide = AutoNormal(model, init_loc_fn=init_to_value(values=start), init_scale=init_scale)
    guide(*args, **kwargs)
    if method == "ScoreProximalSVI":
        svi = ScoreProximalSVI(model, guide, num_particles=PARTICLES)
    else:
        lr = float(method.split("lr=")[1].rstrip(")"))
        svi = SVI(model, guide, pyro.optim.Adam({"lr": lr}), Trace_ELBO(PARTICLES))
    rows, done, seconds = {}, 0, 0.0
    for evals in checkpoints:
        t0 = time.perf_counter()
        while done < evals:
            svi.step(*args, **kwargs)
            done += PARTICLES
        seconds += time.perf_counter() - t0
        loc, scale = moments(problem, guide)
        rows[evals] = figures(problem, loc, scale, seed)
        rows[evals]["rejected"] = float(getattr(svi, "num_rejected_steps", 0))
        rows[evals]["wall s"] = seconds
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--problems", default="digits-mlp,sunspots")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--evals", default="1000,3000", help="budgets, gradient evaluations")
    ap.add_argument("--init-scales", default="1e-3,1e-6")
    ap.add_argument("--pretrain-steps", type=int, default=3000)
    a = ap.parse_args()
    seeds = [int(s) for s in a.seeds.split(",")]
    checkpoints = sorted(int(e) for e in a.evals.split(","))
    init_scales = [float(s) for s in a.init_scales.split(",")]
    methods = ("ScoreProximalSVI", "Trace_ELBO (lr=1e-3)", "Trace_ELBO (lr=1e-2)")
    torch.set_num_threads(1)
    for name in a.problems.split(","):
        problem = get_problem(name)
        cols = (*METRICS[name], "-ELBO", "median sd", "rejected", "wall s")
        results: dict[tuple, list] = {}
        for seed in seeds:
            map_values = pretrain(problem, seed, a.pretrain_steps)
            spec, _, _ = problem.load()
            positive = {s.name for s in spec.latents if s.positive}
            loc = {
                k: (v.log() if k in positive else v).double().numpy() for k, v in map_values.items()
            }
            zero = {k: np.zeros_like(v) for k, v in loc.items()}
            fig = figures(problem, loc, zero, seed, elbo=False)
            results.setdefault(("pretrained MAP", "-", a.pretrain_steps), []).append(fig)
            for init_scale in init_scales:
                for method in methods:
                    runs = finetune(problem, method, init_scale, map_values, seed, checkpoints)
                    for evals, row in runs.items():
                        results.setdefault((method, init_scale, evals), []).append(row)
                    print(
                        f"  {name} seed {seed} {method} init_scale {init_scale}: done", flush=True
                    )
        print(f"\n### {name}: fine-tuning from the MAP, mean over seeds {seeds}\n")
        head = METRICS[name][0]
        print(
            "| method | init_scale | grad evals | "
            + " | ".join(cols)
            + f" | {head}, per seed | median sd, per seed |"
        )
        print("|---|---|---:|" + "---:|" * len(cols) + "---|---|")
        for (method, init_scale, evals), rows in results.items():
            vals = [np.mean([r.get(c, np.nan) for r in rows]) for c in cols]
            cells = " | ".join(f"{v:.4g}" if np.isfinite(v) else "-" for v in vals)
            per_seed = [", ".join(f"{r[c]:.3g}" for r in rows) for c in (head, "median sd")]
            print(f"| {method} | {init_scale} | {evals} | {cells} | {' | '.join(per_seed)} |")


if __name__ == "__main__":
    main()
