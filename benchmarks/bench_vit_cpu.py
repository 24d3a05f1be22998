"""Step time and peak memory of ScoreProximalSVI on a small Bayesian vision transformer (CPU).

A ViT (plain torch: patch embedding, pre-norm attention blocks, class token) on sklearn digits
(8x8 images, patch 2: 16 tokens), made Bayesian with :mod:`pyro_scorevi.nn` (every parameter a
latent site with a N(0, 1) prior, the guide started at the network's initial weights). Prints,
all measured in one run:

* step time of ``ScoreProximalSVI`` (traced fast path, and eager) / an AdamW step of the same
  network on the same mini-batch (target <= 1.3), and / ``SVI(Trace_ELBO)`` with the same
  ``AutoNormal`` guide and particle count (target <= 1.0). Times are medians over rounds that
  interleave the methods, one thread each, so that the load of a shared machine hits all alike;
* peak memory of each method, each in its own subprocess: the growth of the resident set
  (``VmHWM`` after resetting it through ``/proc/self/clear_refs``, else ``ru_maxrss``) from
  just before the guide / optimiser is built to the end of its steps, with glibc's mmap
  threshold pinned (``mallopt``) so that freed large tensors leave the resident set at once;
* step time against the number of parameters, 1e4 to 1e7, on a 64-h-h-10 MLP width sweep;
* what each method holds per coordinate, on paper.

Run: ``python benchmarks/bench_vit_cpu.py`` (about 6 minutes on a loaded 2-core machine);
``--quick`` for a smoke run; ``--parts vit,memory,sweep`` to choose the measurements;
``--compile`` to also time ``fast_path="compile"`` on the ViT (a minute or two of
compilation); ``--json PATH`` writes the figures.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import pyro
import torch
import torch.nn.functional as F
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormal

from pyro_scorevi import ScoreProximalSVI
from pyro_scorevi.nn import BayesianClassifier, bayesianize_, init_to_network

# ----------------------------------------------------------------------------- the network


class Attention(torch.nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.proj = torch.nn.Linear(dim, dim)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Block(torch.nn.Module):
    def __init__(self, dim: int, heads: int, mlp_dim: int):
        super().__init__()
        self.norm1 = torch.nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = torch.nn.LayerNorm(dim)
        self.mlp = torch.nn.Sequential(
            torch.nn.Linear(dim, mlp_dim), torch.nn.GELU(), torch.nn.Linear(mlp_dim, dim)
        )

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(torch.nn.Module):
    """ViT (Dosovitskiy et al. 2021) with a class token and learned position embeddings."""

    def __init__(
        self,
        image_size: int = 8,
        patch_size: int = 2,
        in_chans: int = 1,
        num_classes: int = 10,
        dim: int = 64,
        depth: int = 2,
        heads: int = 4,
        mlp_dim: int = 128,
    ):
        super().__init__()
        tokens = (image_size // patch_size) ** 2
        self.patch = torch.nn.Conv2d(in_chans, dim, patch_size, stride=patch_size)
        self.cls_token = torch.nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = torch.nn.Parameter(0.02 * torch.randn(1, tokens + 1, dim))
        self.blocks = torch.nn.Sequential(*[Block(dim, heads, mlp_dim) for _ in range(depth)])
        self.norm = torch.nn.LayerNorm(dim)
        self.head = torch.nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        return self.head(self.norm(self.blocks(x))[:, 0])


def mlp(width: int) -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Flatten(),
        torch.nn.Linear(64, width),
        torch.nn.Tanh(),
        torch.nn.Linear(width, width),
        torch.nn.Tanh(),
        torch.nn.Linear(width, 10),
    )


def num_params(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def load_digits_images():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32).view(-1, 1, 8, 8)
    return x, torch.tensor(y)


# ----------------------------------------------------------------------------- the methods


def build_step(method: str, make_net, x, y, batch: int, particles: int, seed: int = 0):
    """A zero-argument step of ``method`` on a fresh network; returns ``(step, objects)``."""
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    net = make_net()
    if method == "adamw":
        opt = torch.optim.AdamW(net.parameters(), lr=1e-3)

        def step():
            idx = torch.randint(x.shape[0], (batch,))
            loss = F.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        return step, (net, opt)
    model = BayesianClassifier(bayesianize_(net), batch_size=batch)
    guide = AutoNormal(model, init_loc_fn=init_to_network, init_scale=1e-3)
    if method == "elbo":
        svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), Trace_ELBO(num_particles=particles))
    elif method in ("score_fast", "score_eager", "score_compile"):
        fast_path = {"score_fast": True, "score_eager": False, "score_compile": "compile"}[method]
        svi = ScoreProximalSVI(model, guide, num_particles=particles, fast_path=fast_path)
    else:
        raise ValueError(
            "method must be adamw, elbo, score_fast, score_eager or score_compile (got "
            f"{method!r})."
        )
    return (lambda: svi.step(x, y)), (model, guide, svi)


def time_interleaved(steps: dict, rounds: int, per_round: int, warmup: int = 3) -> dict:
    """Median seconds per step of each method over ``rounds`` rounds of ``per_round`` steps,
    the methods taking turns within each round."""
    for step in steps.values():
        for _ in range(warmup):  # includes the fast path's one-time trace and check
            step()
    times = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            for _ in range(per_round):
                step()
            times[name].append((time.perf_counter() - start) / per_round)
    return {name: statistics.median(t) for name, t in times.items()}


# ----------------------------------------------------------------------------- memory


def pin_mmap_threshold(threshold: int = 128 * 1024) -> None:
    """``mallopt(M_MMAP_THRESHOLD, threshold)``: glibc then serves every large block by mmap and
    unmaps it on free (no dynamic threshold), so the resident set follows the live tensors."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, threshold)  # M_MMAP_THRESHOLD = -3
    except OSError:
        pass


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    """Resets ``VmHWM`` to the current RSS (``echo 5 > /proc/self/clear_refs``, Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_kb() -> int:
    """The resident set's high-water mark since the last :func:`_reset_peak`, in KiB."""
    hwm = _status_kb("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def prime_lazy_machinery(x, y) -> None:
    """Runs an AdamW step of a one-block ViT and traces a toy function with ``make_fx``, so
    that loading torch's kernels, thread pools and tracing modules (a fixed ~60 MiB of Python
    objects on first use of ``make_fx``) does not count in the figures of whichever method
    comes first."""
    from torch.fx.experimental.proxy_tensor import make_fx

    config = dict(dim=16, depth=1, heads=2, mlp_dim=16)
    build_step("adamw", lambda: VisionTransformer(**config), x, y, 2, 1)[0]()
    make_fx(lambda a: (a * a).sum())(torch.ones(2))


def memory_worker(method: str, config: dict) -> dict:
    """Runs in its own process. Returns the peak growth of the resident set above the RSS just
    before the guide / optimiser is built: over building it and its first ``warmup`` steps
    (which include the fast path's one-time trace), and over the ``steps`` steps after those
    (the steady state)."""
    pin_mmap_threshold()
    torch.set_num_threads(1)
    x, y = load_digits_images()
    make_net = lambda: VisionTransformer(**config["vit"])  # noqa: E731
    prime_lazy_machinery(x, y)
    gc.collect()
    exact = _reset_peak()
    base = _status_kb("VmRSS") or peak_rss_kb()
    step, objects = build_step(method, make_net, x, y, config["batch"], config["particles"])
    for _ in range(config["warmup"]):
        step()
    setup = peak_rss_kb() - base
    exact = _reset_peak() and exact
    for _ in range(config["steps"]):
        step()
    steady = peak_rss_kb() - base
    kib = 1024
    return {"method": method, "setup": setup * kib, "steady": steady * kib, "exact": exact}


def measure_memory(methods, config: dict) -> dict:
    out = {}
    for method in methods:
        proc = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--memory-worker", method,
             "--config", json.dumps(config)],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        out[method] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


# ----------------------------------------------------------------------------- main


def held_per_coordinate() -> list[tuple[str, str]]:
    return [
        (
            "ScoreProximalSVI (AutoNormal)",
            "guide loc + scale (2) + frozen q_t (loc, scale: 2) + 4 running sums "
            "(delta, delta^2, delta*g, g) = 8 floats held across the particle loop; per "
            "particle transiently theta, offset, score (3)",
        ),
        (
            "SVI(Trace_ELBO) + Adam (AutoNormal)",
            "guide loc + scale (2) + their grads (2) + Adam's 2 moments of each (4) = 8 floats; "
            "per particle transiently eps, z and autograd buffers of z (3+)",
        ),
        ("AdamW (point estimate)", "weights (1) + grads (1) + 2 moments (2) = 4 floats"),
    ]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run (few steps)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--particles", type=int, default=2, help="S for both SVI methods")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--memory-dim", type=int, default=512, help="ViT width for memory")
    parser.add_argument("--memory-depth", type=int, default=4)
    parser.add_argument("--sweep", default="70,280,960,3130", help="MLP widths (1e4-1e7 params)")
    parser.add_argument("--json", help="write the figures to this file")
    parser.add_argument("--parts", default="vit,memory,sweep", help="which measurements")
    parser.add_argument(
        "--compile", action="store_true", help='also time fast_path="compile" on the ViT'
    )
    parser.add_argument("--memory-worker", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_worker:
        print(json.dumps(memory_worker(args.memory_worker, json.loads(args.config))))
        return
    torch.set_num_threads(1)  # every method on one core: a like-for-like ratio
    x, y = load_digits_images()
    parts = set(args.parts.split(","))
    results: dict = {}
    methods = ["score_fast", "score_eager", "elbo", "adamw"]
    if "vit" in parts:
        rounds, per_round = (2, 3) if args.quick else (args.rounds, 20)
        vit = dict(dim=args.dim, depth=args.depth, heads=4, mlp_dim=2 * args.dim)
        make_vit = lambda: VisionTransformer(**vit)  # noqa: E731
        steps = {m: build_step(m, make_vit, x, y, args.batch, args.particles)[0] for m in methods}
        # One particle: the same number of gradient evaluations as the AdamW step.
        steps["score_fast_S1"] = build_step("score_fast", make_vit, x, y, args.batch, 1)[0]
        if args.compile:  # torch.compile of the traced step: a minute or two of compilation
            steps["score_compile"] = build_step(
                "score_compile", make_vit, x, y, args.batch, args.particles
            )[0]
        t = time_interleaved(steps, rounds, per_round)
        d = num_params(VisionTransformer(**vit))
        results["vit"] = {**vit, "params": d, "batch": args.batch, "particles": args.particles}
        results["step_seconds"] = t
        print(
            f"ViT on digits: patch 2, dim {args.dim}, depth {args.depth}, {d} parameters (all "
            f"latent), batch {args.batch}, S = {args.particles}; medians of {rounds} interleaved "
            f"rounds of {per_round} steps, 1 thread"
        )
        for m in steps:
            print(f"  {m:<13} {1e3 * t[m]:8.2f} ms/step")
        for m in ("score_fast", "score_eager"):
            print(
                f"  {m} / AdamW step      = {t[m] / t['adamw']:.2f}  (target <= 1.3; "
                f"{t[m] / t['adamw'] / args.particles:.2f} per gradient evaluation)"
            )
            print(f"  {m} / SVI(Trace_ELBO) = {t[m] / t['elbo']:.2f}  (target <= 1.0)")
        print(f"  score_fast_S1 / AdamW step   = {t['score_fast_S1'] / t['adamw']:.2f}  (S = 1)")
        if args.compile:
            c = t["score_compile"]
            print(f"  score_compile / AdamW step   = {c / t['adamw']:.2f}  (target <= 1.3)")
            print(f"  score_compile / SVI(Trace_ELBO) = {c / t['elbo']:.2f}  (target <= 1.0)")

    if "memory" in parts:
        mem_vit = dict(
            dim=args.memory_dim, depth=args.memory_depth, heads=4, mlp_dim=2 * args.memory_dim
        )
        config = {"vit": mem_vit, "batch": args.batch, "particles": args.particles}
        config["warmup"], config["steps"] = (2, 2) if args.quick else (3, 10)
        mem = measure_memory(methods, config)
        d_mem = num_params(VisionTransformer(**mem_vit))
        results["memory"] = {"vit": mem_vit, "params": d_mem, **mem}
        exact = all(v["exact"] for v in mem.values())
        how = "VmHWM reset through clear_refs" if exact else "ru_maxrss, a lower bound"
        copy = 4 * d_mem
        print(
            f"\nPeak memory: ViT dim {args.memory_dim}, depth {args.memory_depth}, {d_mem} "
            f"parameters ({copy / 2**20:.1f} MiB per float32 copy). Growth of the resident set "
            f"above the RSS before the guide / optimiser is built, one subprocess per method "
            f"({how}); 'setup': building + {config['warmup']} first steps (the fast path traces "
            f"in its first), 'steady': the {config['steps']} steps after those."
        )
        print(f"  {'method':<12}{'setup MiB':>11}{'copies':>8}{'steady MiB':>12}{'copies':>8}")
        for m in methods:
            a, b = mem[m]["setup"], mem[m]["steady"]
            print(f"  {m:<12}{a / 2**20:>11.1f}{a / copy:>8.1f}{b / 2**20:>12.1f}{b / copy:>8.1f}")
        for m in ("score_fast", "score_eager"):
            print(
                f"  {m} / SVI(Trace_ELBO): setup {mem[m]['setup'] / mem['elbo']['setup']:.2f}, "
                f"steady {mem[m]['steady'] / mem['elbo']['steady']:.2f}  (target <= 1.3)"
            )

    if "sweep" in parts:
        print(
            "\nStep time against the number of parameters (64-h-h-10 MLP, digits, same settings):"
        )
        print(f"  {'width':>6}{'params':>11}{'score_fast':>12}{'elbo':>10}{'adamw':>10}"
              f"{'fast/elbo':>11}{'fast/adamw':>11}")  # fmt: skip
        results["sweep"] = []
        for width in [int(w) for w in args.sweep.split(",")]:
            n = num_params(mlp(width))
            big = n > 3e6
            sweep_steps = {
                m: build_step(m, lambda w=width: mlp(w), x, y, args.batch, args.particles)[0]
                for m in ("score_fast", "elbo", "adamw")
            }
            # Up to 1e6 parameters: 3 rounds of 3-20 steps; beyond: one step after one warm-up.
            r, k = (1, 1) if args.quick or big else (3, min(20, max(2, int(3e6 / n))))
            ts = time_interleaved(sweep_steps, r, k, warmup=1 if big else 3)
            del sweep_steps
            gc.collect()
            results["sweep"].append({"width": width, "params": n, **ts})
            print(
                f"  {width:>6}{n:>11.2e}{1e3 * ts['score_fast']:>10.1f}ms{1e3 * ts['elbo']:>8.1f}ms"
                f"{1e3 * ts['adamw']:>8.1f}ms{ts['score_fast'] / ts['elbo']:>11.2f}"
                f"{ts['score_fast'] / ts['adamw']:>11.2f}"
            )
    print("\nHeld in memory per coordinate (on paper):")
    for name, text in held_per_coordinate():
        print(f"  {name}: {text}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
