"""Wide raw-scale regressions: the defaults against ``Trace_ELBO``, raw and standardised columns.

A linear regression with a known noise sd, so that the posterior is Gaussian and known in
closed form: N = 2000 rows, P columns of order 50 (``50 + 15 x``) in five collinear blocks (each
block a shared draw plus 0.3 of its own noise, correlation about 0.9), ``a ~ N(0, 100^2)``,
``b ~ N(0, 10^2)``, ``y ~ N(a + X b, 5)``. Each backend fits ``AutoNormal`` from its default
initialisation (Pyro ``init_to_feasible``, NumPyro ``init_to_uniform``) with
``ScoreProximalSVI(model, guide)`` and with ``SVI`` + ``Trace_ELBO(num_particles=2)`` +
``Adam(0.01)``, 1500 steps, seed 0, and prints the mean and largest error of the guide's means
in posterior sds, the geometric mean of its sds over the mean-field ideal and the mean loss of
the last 100 steps. ``docs/pitfalls.md``, "Correlated posteriors: ridges", reads the table.

Usage: OMP_NUM_THREADS=1 python wide_regression.py [--widths 50,150,250] [--steps 1500]
"""

from __future__ import annotations

import argparse

import numpy as np

NOISE_SD, PRIOR_A, PRIOR_B = 5.0, 100.0, 10.0


def design(width: int, standardise: bool, n: int = 2000, seed: int = 0):
    """``(X, y, mean, sd, mean_field_sd)``: the data and the exact posterior's moments."""
    rng = np.random.default_rng(seed)
    blocks = width // 5
    base = rng.standard_normal((n, blocks))
    x = np.concatenate([base + 0.3 * rng.standard_normal((n, blocks)) for _ in range(5)], 1)
    x = 50 + 15 * x[:, :width]
    beta = 0.2 * rng.standard_normal(width)
    y = 10 + x @ beta + NOISE_SD * rng.standard_normal(n)
    if standardise:
        x = (x - x.mean(0)) / x.std(0)
    z = np.concatenate([np.ones((n, 1)), x], 1)
    precision = np.diag([PRIOR_A**-2] + [PRIOR_B**-2] * width) + z.T @ z / NOISE_SD**2
    cov = np.linalg.inv(precision)
    mean = cov @ (z.T @ y / NOISE_SD**2)
    return x, y, mean, np.sqrt(np.diag(cov)), 1 / np.sqrt(np.diag(precision))


def fit_pyro(method: str, x, y, steps: int):
    import pyro
    import pyro.distributions as dist
    import torch
    from pyro.infer import SVI, Trace_ELBO
    from pyro.infer.autoguide import AutoNormal

    from pyro_scorevi import ScoreProximalSVI

    xt, yt = torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.float32)
    width = x.shape[1]

    def model(x, y):
        a = pyro.sample("a", dist.Normal(0.0, PRIOR_A))
        b = pyro.sample("b", dist.Normal(0.0, PRIOR_B).expand([width]).to_event(1))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.Normal(a + x @ b, NOISE_SD), obs=y)

    pyro.set_rng_seed(0)
    pyro.clear_param_store()
    guide = AutoNormal(model)
    if method == "elbo":
        svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), Trace_ELBO(num_particles=2))
    else:
        svi = ScoreProximalSVI(model, guide)
    losses = [svi.step(xt, yt) for _ in range(steps)]
    loc = np.concatenate([guide.locs.a.detach().numpy()[None], guide.locs.b.detach().numpy()])
    scale = np.concatenate([guide.scales.a.detach().numpy()[None], guide.scales.b.detach().numpy()])
    return loc, scale, float(np.mean(losses[-100:]))


def fit_numpyro(method: str, x, y, steps: int):
    import jax
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as dist
    from numpyro.infer import SVI, Trace_ELBO
    from numpyro.infer.autoguide import AutoNormal

    from pyro_scorevi.numpyro import ScoreProximalSVI

    width = x.shape[1]

    def model(x, y):
        a = numpyro.sample("a", dist.Normal(0.0, PRIOR_A))
        b = numpyro.sample("b", dist.Normal(0.0, PRIOR_B).expand([width]).to_event(1))
        numpyro.sample("y", dist.Normal(a + x @ b, NOISE_SD), obs=y)

    guide = AutoNormal(model)
    if method == "elbo":
        svi = SVI(model, guide, numpyro.optim.Adam(0.01), Trace_ELBO(num_particles=2))
    else:
        svi = ScoreProximalSVI(model, guide)
    xj, yj = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
    result = svi.run(jax.random.PRNGKey(0), steps, xj, yj, progress_bar=False)
    p = result.params
    loc = np.concatenate([np.asarray(p["a_auto_loc"]).reshape(1), np.asarray(p["b_auto_loc"])])
    scale = np.concatenate(
        [np.asarray(p["a_auto_scale"]).reshape(1), np.asarray(p["b_auto_scale"])]
    )
    return loc, scale, float(np.mean(np.asarray(result.losses)[-100:]))


def main(argv=None) -> None:
    import warnings

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", default="50,150,250")
    parser.add_argument("--steps", type=int, default=1500)
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")  # the raw fits' frozen-fit warning: the table shows them
    columns = ("P", "columns", "backend", "method", "mean err (sd)", "max err", "sd / mf sd")
    print("| " + " | ".join(columns) + " | loss |")
    print("|---|---|---|---|---:|---:|---:|---:|")
    for width in (int(w) for w in args.widths.split(",")):
        for standardise in (False, True):
            x, y, mean, sd, mf_sd = design(width, standardise)
            for backend, fit in (("Pyro", fit_pyro), ("NumPyro", fit_numpyro)):
                for method in ("ours", "elbo"):
                    loc, scale, loss = fit(method, x, y, args.steps)
                    err = np.abs(loc - mean) / sd
                    ratio = float(np.exp(np.mean(np.log(scale / mf_sd))))
                    name = "ScoreProximalSVI" if method == "ours" else "Trace_ELBO"
                    cols = "standardised" if standardise else "raw"
                    print(
                        f"| {width} | {cols} | {backend} | {name} | {err.mean():.3g} | "
                        f"{err.max():.3g} | {ratio:.3g} | {loss:.4g} |",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
