"""Where the digits-mlp targets of issue 11 meet: test NLL against full-data -ELBO (NumPyro).

Issue 11 asks of one fit at 3000 gradient evaluations (1500 steps, S = 2) a test NLL <= 0.75x
and an ECE <= 0.5x `Trace_ELBO`'s, *and* a full-data -ELBO no higher than `Trace_ELBO`'s. Two
probes of the mean-field family on this network, seed by seed:

* ``scales``: from the means of a 1500-step `ScoreProximalSVI` fit (the NLL target met), only
  the scales are fitted further by `Trace_ELBO` + Adam: the lowest -ELBO those means allow,
  and the NLL on the way there;
* ``shrink``: the guide of a long fit (``--long-steps`` of `Trace_ELBO` + Adam(0.01), or of
  `ScoreProximalSVI` with ``--long-method scoreprox``) with every scale multiplied by ``c``: a
  guide whose -ELBO and NLL both meet the targets, if one exists near the optimum.

Run: ``python benchmarks/experiments/mlp_frontier.py --seeds 0`` (about 2 minutes); the table is
on docs/algorithm_sweeps.md, "Can one fit meet every digits-mlp target?".
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent.parent))  # benchmarks/, for probe_fit


def _fit(seed: int, method: str, steps: int):
    import jax
    from probe_fit import guide_moments, make_svi

    problem, model, svi = make_svi("digits-mlp", method, {})
    state = svi.init(jax.random.PRNGKey(seed))
    update = jax.jit(svi.update)
    for _ in range(steps):
        state, _ = update(state)
    return problem, model, *guide_moments(problem, svi, state)


def _figures(problem, loc, scale, seed: int) -> str:
    from pyro_scorevi.compare.runner import neg_elbo

    evaluated = problem.evaluate(loc, scale, seed=seed)
    elbo = neg_elbo(problem, loc, scale, seed=seed)
    median = np.median(np.concatenate([v.ravel() for v in scale.values()]))
    return f"{elbo:.0f} | {evaluated['nll']:.3f} | {evaluated['ece']:.3f} | {median:.3f}"


def scales_only(seed: int, steps: list[int], lr: float) -> None:
    """The scales of a 1500-step ScoreProximalSVI fit, fitted further with its means fixed."""
    import jax
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as dist
    from numpyro.infer import SVI, Trace_ELBO

    problem, model, loc, scale = _fit(seed, "scoreprox", 1500)
    print(f"| {seed} | ScoreProximalSVI, 1500 steps | {_figures(problem, loc, scale, seed)} |")
    fixed = {n: jnp.asarray(v) for n, v in loc.items()}

    def guide():
        for n, m in fixed.items():
            s = numpyro.param(
                f"{n}_scale", jnp.asarray(scale[n]), constraint=dist.constraints.positive
            )
            numpyro.sample(n, dist.Normal(m, s).to_event(m.ndim))

    svi = SVI(model, guide, numpyro.optim.Adam(lr), Trace_ELBO(num_particles=2))
    state = svi.init(jax.random.PRNGKey(seed + 1))
    update = jax.jit(svi.update)
    done = 0
    for target in steps:
        while done < target:
            state, _ = update(state)
            done += 1
        params = svi.get_params(state)
        fitted = {n: np.asarray(params[f"{n}_scale"], float) for n in loc}
        label = f"its means, scales only: {target} steps of Adam({lr})"
        print(f"| {seed} | {label} | {_figures(problem, loc, fitted, seed)} |")


def shrink(seed: int, method: str, steps: int, factors: list[float]) -> None:
    """A long fit with every scale multiplied by each factor."""
    problem, _, loc, scale = _fit(seed, method, steps)
    name = "Trace_ELBO + Adam(0.01)" if method == "elbo" else "ScoreProximalSVI"
    for c in factors:
        scaled = {n: c * v for n, v in scale.items()}
        label = f"{name}, {steps} steps, sds x {c}"
        print(f"| {seed} | {label} | {_figures(problem, loc, scaled, seed)} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--probes", default="scales,shrink")
    parser.add_argument("--scale-steps", default="100,300,1000,3000,10000")
    parser.add_argument("--scale-lr", type=float, default=0.01)
    parser.add_argument("--long-method", choices=("elbo", "scoreprox"), default="elbo")
    parser.add_argument("--long-steps", type=int, default=15000)
    parser.add_argument("--factors", default="1,0.9,0.85,0.8,0.75,0.7,0.5")
    args = parser.parse_args(argv)
    probes = args.probes.split(",")
    print("| seed | guide | -ELBO | NLL | ECE | median sd |\n|---|---|---|---|---|---|")
    for seed in (int(s) for s in args.seeds.split(",")):
        if "scales" in probes:
            scales_only(seed, [int(s) for s in args.scale_steps.split(",")], args.scale_lr)
        if "shrink" in probes:
            factors = [float(c) for c in args.factors.split(",")]
            shrink(seed, args.long_method, args.long_steps, factors)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
