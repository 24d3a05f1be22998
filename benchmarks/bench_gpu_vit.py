"""Step time and peak memory of ScoreProximalSVI on a ViT-B/16-sized Bayesian network (GPU).

ViT-B/16 shapes (12 layers, width 768, 12 heads, MLP 3072, 224x224 RGB images, patch 16, 1000
classes: 86.6M parameters), randomly initialised, on random images: nothing is downloaded. The
network is made Bayesian with :mod:`pyro_scorevi.nn` (every parameter a latent site with a
N(0, 1) prior; the ``AutoNormal`` guide starts at the network's initial weights) and fed
caller-drawn mini-batches (``BayesianClassifier(num_data=N)``: the likelihood is scaled by
N/B with N = 1,281,167, the size of ImageNet-1k). Each method is built, warmed up and timed in
turn in one process:

* ``score_fast``: ``ScoreProximalSVI(fast_path=True)`` (traced particle loop);
* ``score_eager``: ``ScoreProximalSVI(fast_path=False)``;
* ``score_compile`` (only when named in ``--methods``): ``fast_path="compile"``;
* ``elbo``: ``SVI(Trace_ELBO)`` with Adam, the same guide and particle count;
* ``adamw``: a plain AdamW step of the same (non-Bayesian) network, cross-entropy loss.

Step time: mean over ``--steps`` steps after ``--warmup`` steps (the first of ``score_fast``
traces), with ``torch.cuda.synchronize()`` around the timed loop. Peak memory:
``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``, over building the
method and its warm-up ("setup") and over the timed steps ("steady"), both minus the memory
allocated before the method was built (the data). On ``--device cpu`` the same columns hold the
growth of the resident set (``VmHWM`` reset through ``/proc/self/clear_refs``).

Run on a GPU (under 10 minutes on one H100):
``python benchmarks/bench_gpu_vit.py --json gpu_vit.json``.
Smoke test on CPU (a few seconds): ``python benchmarks/bench_gpu_vit.py --device cpu --tiny``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time

import pyro
import torch
import torch.nn.functional as F
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormal
from torch.fx.experimental.proxy_tensor import make_fx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_vit_cpu import (  # noqa: E402
    VisionTransformer,
    _reset_peak,
    _status_kb,
    num_params,
    peak_rss_kb,
    pin_mmap_threshold,
)

from pyro_scorevi import ScoreProximalSVI  # noqa: E402
from pyro_scorevi.nn import BayesianClassifier, bayesianize_, init_to_network  # noqa: E402

#: ViT-B/16 (Dosovitskiy et al., "An Image is Worth 16x16 Words", ICLR 2021, table 1).
VIT_B16 = dict(
    image_size=224, patch_size=16, in_chans=3, num_classes=1000, dim=768, depth=12, heads=12,
    mlp_dim=3072,
)  # fmt: skip
#: The same architecture, small enough for a CPU smoke test.
TINY = dict(
    image_size=32, patch_size=8, in_chans=3, num_classes=10, dim=64, depth=2, heads=4,
    mlp_dim=128,
)  # fmt: skip
IMAGENET_SIZE = 1_281_167  # N of the likelihood's N/B scaling
METHODS = ("score_fast", "score_eager", "elbo", "adamw")
#: Also accepted by --methods, not run by default: the fast path compiled by torch.compile
#: (minutes of compilation for ViT-B/16, which could break the 10-minute budget).
OPTIONAL_METHODS = ("score_compile",)


class Meter:
    """Peak memory above a baseline: CUDA allocator statistics, or the CPU resident set."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.exact = True

    def now(self) -> int:
        if self.cuda:
            return torch.cuda.memory_allocated(self.device)
        return 1024 * (_status_kb("VmRSS") or 0)

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.exact = _reset_peak() and self.exact

    def peak(self) -> int:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device)
        return 1024 * peak_rss_kb()

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)


def build(method: str, config: dict, x, y, particles: int, seed: int):
    """``step(idx)`` of ``method`` on a fresh network on ``x.device``; returns (step, objects)."""
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    net = VisionTransformer(**config).to(x.device)  # on its device before bayesianize_
    if method == "adamw":
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4)

        def step(idx):
            loss = F.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        return step, (net, opt)
    model = BayesianClassifier(bayesianize_(net), num_data=IMAGENET_SIZE)
    guide = AutoNormal(model, init_loc_fn=init_to_network, init_scale=1e-4)
    if method == "elbo":
        svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-4}), Trace_ELBO(num_particles=particles))
    else:
        fast_path = {"score_fast": True, "score_eager": False, "score_compile": "compile"}[method]
        svi = ScoreProximalSVI(model, guide, num_particles=particles, fast_path=fast_path)
    return (lambda idx: svi.step(x[idx], y[idx])), (model, guide, svi)


def run_method(method: str, args, config: dict, x, y, meter: Meter) -> dict:
    pyro.clear_param_store()  # free the previous method's guide before the baseline
    gc.collect()
    if meter.cuda:
        torch.cuda.empty_cache()
    meter.reset()
    base = meter.now()
    g = torch.Generator().manual_seed(args.seed)
    batches = [
        torch.randint(x.shape[0], (args.batch,), generator=g).to(x.device)
        for _ in range(args.warmup + args.steps)
    ]
    start = time.perf_counter()
    step, objects = build(method, config, x, y, args.particles, args.seed)
    for idx in batches[: args.warmup]:
        step(idx)
    meter.sync()
    setup_seconds = time.perf_counter() - start
    setup = meter.peak() - base
    meter.reset()
    start = time.perf_counter()
    for idx in batches[args.warmup :]:
        step(idx)
    meter.sync()
    seconds = (time.perf_counter() - start) / args.steps
    steady = meter.peak() - base
    del step, objects
    return {
        "step_seconds": seconds,
        "setup_seconds": setup_seconds,
        "peak_setup_bytes": setup,
        "peak_steady_bytes": steady,
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:1, cpu, ...")
    parser.add_argument("--tiny", action="store_true", help="a small ViT (CPU smoke test)")
    parser.add_argument("--batch", type=int, default=None, help="default 32 (tiny: 8)")
    parser.add_argument("--particles", type=int, default=2, help="S of both SVI methods")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--images", type=int, default=256, help="random images held on device")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default="bench_gpu_vit.json", help="where to write figures")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            f"--device {args.device}: CUDA is not available here; run on a GPU machine or pass "
            "--device cpu --tiny for a smoke test."
        )
    methods = args.methods.split(",")
    unknown = sorted(set(methods) - set(METHODS) - set(OPTIONAL_METHODS))
    if unknown:
        choices = ",".join(METHODS + OPTIONAL_METHODS)
        raise SystemExit(f"--methods: unknown {unknown}; choose from {choices}.")
    config = TINY if args.tiny else VIT_B16
    args.batch = args.batch or (8 if args.tiny else 32)
    if device.type == "cpu":
        pin_mmap_threshold()
        torch.set_num_threads(1)  # a shared CPU: one thread per method, like bench_vit_cpu
    meter = Meter(device)
    g = torch.Generator().manual_seed(args.seed)
    shape = (args.images, config["in_chans"], config["image_size"], config["image_size"])
    x = torch.randn(shape, generator=g).to(device)
    y = torch.randint(config["num_classes"], (args.images,), generator=g).to(device)
    d = num_params(VisionTransformer(**config))
    # Initialise the lazy machinery (CUDA context, cuBLAS, thread pools) outside the figures.
    prime = {**TINY, "num_classes": config["num_classes"], "image_size": config["image_size"]}
    build("adamw", prime, x, y, 1, args.seed)[0](torch.arange(2, device=device))
    make_fx(lambda a: (a * a).sum())(torch.ones(2, device=device))  # loads the tracing modules
    results = {
        "device": (
            torch.cuda.get_device_name(device) if meter.cuda else platform.machine() + " CPU"
        ),
        "torch": torch.__version__,
        "pyro": pyro.__version__,
        "config": config,
        "params": d,
        "batch": args.batch,
        "particles": args.particles,
        "warmup": args.warmup,
        "steps": args.steps,
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "memory": "cuda max_memory_allocated" if meter.cuda else "CPU resident set (VmHWM)",
        "methods": {},
    }
    total = time.perf_counter()
    for method in methods:
        results["methods"][method] = run_method(method, args, config, x, y, meter)
        print(f"{method}: done ({time.perf_counter() - total:.0f} s)", flush=True)
    results["memory_exact"] = meter.exact
    results["wall_seconds"] = time.perf_counter() - total

    copy = 4 * d
    print(
        f"\n{'ViT (tiny)' if args.tiny else 'ViT-B/16'} on {results['device']} ({device}): "
        f"{d / 1e6:.1f}M parameters ({copy / 2**20:.0f} MiB per float32 copy), batch "
        f"{args.batch}, S = {args.particles}; {args.steps} timed steps after {args.warmup}; "
        f"memory: {results['memory']} above the data"
    )
    print(f"{'method':<13}{'ms/step':>9}{'setup MiB':>11}{'steady MiB':>12}{'copies':>8}")
    m = results["methods"]
    for name, r in m.items():
        print(
            f"{name:<13}{1e3 * r['step_seconds']:>9.1f}{r['peak_setup_bytes'] / 2**20:>11.0f}"
            f"{r['peak_steady_bytes'] / 2**20:>12.0f}{r['peak_steady_bytes'] / copy:>8.1f}"
        )
    for name in ("score_fast", "score_eager", "score_compile"):
        if name not in m:
            continue
        for ref in ("adamw", "elbo"):
            if ref in m:
                t = m[name]["step_seconds"] / m[ref]["step_seconds"]
                ref_bytes = m[ref]["peak_steady_bytes"]
                # Below 1 MiB the ratio is noise (a --tiny run on CPU).
                mem = (
                    f"{m[name]['peak_steady_bytes'] / ref_bytes:.2f}"
                    if ref_bytes > 2**20
                    else "n/a"
                )
                print(f"{name} / {ref}: time {t:.2f}, steady peak memory {mem}")
    with open(args.json, "w") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {args.json} ({results['wall_seconds']:.0f} s)")
    return results


if __name__ == "__main__":
    main()
