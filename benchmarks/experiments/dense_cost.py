"""Per-step cost of the dense metric: ``AdaptiveStep()`` against ``dense_max_dim=0``.

For each posterior named on the command line (the suite's or the hold-out probe's), times
steps 500-1000 of a jitted ``lax.scan`` of NumPyro ``update`` and steps 20-220 of Pyro
``step``, one thread, and prints milliseconds per step for both rules.

    python benchmarks/experiments/dense_cost.py nile-local-level sv-generated
"""

from __future__ import annotations

import functools
import pathlib
import sys
import time
import warnings

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))


def _scan(svi, args, state):
    """500 ``update`` steps (``jax.jit`` of this with ``svi``, ``args`` bound)."""
    import jax

    return jax.lax.scan(lambda s, _: svi.update(s, *args), state, None, length=500)


def main(names: list[str]) -> None:
    import holdout_probe
    import jax
    import pyro
    import torch
    from numpyro.infer.autoguide import AutoNormal as NumPyroAutoNormal
    from pyro.infer.autoguide import AutoNormal

    import pyro_scorevi
    import pyro_scorevi.numpyro
    from pyro_scorevi import AdaptiveStep
    from pyro_scorevi.compare import posteriors

    warnings.simplefilter("ignore")
    holdout_probe.register()
    torch.set_num_threads(1)
    for name in names:
        post = posteriors.get_posterior(name)
        for dense_max_dim in (200, 0):
            rule = AdaptiveStep(dense_max_dim=dense_max_dim)
            model, args, kwargs = post.numpyro_model_and_args()
            model = functools.partial(model, **kwargs)
            svi = pyro_scorevi.numpyro.ScoreProximalSVI(
                model, NumPyroAutoNormal(model), step_rule=rule
            )
            state = svi.init(jax.random.PRNGKey(0), *args)
            run = jax.jit(functools.partial(_scan, svi, args))
            state, _ = run(state)
            jax.block_until_ready(state)
            t0 = time.perf_counter()
            state, _ = run(state)
            jax.block_until_ready(state)
            numpyro_ms = (time.perf_counter() - t0) / 500 * 1e3
            pyro.clear_param_store()
            model, args, kwargs = post.pyro_model_and_args()
            svi = pyro_scorevi.ScoreProximalSVI(model, AutoNormal(model), step_rule=rule)
            for _ in range(20):
                svi.step(*args, **kwargs)
            t0 = time.perf_counter()
            for _ in range(200):
                svi.step(*args, **kwargs)
            pyro_ms = (time.perf_counter() - t0) / 200 * 1e3
            print(
                f"{name:22s} dense_max_dim={dense_max_dim:<3d} NumPyro {numpyro_ms:.3f} ms/step, "
                f"Pyro {pyro_ms:.2f} ms/step",
                flush=True,
            )


if __name__ == "__main__":
    main(sys.argv[1:] or ["cancer-logreg-raw", "centred-groups", "nile-local-level"])
