"""The sweep behind the constants of :class:`pyro_scorevi.AdaptiveStep`.

Its table is on ``docs/algorithm_sweeps.md``.

Each configuration changes one or two constants of the default rule and is measured on

* the 14 posteriors of ``benchmarks/posterior_suite.py`` (NumPyro backend, jitted, so the
  whole set takes seconds): the median and worst mean error in reference sds and the median sd
  ratio against the NUTS reference, the number of reverted/rejected steps;
* the digits MLP and the digits ViT of ``pyro-scorevi compare`` (Pyro backend): test NLL, ECE,
  accuracy and the full-data -ELBO.

Every fit spends the same budget of gradient evaluations (``--evals``, S = 2 per step). Run:
``python benchmarks/sweep_adaptive.py --evals 3000 --seed 0 > sweep.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

#: One-at-a-time changes from the default rule (the first row is the default).
CONFIGS: dict[str, dict] = {
    "default": {},
    "dense_max_dim=0 (before)": {"dense_max_dim": 0},
    "max_variance_ratio=1 (before)": {"max_variance_ratio": 1.0},
    "max_variance_ratio=10": {"max_variance_ratio": 10.0},
    "variance_ratio_memory=1 (before)": {"variance_ratio_memory": 1.0},
    "mean_rate_floor=0": {"mean_rate_floor": 0.0},
    "mean_rate_floor=0.003": {"mean_rate_floor": 0.003},
    "mean_rate_floor=0.03": {"mean_rate_floor": 0.03},
    "scale_to_mean_rate=1": {"scale_to_mean_rate": 1.0},
    "scale_to_mean_rate=0.25": {"scale_to_mean_rate": 0.25},
    "max_mean_rate=1": {"max_mean_rate": 1.0},
    "min_mean_radius=0.01": {"min_mean_radius": 0.01, "initial_mean_radius": 1.0},
    "settled_scale_rate=0 (before)": {"settled_scale_rate": 0.0},
    "settled_band=inf": {"settled_band": float("inf")},
    "progress_bound=inf (before)": {"progress_bound": float("inf")},
    "dense_restart=False (before)": {"dense_restart": False},
    "previous release": {
        "settled_scale_rate": 0.0,
        "progress_bound": float("inf"),
        "dense_restart": False,
    },
    "num_alternations=2": {"num_alternations": 2},
    "initial_memory=3": {"initial_memory": 3.0},
}


def posterior_figures(rule_kwargs: dict, evals: int, seed: int) -> dict:
    """Median/worst mean error, median sd ratio, median |log(sd / mean-field sd)| and
    rejections over the posterior suite."""
    import jax
    import posterior_suite as suite
    from numpyro.infer.autoguide import AutoNormal

    from pyro_scorevi import AdaptiveStep
    from pyro_scorevi.compare.posteriors import POSTERIORS
    from pyro_scorevi.numpyro import ScoreProximalSVI

    errors, ratios, field_errors, rejected = [], [], [], 0
    for posterior in POSTERIORS.values():
        model, args, kwargs = posterior.numpyro_model_and_args()
        guide = AutoNormal(model)
        svi = ScoreProximalSVI(model, guide, step_rule=AdaptiveStep(**rule_kwargs))
        result = svi.run(jax.random.PRNGKey(seed), evals // 2, *args, progress_bar=False, **kwargs)
        sites = [n for n, _ in suite._site_list(posterior)]
        loc = {n: np.asarray(result.params[f"{n}_auto_loc"], float) for n in sites}
        scale = {n: np.asarray(result.params[f"{n}_auto_scale"], float) for n in sites}
        steps = evals // 2
        fit = suite.FitResult(
            loc, scale, None, steps, result.num_rejected_steps, np.zeros(steps, bool), 0.0
        )
        scored = suite.score_fit(posterior, fit)
        errors.append(scored["mean_err"])
        ratios.append(scored["sd_ratio"])
        if np.isfinite(scored["meanfield_sd_ratio"]):
            field_errors.append(abs(np.log(scored["meanfield_sd_ratio"])))
        rejected += result.num_rejected_steps
    return {
        "median_err": float(np.median(errors)),
        "worst_err": float(np.max(errors)),
        "median_sd_ratio": float(np.median(ratios)),
        "median_meanfield_log_err": float(np.median(field_errors)),
        "rejected": rejected,
    }


def network_figures(problem_name: str, rule_kwargs: dict, evals: int, seed: int) -> dict:
    """Test figures and full-data -ELBO of the Pyro ScoreProximalSVI fit of a network."""
    import pyro
    import torch
    from pyro.infer.autoguide import AutoNormal
    from pyro.infer.autoguide.initialization import init_to_median

    from pyro_scorevi import AdaptiveStep, ScoreProximalSVI
    from pyro_scorevi.compare.problems import get_problem
    from pyro_scorevi.compare.runner import neg_elbo

    torch.set_num_threads(1)
    problem = get_problem(problem_name)
    pyro.clear_param_store()
    model, args, kwargs = problem.pyro_model_and_args()
    pyro.set_rng_seed(seed)
    guide = AutoNormal(model, init_loc_fn=init_to_median, init_scale=problem.init_scale)
    guide(*args, **kwargs)
    svi = ScoreProximalSVI(model, guide, step_rule=AdaptiveStep(**rule_kwargs))
    for _ in range(evals // 2):
        svi.step(*args, **kwargs)
    loc, scale = {}, {}
    with torch.no_grad():
        for name in problem.latent_names():
            m, s = guide._get_loc_and_scale(name)
            loc[name] = m.double().numpy().copy()
            scale[name] = s.double().numpy().copy()
    figures = problem.evaluate(loc, scale, seed=seed)
    return {
        "nll": figures["nll"],
        "ece": figures["ece"],
        "acc": figures["accuracy"],
        "neg_elbo": neg_elbo(problem, loc, scale, seed=seed),
        "rejected": svi.num_rejected_steps,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--evals", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--configs", default="all", help="comma-separated names, or 'all'")
    parser.add_argument("--out", help="write the rows as JSON here")
    parser.add_argument(
        "--posteriors-only",
        action="store_true",
        help="skip the two networks (a change that cannot reach guides of more than "
        "dense_max_dim coordinates leaves their columns as they were)",
    )
    parser.add_argument(
        "--networks-only",
        action="store_true",
        help="skip the posteriors (a change that reaches only guides of more than "
        "dense_max_dim coordinates, such as variance_ratio_memory, leaves their columns as "
        "they were)",
    )
    args = parser.parse_args(argv)
    if args.posteriors_only and args.networks_only:
        parser.error("--posteriors-only and --networks-only exclude each other")
    names = list(CONFIGS) if args.configs == "all" else args.configs.split(",")
    rows = []
    print(f"evals {args.evals}, seed {args.seed}\n")
    print(
        "| rule | posteriors: median / worst mean err (sd) | median sd ratio | "
        "median abs log(sd / mean-field sd) | rejected | "
        "MLP NLL / ECE / acc / -ELBO | ViT NLL / ECE / acc / -ELBO | s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name in names:
        kw = CONFIGS[name]
        t0 = time.perf_counter()
        post = None if args.networks_only else posterior_figures(kw, args.evals, args.seed)
        nets = {}
        if not args.posteriors_only:
            nets["mlp"] = network_figures("digits-mlp", kw, args.evals, args.seed)
            nets["vit"] = network_figures("digits-vit", kw, args.evals, args.seed)
        rows.append({"rule": name, "kwargs": kw, "posteriors": post, **nets})
        shown = [
            f"{f['nll']:.3f} / {f['ece']:.3f} / {f['acc']:.3f} / {f['neg_elbo']:.0f}" if f else "-"
            for f in (nets.get("mlp"), nets.get("vit"))
        ]
        cells = (
            ["-"] * 4
            if post is None
            else [
                f"{post['median_err']:.2f} / {post['worst_err']:.2f}",
                f"{post['median_sd_ratio']:.2f}",
                f"{post['median_meanfield_log_err']:.3f}",
                f"{post['rejected']}",
            ]
        )
        print(
            f"| {name} | {' | '.join(cells)} | {shown[0]} | {shown[1]} | "
            f"{time.perf_counter() - t0:.0f} |",
            flush=True,
        )
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
