"""Does a Bayesian vision transformer trained from scratch learn? ScoreProximalSVI vs Trace_ELBO.

A plain torch ViT (``bench_vit_cpu.VisionTransformer``: conv patch embedding, class token,
pre-norm blocks with LayerNorm and GELU; width 32, one block, 2 heads: 9,674 parameters) is made
Bayesian with :func:`pyro_scorevi.nn.bayesianize_` (every parameter a latent site, fan-in scaled
``N(0, 1/fan_in)`` priors, biases ``N(0, 1)``), wrapped in
:class:`~pyro_scorevi.nn.BayesianClassifier` (mini-batches of 64 from 1437 sklearn digits)
and fitted from its random initialisation (``init_to_network``, ``init_scale=0.01``) with

* ``SVI(Trace_ELBO(2))`` + Adam at lr 1e-2 and 1e-3,
* ``ScoreProximalSVI`` at its defaults (``AdaptiveStep()``) and with slow scales
  (``FixedStep(prox_weight=20, scale_prox_weight=1e4)``, ``docs/pitfalls.md``),

all with two particles per step, so the same number of gradient evaluations per step. Prints
test accuracy and NLL (Bayesian model average of 20 draws, 360 held-out images) at checkpoints,
and the wall time of the steps. One seed, one thread.

Run: ``python benchmarks/bench_vit_learning.py`` (about 5 minutes); ``--steps 300`` for a smoke run.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI, Predictive, Trace_ELBO
from pyro.infer.autoguide import AutoNormal

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_vit_cpu import VisionTransformer, load_digits_images  # noqa: E402

from pyro_scorevi import ScoreProximalSVI  # noqa: E402
from pyro_scorevi.nn import BayesianClassifier, bayesianize_, init_to_network  # noqa: E402

METHODS = {
    "elbo lr 1e-2": lambda m, g: SVI(m, g, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO(2)),
    "elbo lr 1e-3": lambda m, g: SVI(m, g, pyro.optim.Adam({"lr": 1e-3}), Trace_ELBO(2)),
    "score defaults": lambda m, g: ScoreProximalSVI(m, g),
    "score 20 / 1e4": lambda m, g: ScoreProximalSVI(m, g, prox_weight=20.0, scale_prox_weight=1e4),
}


def fan_in_prior(name: str, param: torch.Tensor) -> dist.Distribution:
    """``N(0, 1/fan_in)`` for weights (unit-variance pre-activations), ``N(0, 1)`` otherwise."""
    fan_in = param[0].numel() if param.dim() > 1 else None
    sd = 1 / math.sqrt(fan_in) if fan_in else 1.0
    return dist.Normal(torch.zeros_like(param), sd).to_event(param.dim())


def split(x, y, seed: int = 0):
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    train, test = perm[:1437], perm[1437:]
    return x[train], y[train], x[test], y[test]


def evaluate(model, guide, x, y) -> tuple[float, float]:
    """Accuracy and NLL of the posterior predictive (mean of 20 draws' probabilities)."""
    with torch.no_grad():
        logits = Predictive(model, guide=guide, num_samples=20, return_sites=["_RETURN"])(x)
        probs = logits["_RETURN"].softmax(-1).mean(0)
    accuracy = (probs.argmax(-1) == y).float().mean().item()
    nll = -probs[torch.arange(len(y)), y].clamp_min(1e-12).log().mean().item()
    return accuracy, nll


def fit(name: str, steps: int, checkpoints: list[int], data, seed: int = 0) -> dict:
    xtr, ytr, xte, yte = data
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    net = VisionTransformer(dim=32, depth=1, heads=2, mlp_dim=64)
    model = BayesianClassifier(bayesianize_(net, prior=fan_in_prior), batch_size=64)
    guide = AutoNormal(model, init_loc_fn=init_to_network, init_scale=0.01)
    svi = METHODS[name](model, guide)
    clock, figures = 0.0, {}
    for step in range(1, steps + 1):
        start = time.perf_counter()
        svi.step(xtr, ytr)
        clock += time.perf_counter() - start
        if step in checkpoints:
            figures[step] = (*evaluate(model, guide, xte, yte), clock)
    return figures


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated names")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    x, y = load_digits_images()
    data = split(x, y)
    checkpoints = sorted({max(1, args.steps * k // 6) for k in range(1, 7)})
    num_params = sum(
        p.numel() for p in VisionTransformer(dim=32, depth=1, heads=2, mlp_dim=64).parameters()
    )
    print(
        f"Bayesian ViT from scratch: {num_params} latent parameters, digits (1437 train / 360 "
        f"test), batch 64, S = 2 for every method, seed {args.seed}; accuracy / NLL (seconds)"
    )
    print(f"{'method':16s}" + "".join(f"{'step ' + str(c):>22s}" for c in checkpoints))
    for name in args.methods.split(","):
        figures = fit(name, args.steps, checkpoints, data, args.seed)
        cells = [f"{a:.2f} / {n:.2f} ({t:.0f} s)" for a, n, t in figures.values()]
        print(f"{name:16s}" + "".join(f"{c:>22s}" for c in cells), flush=True)


if __name__ == "__main__":
    main()
