"""Is the residual error of the 1500-step fits the mean-field limit? Long runs, seed 0:
ELBO (Adam 0.01, 4 particles, 20000 steps) and ours (defaults, 15000 steps)."""

import json
import os
import sys
import time

import jax
import models
import numpyro
from numpyro.infer import MCMC, NUTS, SVI, Trace_ELBO
from numpyro.infer.autoguide import AutoNormal
from run_model import flat_unconstrained, metrics, site_transforms

from pyro_scorevi.numpyro import ScoreProximalSVI

HERE = os.path.dirname(os.path.abspath(__file__))
out = {}
for name in sys.argv[1:]:
    model, args = models.MODELS[name]()
    tfs = site_transforms(model, args)
    mc = MCMC(NUTS(model), num_warmup=1000, num_samples=2000, progress_bar=False)
    mc.run(jax.random.PRNGKey(100), *args)  # same key as the main reference
    S = mc.get_samples()
    U = flat_unconstrained(S, tfs, 2000)
    rm, rs = U.mean(0), U.std(0)
    out[name] = {}
    for meth, steps in (("elbo_long", 20000), ("ours_long", 15000)):
        g = AutoNormal(model)
        svi = (
            SVI(model, g, numpyro.optim.Adam(0.01), Trace_ELBO(num_particles=4))
            if meth == "elbo_long"
            else ScoreProximalSVI(model, g)
        )
        t0 = time.time()
        r = svi.run(jax.random.PRNGKey(0), steps, *args, progress_bar=False)
        Q = g.sample_posterior(jax.random.PRNGKey(1000), r.params, sample_shape=(4000,))
        m = metrics(flat_unconstrained(Q, tfs, 4000), rm, rs)
        m["neg_elbo_2000"] = float(
            Trace_ELBO(num_particles=2000).loss(jax.random.PRNGKey(7), r.params, model, g, *args)
        )
        m["steps"] = steps
        m["time"] = time.time() - t0
        out[name][meth] = m
        print(
            name,
            meth,
            steps,
            {k: round(v, 3) for k, v in m.items() if isinstance(v, float)},
            flush=True,
        )
json.dump(out, open(os.path.join(HERE, "results", "long_check.json"), "w"), indent=1)
