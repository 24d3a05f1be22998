"""Makes the NUTS reference of the breast-cancer logistic regression (``logreg`` problem).

Runs NumPyro NUTS on the full-data NumPyro twin of the problem's model (the same sites, priors and
likelihood as the Pyro model the comparison fits) and writes posterior means and sds, in the
order of the problem's latent sites flattened, to ``pyro_scorevi/data/breast_cancer_nuts.json``.

Usage (about a minute on 2 CPU cores)::

    python benchmarks/make_nuts_reference.py [--chains 4] [--warmup 1000] [--samples 2500]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import numpy as np


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chains", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1000)
    parser.add_argument("--samples", type=int, default=2500, help="draws per chain")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out",
        type=pathlib.Path,
        default=pathlib.Path(__file__).resolve().parents[1]
        / "pyro_scorevi"
        / "data"
        / "breast_cancer_nuts.json",
    )
    args = parser.parse_args(argv)

    import jax
    import numpyro
    from numpyro.diagnostics import summary
    from numpyro.infer import MCMC, NUTS

    from pyro_scorevi.compare.problems import get_problem

    numpyro.enable_x64()
    problem = get_problem("logreg")
    model, model_args, kwargs = problem.numpyro_model_and_args(full_batch=True)
    mcmc = MCMC(
        NUTS(model),
        num_warmup=args.warmup,
        num_samples=args.samples,
        num_chains=args.chains,
        chain_method="sequential",
        progress_bar=False,
    )
    mcmc.run(jax.random.PRNGKey(args.seed), *model_args, **kwargs)
    samples = mcmc.get_samples(group_by_chain=True)
    names = problem.latent_names()
    flat = np.concatenate(
        [np.asarray(samples[n]).reshape(args.chains, args.samples, -1) for n in names], -1
    )
    diag = summary(flat)["Param:0"]
    record = {
        "problem": "logreg",
        "sites": names,
        "mean": flat.reshape(-1, flat.shape[-1]).mean(0).tolist(),
        "sd": flat.reshape(-1, flat.shape[-1]).std(0, ddof=1).tolist(),
        "min_n_eff": float(np.min(diag["n_eff"])),
        "max_r_hat": float(np.max(diag["r_hat"])),
        "sampler": (
            f"numpyro NUTS, {args.chains} chains x ({args.warmup} warmup + {args.samples} draws),"
            f" seed {args.seed}, float64"
        ),
        "command": "python benchmarks/make_nuts_reference.py " + " ".join(argv or sys.argv[1:]),
    }
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(
        f"wrote {args.out}: {flat.shape[-1]} coordinates, min n_eff {record['min_n_eff']:.0f}, "
        f"max r_hat {record['max_r_hat']:.3f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
