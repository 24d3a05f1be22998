"""Usage: OMP_NUM_THREADS=1 python run_model.py MODEL [MODEL ...]
Writes results/MODEL.json next to this script."""

import json
import logging
import os
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import models
import numpy as np
import numpyro
from numpyro.distributions.transforms import biject_to
from numpyro.infer import MCMC, NUTS, SVI, Trace_ELBO
from numpyro.infer.autoguide import AutoNormal

from pyro_scorevi import AdaptiveStep
from pyro_scorevi.numpyro import ScoreProximalSVI

STEPS, SEEDS, NQ = 1500, (0, 1, 2), 4000
OUT = os.environ.get("UNSEEN_OUT") or os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "results"
)
#: A candidate rule: ``UNSEEN_RULE`` holds a JSON object of ``AdaptiveStep`` fields for the
#: ScoreProximalSVI fits (both runners), ``UNSEEN_METHODS`` the methods to fit ("elbo,ours"),
#: ``UNSEEN_OUT`` the results directory (e.g. ``UNSEEN_RULE='{"scale_to_mean_rate": 0.25}'
#: UNSEEN_METHODS=ours UNSEEN_OUT=/tmp/u python run_model.py``).
RULE = json.loads(os.environ.get("UNSEEN_RULE", "{}"))
METHODS = tuple(os.environ.get("UNSEEN_METHODS", "elbo,ours").split(","))


def scoreprox_options():
    """``ScoreProximalSVI``'s options under ``UNSEEN_RULE`` (none: its defaults)."""
    return {"step_rule": AdaptiveStep(**RULE)} if RULE else {}


os.makedirs(OUT, exist_ok=True)


class ListHandler(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records = []

    def emit(self, r):
        self.records.append(f"{r.name}: {r.getMessage()}"[:400])


def site_transforms(model, args):
    tr = numpyro.handlers.trace(numpyro.handlers.seed(model, 0)).get_trace(*args)
    return {
        k: biject_to(s["fn"].support).inv
        for k, s in tr.items()
        if s["type"] == "sample" and not s["is_observed"]
    }


def flat_unconstrained(samples, tfs, n):
    cols = []
    for k in sorted(tfs):
        u = tfs[k](jnp.asarray(samples[k]))
        cols.append(np.asarray(u).reshape(n, -1))
    return np.concatenate(cols, 1)


def names(samples, tfs):
    out = []
    for k in sorted(tfs):
        m = int(np.prod(np.asarray(tfs[k](jnp.asarray(samples[k][0]))).shape))
        out += [f"{k}[{i}]" for i in range(m)] if m > 1 else [k]
    return out


def metrics(U, ref_mean, ref_sd):
    m, s = U.mean(0), U.std(0)
    z = np.abs(m - ref_mean) / ref_sd
    r = s / ref_sd
    return dict(
        mean_err=float(np.sqrt(np.mean(z**2))),
        max_z=float(z.max()),
        sd_ratio_median=float(np.median(r)),
        sd_ratio_min=float(r.min()),
        sd_ratio_max=float(r.max()),
        argmin_sd=int(r.argmin()),
        argmax_z=int(z.argmax()),
        finite=bool(np.all(np.isfinite(U))),
    )


def run(name):
    model, args = models.MODELS[name]()
    tfs = site_transforms(model, args)
    res = dict(model=name)
    t0 = time.time()
    mc = MCMC(NUTS(model), num_warmup=1000, num_samples=2000, num_chains=1, progress_bar=False)
    mc.run(jax.random.PRNGKey(100), *args, extra_fields=("diverging", "num_steps"))
    S = mc.get_samples()
    n = next(iter(S.values())).shape[0]
    U = flat_unconstrained(S, tfs, n)
    ref_mean, ref_sd = U.mean(0), U.std(0)
    ex = mc.get_extra_fields()
    res.update(
        d=U.shape[1],
        coords=names(S, tfs),
        nuts_time=time.time() - t0,
        nuts_divergences=int(ex["diverging"].sum()),
        nuts_mean_num_steps=float(ex["num_steps"].mean()),
        nuts_max_num_steps=int(ex["num_steps"].max()),
    )
    # second, cheaper chain for a sanity check of the reference
    t0 = time.time()
    mc2 = MCMC(NUTS(model), num_warmup=500, num_samples=1000, num_chains=1, progress_bar=False)
    mc2.run(jax.random.PRNGKey(200), *args, extra_fields=("diverging",))
    S2 = mc2.get_samples()
    U2 = flat_unconstrained(S2, tfs, S2[next(iter(S2))].shape[0])
    zc = np.abs(U2.mean(0) - ref_mean) / ref_sd
    res.update(
        nuts2_max_z=float(zc.max()),
        nuts2_rms_z=float(np.sqrt(np.mean(zc**2))),
        nuts2_sd_ratio_range=[float((U2.std(0) / ref_sd).min()), float((U2.std(0) / ref_sd).max())],
        nuts2_divergences=int(mc2.get_extra_fields()["diverging"].sum()),
        nuts2_time=time.time() - t0,
    )
    print(
        f"{name}: d={res['d']} NUTS div={res['nuts_divergences']} steps~{res['nuts_mean_num_steps']:.0f} "  # noqa: E501
        f"2nd-chain max z={res['nuts2_max_z']:.3f} ({res['nuts_time']:.0f}s+{res['nuts2_time']:.0f}s)",  # noqa: E501
        flush=True,
    )

    big_elbo = Trace_ELBO(num_particles=2000)
    for meth in METHODS:
        res[meth] = []
        for seed in SEEDS:
            guide = AutoNormal(model)
            if meth == "elbo":
                svi = SVI(model, guide, numpyro.optim.Adam(0.01), Trace_ELBO(num_particles=2))
            else:
                svi = ScoreProximalSVI(model, guide, **scoreprox_options())
            h = ListHandler()
            logging.getLogger().addHandler(h)
            logging.getLogger().setLevel(logging.WARNING)
            t0 = time.time()
            err = None
            with warnings.catch_warnings(record=True) as w:
                warnings.simplefilter("always")
                try:
                    r = svi.run(jax.random.PRNGKey(seed), STEPS, *args, progress_bar=False)
                    jax.block_until_ready(r.params)
                except Exception as e:  # record crashes
                    err = f"{type(e).__name__}: {e}"[:600]
            logging.getLogger().removeHandler(h)
            rec = dict(
                seed=seed,
                time=time.time() - t0,
                warnings=[f"{x.category.__name__}: {str(x.message)[:300]}" for x in w],
                log=h.records,
                error=err,
            )
            if err is None:
                losses = np.asarray(r.losses)
                Q = guide.sample_posterior(
                    jax.random.PRNGKey(1000 + seed), r.params, sample_shape=(NQ,)
                )
                Uq = flat_unconstrained(Q, tfs, NQ)
                rec.update(metrics(Uq, ref_mean, ref_sd))
                rec["final_loss_avg100"] = float(np.nanmean(losses[-100:]))
                rec["nan_losses"] = int(np.sum(~np.isfinite(losses)))
                rec["neg_elbo_2000"] = float(
                    big_elbo.loss(jax.random.PRNGKey(7), r.params, model, guide, *args)
                )
                if meth == "ours":
                    rec["num_rejected"] = int(r.num_rejected_steps)
                    rec["stuck"] = bool(r.stuck)
            res[meth].append(rec)
            print(
                f"  {meth} seed {seed}: "
                + (
                    err
                    or f"mean_err={rec['mean_err']:.3f} sd_med={rec['sd_ratio_median']:.3f} "
                    f"sd_min={rec['sd_ratio_min']:.3f} -elbo={rec['neg_elbo_2000']:.2f} "
                    f"warn={len(rec['warnings'])} log={len(rec['log'])} ({rec['time']:.0f}s)"
                ),
                flush=True,
            )
    with open(f"{OUT}/{name}.json", "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    names_ = sys.argv[1:] or list(models.MODELS)
    for nm in names_:
        run(nm)
