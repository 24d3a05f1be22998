"""The defaults check of ``unseen_numpyro`` for the Pyro backend.

For each model: the NUTS reference of ``unseen_numpyro/run_model.py`` (NumPyro model, same key
and sizes, same unconstrained transforms), then per seed 0-2 ``pyro_scorevi.ScoreProximalSVI``
(defaults) and ``pyro.infer.SVI`` + ``Trace_ELBO(num_particles=2)`` + ``Adam(0.01)``, both on
``AutoNormal`` (Pyro's default ``init_to_feasible``), 1500 steps; 4000 guide draws are scored
against the reference in NumPyro's unconstrained coordinates.

Usage: OMP_NUM_THREADS=1 python run_pyro.py [MODEL ...]
Writes results/MODEL.json next to this script. The NUTS reference (mean, sd per coordinate) is
cached in $NUTS_CACHE (default nuts_ref/ next to this script); delete it to recompute.
"""

import json
import logging
import os
import sys
import time
import warnings

import jax
import models_pyro
import numpy as np
import pyro
import run_model as np_runner  # unseen_numpyro/run_model.py (on sys.path via models_pyro)
import torch
from numpyro.infer import MCMC, NUTS
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormal

from pyro_scorevi import ScoreProximalSVI

STEPS, SEEDS, NQ, ELBO_DRAWS = 1500, (0, 1, 2), 4000, 500
HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.environ.get("UNSEEN_OUT") or os.path.join(HERE, "results")
CACHE = os.environ.get(
    "NUTS_CACHE", os.path.join(os.path.dirname(os.path.abspath(__file__)), "nuts_ref")
)


def nuts_reference(name):
    """Mean and sd per unconstrained coordinate, as ``run_model.run`` computes them."""
    path = os.path.join(CACHE, f"{name}.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    model, args = np_runner.models.MODELS[name]()
    tfs = np_runner.site_transforms(model, args)
    t0 = time.time()
    mc = MCMC(NUTS(model), num_warmup=1000, num_samples=2000, num_chains=1, progress_bar=False)
    mc.run(jax.random.PRNGKey(100), *args, extra_fields=("diverging", "num_steps"))
    S = mc.get_samples()
    n = next(iter(S.values())).shape[0]
    U = np_runner.flat_unconstrained(S, tfs, n)
    ex = mc.get_extra_fields()
    ref = dict(
        d=U.shape[1],
        coords=np_runner.names(S, tfs),
        mean=U.mean(0).tolist(),
        sd=U.std(0).tolist(),
        nuts_time=time.time() - t0,
        nuts_divergences=int(ex["diverging"].sum()),
        nuts_mean_num_steps=float(ex["num_steps"].mean()),
    )
    os.makedirs(CACHE, exist_ok=True)
    with open(path, "w") as f:
        json.dump(ref, f)
    return ref


def guide_draws(guide, num):
    """``num`` draws of the fitted guide's constrained latents, as numpy arrays."""
    with torch.no_grad():
        draws = [guide() for _ in range(num)]
    return {k: torch.stack([d[k] for d in draws]).numpy() for k in draws[0]}


def make_svi(meth, model, guide):
    if meth == "elbo":
        return SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), Trace_ELBO(num_particles=2))
    return ScoreProximalSVI(model, guide, **np_runner.scoreprox_options())


def fit(meth, seed, model, args, tfs, ref_mean, ref_sd):
    pyro.set_rng_seed(seed)
    pyro.clear_param_store()
    h = np_runner.ListHandler()
    logging.getLogger().addHandler(h)
    logging.getLogger().setLevel(logging.WARNING)
    t0 = time.time()
    err, losses, svi = None, [], None
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        try:
            guide = AutoNormal(model)
            svi = make_svi(meth, model, guide)
            for _ in range(STEPS):
                losses.append(svi.step(*args))
        except Exception as e:  # record crashes
            err = f"{type(e).__name__}: {e}"[:600]
    logging.getLogger().removeHandler(h)
    rec = dict(
        seed=seed,
        time=time.time() - t0,
        steps_done=len(losses),
        warnings=[f"{x.category.__name__}: {str(x.message)[:300]}" for x in w],
        log=h.records,
        error=err,
    )
    if meth == "ours" and svi is not None:
        rec["num_rejected"] = int(svi.num_rejected_steps)
    if err is None:
        losses = np.asarray(losses, dtype=float)
        pyro.set_rng_seed(1000 + seed)
        Q = guide_draws(guide, NQ)
        Uq = np_runner.flat_unconstrained(Q, tfs, NQ)
        rec.update(np_runner.metrics(Uq, ref_mean, ref_sd))
        rec["final_loss_avg100"] = float(np.nanmean(losses[-100:]))
        rec["nan_losses"] = int(np.sum(~np.isfinite(losses)))
        pyro.set_rng_seed(7)
        with torch.no_grad():
            rec["neg_elbo"] = float(Trace_ELBO(num_particles=ELBO_DRAWS).loss(model, guide, *args))
    return rec


def run(name):
    ref = nuts_reference(name)
    ref_mean, ref_sd = np.asarray(ref["mean"]), np.asarray(ref["sd"])
    np_model, np_args = np_runner.models.MODELS[name]()
    tfs = np_runner.site_transforms(np_model, np_args)
    model, args = models_pyro.MODELS[name]()
    res = dict(model=name, neg_elbo_draws=ELBO_DRAWS, **{k: v for k, v in ref.items()})
    print(
        f"{name}: d={ref['d']} NUTS div={ref['nuts_divergences']} "
        f"steps~{ref['nuts_mean_num_steps']:.0f} ({ref['nuts_time']:.0f}s)",
        flush=True,
    )
    for meth in np_runner.METHODS:
        res[meth] = []
        for seed in SEEDS:
            rec = fit(meth, seed, model, args, tfs, ref_mean, ref_sd)
            res[meth].append(rec)
            msg = rec["error"] or (
                f"mean_err={rec['mean_err']:.3f} sd_med={rec['sd_ratio_median']:.3f} "
                f"sd_min={rec['sd_ratio_min']:.3f} -elbo={rec['neg_elbo']:.2f} "
                f"rej={rec.get('num_rejected', '-')} warn={len(rec['warnings'])} "
                f"log={len(rec['log'])}"
            )
            print(f"  {meth} seed {seed}: {msg} ({rec['time']:.0f}s)", flush=True)
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, f"{name}.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    torch.set_num_threads(1)
    for nm in sys.argv[1:] or list(models_pyro.MODELS):
        run(nm)
