"""Checks that each Pyro port has the NumPyro model's log joint: at 3 points drawn as NumPyro's
``init_to_uniform`` draws them (uniform(-2, 2) in each site's unconstrained space), the two
log densities must agree, and so must each latent site's unconstrained coordinates
(``biject_to(support).inv`` of NumPyro and of Pyro).

Usage: OMP_NUM_THREADS=1 python check_ports.py
"""

import jax
import models_pyro
import numpy as np
import numpyro
import pyro
import torch
from numpyro.distributions.transforms import biject_to as np_biject_to
from numpyro.infer.util import log_density
from torch.distributions import biject_to

np_models = models_pyro.np_models


def numpyro_point(model, args, seed):
    """Constrained values with unconstrained coordinates uniform in (-2, 2)."""
    tr = numpyro.handlers.trace(numpyro.handlers.seed(model, 0)).get_trace(*args)
    rng = np.random.default_rng(seed)
    point = {}
    for k, s in tr.items():
        if s["type"] == "sample" and not s["is_observed"]:
            tf = np_biject_to(s["fn"].support)
            shape = np.shape(tf.inv(s["value"]))
            point[k] = np.array(tf(rng.uniform(-2, 2, shape).astype(np.float32)))
    return point, tr


def main():
    torch.set_default_dtype(torch.float32)
    worst = worst_u = 0.0
    for name in models_pyro.MODELS:
        np_model, np_args = np_models.MODELS[name]()
        model, args = models_pyro.MODELS[name]()
        for seed in range(3):
            point, np_tr = numpyro_point(np_model, np_args, seed)
            lp_np, _ = log_density(np_model, np_args, {}, point)
            cond = {k: torch.tensor(v, dtype=torch.float32) for k, v in point.items()}
            tr = pyro.poutine.trace(pyro.poutine.condition(model, cond)).get_trace(*args)
            lp_pyro = tr.log_prob_sum().item()
            rel = abs(lp_pyro - float(lp_np)) / max(1.0, abs(float(lp_np)))
            worst = max(worst, rel)
            latents = [k for k, s in tr.nodes.items() if s["type"] == "sample"]
            latents = sorted(k for k in latents if k in point)
            assert latents == sorted(point), (name, latents, sorted(point))
            for k in latents:  # same unconstrained coordinates (the space AutoNormal fits)
                u_np = np.asarray(np_biject_to(np_tr[k]["fn"].support).inv(point[k]))
                u_pyro = biject_to(tr.nodes[k]["fn"].support).inv(cond[k]).numpy()
                worst_u = max(worst_u, float(np.max(np.abs(u_np - u_pyro))))
            if seed == 0:
                print(f"{name}: log p numpyro={float(lp_np):.4f} pyro={lp_pyro:.4f} rel={rel:.2e}")
    print(f"worst relative log-density difference, 3 draws x 12 models: {worst:.2e}")
    print(f"worst unconstrained-coordinate difference: {worst_u:.2e}")
    assert worst < 1e-4 and worst_u < 1e-3


if __name__ == "__main__":
    jax.config.update("jax_platform_name", "cpu")
    main()
