"""Each Gaussian autoguide on one raw-scale regression, both backends, defaults only.

``y = 1000 (1 + 2x + 0.5 eps)``, ``x ~ N(0, 1)``, N = 200; ``a, b ~ N(0, 1e4^2)``,
``s ~ HalfCauchy(1e3)``; 1500 steps of ``ScoreProximalSVI(model, guide)`` and of ``SVI`` +
``Trace_ELBO(2)`` + Adam(0.01), seed 0, each guide's default initialisation. The answer is
about a = 1000, b = 2000, s = 500 (full-data -ELBO about 1550). The diagonal guides take the
closed-form step (the ``AdaptiveStep`` rule); the full- and low-rank guides take
``num_inner_steps`` steps of ``inner_optim`` (Adam(0.01)) on the proximal objective, which
travel at Adam's rate, as ``Trace_ELBO``'s steps do (docs/pitfalls.md).

Run: ``python benchmarks/experiments/guides_raw_scale.py``.
"""

from __future__ import annotations

import numpy as np

STEPS = 1500
#: The Gaussian autoguides both backends have, by name.
GUIDES = (
    "AutoNormal",
    "AutoDiagonalNormal",
    "AutoMultivariateNormal",
    "AutoLowRankMultivariateNormal",
)
RNG = np.random.default_rng(0)
X = RNG.standard_normal(200).astype(np.float32)
Y = (1000 * (1.0 + 2.0 * X + 0.5 * RNG.standard_normal(200))).astype(np.float32)


def pyro_rows():
    import pyro
    import pyro.distributions as dist
    import torch
    from pyro.infer import SVI, Trace_ELBO
    from pyro.infer import autoguide as ag

    from pyro_scorevi import ScoreProximalSVI

    x, y = torch.as_tensor(X), torch.as_tensor(Y)

    def model(x, y):
        a = pyro.sample("a", dist.Normal(0.0, 1e4))
        b = pyro.sample("b", dist.Normal(0.0, 1e4))
        s = pyro.sample("s", dist.HalfCauchy(1e3))
        with pyro.plate("data", len(x)):
            pyro.sample("y", dist.Normal(a + b * x, s), obs=y)

    for guide_cls in (getattr(ag, name) for name in GUIDES):
        for method in ("ScoreProximalSVI", "Trace_ELBO"):
            pyro.clear_param_store()
            pyro.set_rng_seed(0)
            guide = guide_cls(model)
            if method == "Trace_ELBO":
                svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), Trace_ELBO(2))
            else:
                svi = ScoreProximalSVI(model, guide)
            losses = [svi.step(x, y) for _ in range(STEPS)]
            med = {k: float(v) for k, v in guide.median(x, y).items()}
            yield "Pyro", guide_cls.__name__, method, np.mean(losses[-100:]), med


def numpyro_rows():
    import jax
    import numpyro
    import numpyro.distributions as dist
    from numpyro.infer import SVI, Trace_ELBO
    from numpyro.infer import autoguide as ag

    from pyro_scorevi.numpyro import ScoreProximalSVI

    def model(x, y):
        a = numpyro.sample("a", dist.Normal(0.0, 1e4))
        b = numpyro.sample("b", dist.Normal(0.0, 1e4))
        s = numpyro.sample("s", dist.HalfCauchy(1e3))
        with numpyro.plate("data", len(x)):
            numpyro.sample("y", dist.Normal(a + b * x, s), obs=y)

    for guide_cls in (getattr(ag, name) for name in GUIDES):
        for method in ("ScoreProximalSVI", "Trace_ELBO"):
            guide = guide_cls(model)
            if method == "Trace_ELBO":
                svi = SVI(model, guide, numpyro.optim.Adam(0.01), Trace_ELBO(2))
            else:
                svi = ScoreProximalSVI(model, guide)
            r = svi.run(jax.random.PRNGKey(0), STEPS, X, Y, progress_bar=False)
            med = {k: float(v) for k, v in guide.median(r.params).items()}
            yield "NumPyro", guide_cls.__name__, method, float(np.mean(r.losses[-100:])), med


def main() -> None:
    print("| backend | guide | method | -ELBO (last 100 steps) | a | b | s |")
    print("|---|---|---|---:|---:|---:|---:|")
    for rows in (pyro_rows(), numpyro_rows()):
        for backend, guide, method, loss, med in rows:
            print(
                f"| {backend} | {guide} | {method} | {loss:.1f} | {med['a']:.1f} "
                f"| {med['b']:.1f} | {med['s']:.1f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
