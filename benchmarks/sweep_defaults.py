"""The sweep behind the default hyper-parameters (``pyro_scorevi/defaults.py``).

Grid over the proximal weight (constant, or growing as ``PolynomialGrowth``) and the number of
particles S (antithetic pairs for even S), at a fixed budget of gradient evaluations, on

* ``mlp``: the Bayesian MLP 64-64-64-10 on sklearn digits, batch 64 (test NLL, accuracy, ECE);
* ``linreg``: Bayesian linear regression, N = 2000, d = 5, batch 32 (N/B = 62), against the exact
  posterior (mean error in posterior sds; variance ratio against the mean-field optimum
  1/Lambda_jj);
* ``gauss``: a dense 20-d Gaussian target with exact scores (distance to the mean-field optimum).

Prints a markdown table per problem. Run:
``python benchmarks/sweep_defaults.py --budget 4000 > docs/algorithm_sweeps_raw.md``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
from pyro.infer.autoguide import AutoNormal

sys.path.insert(0, str(Path(__file__).parent))
from bench_pyro_mlp import BayesianMLP, evaluate, load_data  # noqa: E402

from pyro_scorevi import PolynomialGrowth, ScoreProximalSVI  # noqa: E402

WEIGHTS = {
    "30": 30.0,
    "100": 100.0,
    "300": 300.0,
    "PolynomialGrowth(30, 100)": PolynomialGrowth(30.0, 100, 1.0),
    "PolynomialGrowth(100, 1000)": PolynomialGrowth(100.0, 1000, 1.0),
}
PARTICLES = (1, 2, 4)


def _fit(make_model, args, *, init_scale, weight, particles, budget, seed, alternations):
    """Seeds, builds the model (``make_model()``) and its AutoNormal guide, and spends ``budget``
    gradient evaluations of ScoreProximalSVI on it. Returns ``(model, guide)``."""
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    model = make_model()
    guide = AutoNormal(model, init_scale=init_scale)
    svi = ScoreProximalSVI(
        model,
        guide,
        num_particles=particles,
        prox_weight=weight,
        num_alternations=alternations,
    )
    for _ in range(budget // particles):
        svi.step(*args)
    return model, guide


def run_mlp(weight, particles, budget, seed, data, alternations=2):
    x_tr, y_tr, x_te, y_te = data
    model, guide = _fit(
        lambda: BayesianMLP(64, 64),
        (x_tr, y_tr),
        init_scale=0.05,
        weight=weight,
        particles=particles,
        budget=budget,
        seed=seed,
        alternations=alternations,
    )
    m = evaluate(model, guide, x_te, y_te)
    return {"NLL": m["nll"], "acc": m["accuracy"], "ECE": m["ece"]}


def linreg_problem(seed=0, n=2000, d=5, noise=1.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    x[:, 1] += 0.8 * x[:, 0]  # correlated features: a correlated posterior
    w_true = torch.randn(d, generator=g, dtype=torch.float64)
    y = x @ w_true + noise * torch.randn(n, generator=g, dtype=torch.float64)
    precision = torch.eye(d, dtype=torch.float64) + x.T @ x / noise**2  # N(0, 1) prior
    mean = torch.linalg.solve(precision, x.T @ y / noise**2)
    return x, y, mean, precision


def run_linreg(weight, particles, budget, seed, data, alternations=2, batch=32):
    x, y, mean, precision = data

    def model(x, y):
        w = pyro.sample("w", dist.Normal(torch.zeros(5, dtype=x.dtype), 1.0).to_event(1))
        with pyro.plate("data", x.shape[0], subsample_size=batch) as idx:
            pyro.sample("y", dist.Normal(x[idx] @ w, 1.0), obs=y[idx])

    _, guide = _fit(
        lambda: model,
        (x, y),
        init_scale=0.01,
        weight=weight,
        particles=particles,
        budget=budget,
        seed=seed,
        alternations=alternations,
    )
    loc, scale = guide._get_loc_and_scale("w")
    post_sd = precision.inverse().diagonal().sqrt()
    mf_var = 1 / precision.diagonal()
    return {
        "mean err (sd)": float(((loc.detach() - mean).abs() / post_sd).max()),
        "var ratio": float((scale.detach() ** 2 / mf_var).mean()),
    }


def run_gauss(weight, particles, budget, seed, data, alternations=2):
    mu, precision = data
    d = mu.shape[0]

    def model():
        pyro.sample("x", dist.MultivariateNormal(mu, precision_matrix=precision))

    _, guide = _fit(
        lambda: model,
        (),
        init_scale=1.0,
        weight=weight,
        particles=particles,
        budget=budget,
        seed=seed,
        alternations=alternations,
    )
    loc, scale = guide._get_loc_and_scale("x")
    mf_sd = precision.diagonal().rsqrt()
    return {
        "mean err (sd)": float(((loc.detach() - mu).abs() / mf_sd).max()),
        "var ratio": float((scale.detach() ** 2 / mf_sd**2).mean()),
        "d": d,
    }


def gauss_problem(seed=0, d=20):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    precision = a @ a.T / d + torch.eye(d, dtype=torch.float64)
    mu = torch.randn(d, generator=g, dtype=torch.float64)
    return mu, precision


PROBLEMS = {
    "mlp": (run_mlp, load_data),
    "linreg": (run_linreg, linreg_problem),
    "gauss": (run_gauss, gauss_problem),
}


def main(argv=None):
    parser = argparse.ArgumentParser(description="Sweep prox_weight x num_particles.")
    parser.add_argument("--problems", nargs="+", default=list(PROBLEMS), choices=list(PROBLEMS))
    parser.add_argument("--budget", type=int, default=4000, help="gradient evaluations per run")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--alternations", type=int, nargs="+", default=[2])
    parser.add_argument("--weights", nargs="+", default=list(WEIGHTS), choices=list(WEIGHTS))
    parser.add_argument("--particles", type=int, nargs="+", default=list(PARTICLES))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    for name in args.problems:
        run, make = PROBLEMS[name]
        data = make()
        print(f"\n### {name}: budget {args.budget} gradient evaluations, {args.seeds} seeds\n")
        header_done = False
        grid = [(a, w, s) for a in args.alternations for w in args.weights for s in args.particles]
        for alternations, wname, s in grid:
            start = time.perf_counter()
            results = [
                run(WEIGHTS[wname], s, args.budget, seed, data, alternations)
                for seed in range(args.seeds)
            ]
            keys = [k for k in results[0] if k != "d"]
            if not header_done:
                print("| alternations | prox_weight | S | " + " | ".join(keys) + " | s/run |")
                print("|---|---|---|" + "---|" * len(keys) + "---|")
                header_done = True
            means = [sum(r[k] for r in results) / len(results) for k in keys]
            secs = (time.perf_counter() - start) / args.seeds
            cells = " | ".join(f"{m:.3f}" for m in means)
            print(f"| {alternations} | {wname} | {s} | {cells} | {secs:.1f} |", flush=True)


if __name__ == "__main__":
    main()
