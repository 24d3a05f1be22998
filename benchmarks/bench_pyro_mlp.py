"""Step time and predictive quality of ScoreProximalSVI on a Bayesian MLP (sklearn digits).

Prints, measured in one run on the same model, guide, data and mini-batch size:

* step time of ``ScoreProximalSVI`` / ``SVI(Trace_ELBO)`` with the same particle count
  (target <= 1.2);
* step time of ``ScoreProximalSVI`` / a plain torch forward + backward + Adam step of the same
  network on the same mini-batch (target <= 2.0);
* test NLL, accuracy and ECE (15 bins) of both methods after the same number of gradient
  evaluations.

Run: ``python benchmarks/bench_pyro_mlp.py [--steps 2000] [--hidden 64] [--batch 64]``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI, Predictive, Trace_ELBO
from pyro.infer.autoguide import AutoNormal
from pyro.nn import PyroModule, PyroSample
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from pyro_scorevi import ScoreProximalSVI


def load_data(seed: int = 0):
    x, y = load_digits(return_X_y=True)
    x = x / 16.0
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, random_state=seed)
    f = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    return f(x_tr), torch.tensor(y_tr), f(x_te), torch.tensor(y_te)


def make_net(hidden: int) -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(64, hidden),
        torch.nn.Tanh(),
        torch.nn.Linear(hidden, hidden),
        torch.nn.Tanh(),
        torch.nn.Linear(hidden, 10),
    )


class BayesianMLP(PyroModule):
    """The MLP with N(0, 1) priors on every weight and bias; a subsampled likelihood."""

    def __init__(self, hidden: int, batch: int):
        super().__init__()
        self.net = make_net(hidden)
        pyro.nn.module.to_pyro_module_(self.net)
        for module in self.net.modules():
            for name, value in list(module.named_parameters(recurse=False)):
                prior = dist.Normal(0.0, 1.0).expand(value.shape).to_event(value.dim())
                setattr(module, name, PyroSample(prior))
        self.batch = batch

    def forward(self, x, y=None):
        # The plate draws its indices when built; the network runs outside it, so its weights
        # are global latents (inside the plate they would get a batch dimension).
        data = pyro.plate("data", x.shape[0], subsample_size=self.batch)
        with data as idx:
            pass
        logits = self.net(x[idx])
        with data:
            pyro.sample("obs", dist.Categorical(logits=logits), obs=None if y is None else y[idx])
        return logits


def time_steps(step, n: int) -> float:
    for _ in range(5):  # warm-up
        step()
    start = time.perf_counter()
    for _ in range(n):
        step()
    return (time.perf_counter() - start) / n


def calibration(probs: torch.Tensor, y: torch.Tensor, bins: int = 15) -> dict[str, float]:
    conf, pred = probs.max(-1)
    correct = (pred == y).float()
    edges = torch.linspace(0, 1, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (conf > lo) & (conf <= hi)
        if sel.any():
            ece += sel.float().mean() * (conf[sel].mean() - correct[sel].mean()).abs()
    nll = -probs[torch.arange(len(y)), y].clamp_min(1e-12).log().mean()
    return {"nll": float(nll), "accuracy": float(correct.mean()), "ece": float(ece)}


def evaluate(model, guide, x_te, y_te, num_samples: int = 100) -> dict[str, float]:
    full = BayesianMLP(model.net[0].out_features, x_te.shape[0])
    predictive = Predictive(full, guide=guide, num_samples=num_samples, return_sites=["_RETURN"])
    with torch.no_grad():
        logits = predictive(x_te)["_RETURN"]
    probs = logits.softmax(-1).mean(0)
    return calibration(probs, y_te)


def fit(method: str, args, data, num_steps: int):
    x_tr, y_tr, x_te, y_te = data
    pyro.clear_param_store()
    pyro.set_rng_seed(args.seed)
    model = BayesianMLP(args.hidden, args.batch)
    guide = AutoNormal(model, init_scale=0.05)
    if method.startswith("score"):
        # score-eager: Pyro traces the model at every particle; score-traced: the step replayed
        # as an FX graph; score: that graph compiled by torch.compile (compile time not timed).
        fast = {"score-eager": False, "score-traced": True, "score": "compile"}[method]
        svi = ScoreProximalSVI(model, guide, num_particles=args.particles, fast_path=fast)
    else:
        svi = SVI(
            model,
            guide,
            pyro.optim.Adam({"lr": args.lr}),
            Trace_ELBO(num_particles=args.particles),
        )
    step = lambda: svi.step(x_tr, y_tr)  # noqa: E731
    seconds = time_steps(step, args.timing_steps)
    start = time.perf_counter()
    for _ in range(num_steps):
        step()
    wall = time.perf_counter() - start
    return seconds, wall, evaluate(model, guide, x_te, y_te)


def torch_step_time(args, data) -> float:
    x_tr, y_tr, *_ = data
    net = make_net(args.hidden)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    n = x_tr.shape[0]

    def step():
        idx = torch.randint(n, (args.batch,))
        loss = torch.nn.functional.cross_entropy(net(x_tr[idx]), y_tr[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()

    return time_steps(step, args.timing_steps)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000, help="steps of each method")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--particles", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-2, help="Adam lr of Trace_ELBO")
    parser.add_argument("--timing-steps", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # both methods and the torch step on one core: a like-for-like ratio
    data = load_data()
    t_torch = torch_step_time(args, data)
    t_score, w_score, m_score = fit("score", args, data, args.steps)
    t_eager, _, _ = fit("score-eager", args, data, 0)
    t_traced, _, _ = fit("score-traced", args, data, 0)
    t_elbo, w_elbo, m_elbo = fit("elbo", args, data, args.steps)
    evals = args.steps * args.particles
    print(
        f"Bayesian MLP 64-{args.hidden}-{args.hidden}-10 on digits, batch {args.batch}, "
        f"S = {args.particles}, {args.steps} steps = {evals} gradient evaluations"
    )
    print(
        f"step time (ms): ScoreProximalSVI compiled {1e3 * t_score:.2f}, traced "
        f"{1e3 * t_traced:.2f}, eager {1e3 * t_eager:.2f} | SVI(Trace_ELBO) "
        f"{1e3 * t_elbo:.2f} | torch step {1e3 * t_torch:.2f}"
    )
    for name, t in (("compiled", t_score), ("traced", t_traced), ("eager", t_eager)):
        print(
            f"{name:>9}: / SVI(Trace_ELBO) = {t / t_elbo:.2f} (target <= 1.2)   "
            f"/ torch step = {t / t_torch:.2f} (target <= 2.0)   "
            f"per gradient evaluation / torch step = {t / t_torch / args.particles:.2f}"
        )
    print(f"{'method':<18}{'NLL':>8}{'acc':>8}{'ECE':>8}{'wall s':>9}")
    rows = (("ScoreProximalSVI", m_score, w_score), ("SVI(Trace_ELBO)", m_elbo, w_elbo))
    for name, m, w in rows:
        print(f"{name:<18}{m['nll']:>8.3f}{m['accuracy']:>8.3f}{m['ece']:>8.3f}{w:>9.1f}")


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
