"""Step time of the NumPyro ScoreProximalSVI on a Bayesian MLP (sklearn digits).

The model of ``benchmarks/bench_pyro_mlp.py``: 64-H-H-10 tanh MLP, N(0, 1) priors on every
weight and bias, categorical likelihood subsampled to ``--batch`` rows, ``AutoNormal`` guide.
Prints, measured in one run:

* NumPyro ``ScoreProximalSVI`` step time / Pyro ``ScoreProximalSVI`` step time;
* NumPyro ``ScoreProximalSVI`` step time / ``numpyro.infer.SVI(Trace_ELBO)`` step time with the
  same model, guide and particle count (target <= 1.2).

NumPyro steps are ``jax.jit(update)`` timed with ``block_until_ready``; the Pyro step is
``ScoreProximalSVI.step`` with ``fast_path="compile"`` (compile time not timed).
Run: ``python benchmarks/bench_numpyro_mlp.py [--steps 300]``.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from jax import random
from numpyro.infer import SVI, Trace_ELBO
from numpyro.infer.autoguide import AutoNormal
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from pyro_scorevi.numpyro import ScoreProximalSVI


def load_data(seed: int = 0):
    x, y = load_digits(return_X_y=True)
    x_tr, _, y_tr, _ = train_test_split(x / 16.0, y, test_size=0.25, random_state=seed)
    return x_tr.astype(np.float32), y_tr.astype(np.int32)


def make_model(hidden: int, batch: int):
    sizes = [(64, hidden), (hidden, hidden), (hidden, 10)]

    def model(x, y):
        h = None
        weights = []
        for i, (n_in, n_out) in enumerate(sizes):
            w = numpyro.sample(f"w{i}", dist.Normal(0.0, 1.0).expand([n_in, n_out]).to_event(2))
            b = numpyro.sample(f"b{i}", dist.Normal(0.0, 1.0).expand([n_out]).to_event(1))
            weights.append((w, b))
        with numpyro.plate("data", x.shape[0], subsample_size=batch) as idx:
            h = x[idx]
            for i, (w, b) in enumerate(weights):
                h = h @ w + b
                if i < len(weights) - 1:
                    h = jnp.tanh(h)
            numpyro.sample("obs", dist.Categorical(logits=h), obs=y[idx])

    return model


def time_jax(update, state, args, n: int) -> float:
    for _ in range(5):  # compile + warm-up
        state, loss = update(state, *args)
    jax.block_until_ready((state, loss))
    start = time.perf_counter()
    for _ in range(n):
        state, loss = update(state, *args)
    jax.block_until_ready((state, loss))
    return (time.perf_counter() - start) / n


def pyro_step_time(args) -> float:
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench_pyro_mlp as bp  # the Pyro benchmark's model and timing loop
    import pyro
    import torch
    from pyro.infer.autoguide import AutoNormal as PyroAutoNormal

    from pyro_scorevi import ScoreProximalSVI as PyroScoreProximalSVI

    torch.set_num_threads(1)  # as in bench_pyro_mlp.py; torch's pool would fight XLA's
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    x_tr, y_tr, _, _ = bp.load_data(0)
    model = bp.BayesianMLP(args.hidden, args.batch)
    guide = PyroAutoNormal(model)
    svi = PyroScoreProximalSVI(model, guide, num_particles=args.particles, fast_path="compile")
    return bp.time_steps(lambda: svi.step(x_tr, y_tr), args.steps)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="timed steps per method")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--particles", type=int, default=2)
    parser.add_argument("--no-pyro", action="store_true", help="skip the Pyro timing")
    args = parser.parse_args(argv)

    x, y = load_data()
    data = (jnp.asarray(x), jnp.asarray(y))
    model = make_model(args.hidden, args.batch)

    guide = AutoNormal(model)
    score = ScoreProximalSVI(model, guide, num_particles=args.particles)
    t_score = time_jax(
        jax.jit(score.update), score.init(random.PRNGKey(0), *data), data, args.steps
    )

    elbo_guide = AutoNormal(model)
    elbo = SVI(model, elbo_guide, numpyro.optim.Adam(1e-2), Trace_ELBO(args.particles))
    t_elbo = time_jax(jax.jit(elbo.update), elbo.init(random.PRNGKey(0), *data), data, args.steps)

    print(f"devices: {jax.devices()}  | MLP 64-{args.hidden}-{args.hidden}-10, batch {args.batch}")
    print(f"particles {args.particles}, {args.steps} timed steps per method")
    print(
        f"step time  NumPyro ScoreProximalSVI {1e3 * t_score:.3f} ms | "
        f"numpyro SVI(Trace_ELBO) {1e3 * t_elbo:.3f} ms"
    )
    print(f"ratio NumPyro ScoreProximalSVI / SVI(Trace_ELBO) = {t_score / t_elbo:.2f} (<= 1.2)")
    if not args.no_pyro:
        t_pyro = pyro_step_time(args)
        print(f"step time  Pyro ScoreProximalSVI {1e3 * t_pyro:.3f} ms")
        print(f"ratio NumPyro / Pyro ScoreProximalSVI = {t_score / t_pyro:.4f}")


if __name__ == "__main__":
    main()
