"""Makes the NUTS references of the posterior suite (``pyro_scorevi.compare.posteriors``).

For each posterior, runs NumPyro NUTS (float64, dense mass matrix, ``init_to_median``) on the
full-data NumPyro model and caches, per latent site: the mean and sd of every coordinate in the
unconstrained space ``AutoNormal`` fits (``biject_to(support).inv`` of the draws; Pyro's
``<site>_unconstrained``), the mean-field sd ``1 / sqrt(diag(Cov^-1))`` of those coordinates
(what a diagonal Gaussian fitted by KL(q || p) to a Gaussian posterior would have), the
constrained means and sds, and the diagnostics (max r_hat and min n_eff over the unconstrained
coordinates, divergences, the largest absolute posterior correlation). A posterior whose max
r_hat is not below ``--max-r-hat`` (1.01) is re-run once with twice the draws and, failing
again, reported and left out (exit status 1).

Writes ``pyro_scorevi/data/posterior_references.json``, merging into the existing file, so
``--posteriors a,b`` refreshes only those.

Usage (5-7 minutes for all on 2 shared CPU cores)::

    python benchmarks/make_posterior_references.py [--posteriors all] [--chains 4]
        [--warmup 1000] [--samples 2000] [--seed 0]
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

DEFAULT_OUT = pathlib.Path(__file__).resolve().parents[1] / "pyro_scorevi" / "data"
DEFAULT_OUT = DEFAULT_OUT / "posterior_references.json"


def data_fingerprint(data: dict[str, np.ndarray]) -> str:
    """SHA-256 (first 16 hex digits) of the posterior's arrays, cast to float32 so that a last-bit
    difference of a libm function does not change it."""
    h = hashlib.sha256()
    for k in sorted(data):
        h.update(k.encode())
        h.update(np.ascontiguousarray(np.asarray(data[k], dtype=np.float32)).tobytes())
    return h.hexdigest()[:16]


def run_nuts(
    posterior, chains: int, warmup: int, samples: int, seed: int, target: float, sites=None
):
    """NUTS draws summarised per latent site (unconstrained mean, sd, mean-field sd);
    ``sites``: ``(name, support)`` to record instead of the model's own latent sites (a twin
    parametrisation whose deterministic sites are the target's latents)."""
    import jax
    from numpyro.diagnostics import summary
    from numpyro.distributions.transforms import biject_to
    from numpyro.infer import MCMC, NUTS, init_to_median

    from pyro_scorevi.compare.posteriors import latent_sites

    model, args, kwargs = posterior.numpyro_model_and_args(full_batch=True)
    kernel = NUTS(model, dense_mass=True, target_accept_prob=target, init_strategy=init_to_median)
    mcmc = MCMC(
        kernel,
        num_warmup=warmup,
        num_samples=samples,
        num_chains=chains,
        chain_method="sequential",
        progress_bar=False,
    )
    mcmc.run(jax.random.PRNGKey(seed), *args, extra_fields=("diverging",), **kwargs)
    draws = mcmc.get_samples(group_by_chain=True)
    divergences = int(np.sum(np.asarray(mcmc.get_extra_fields()["diverging"])))
    latents, flat = {}, []
    sites = sites or latent_sites(posterior)
    for name, support in sites:
        x = np.asarray(draws[name], dtype=float)  # (chains, samples, *shape)
        z = np.asarray(biject_to(support).inv(x), dtype=float)
        shape = list(x.shape[2:])
        ushape = list(z.shape[2:])
        zf = z.reshape(chains, samples, -1)
        xf = x.reshape(chains * samples, -1)
        flat.append(zf)
        latents[name] = {
            "shape": shape,
            "unconstrained_shape": ushape,
            "support": str(support),
            "mean": zf.reshape(chains * samples, -1).mean(0).tolist(),
            "sd": zf.reshape(chains * samples, -1).std(0, ddof=1).tolist(),
            "constrained_mean": xf.mean(0).tolist(),
            "constrained_sd": xf.std(0, ddof=1).tolist(),
        }
    joint = np.concatenate(flat, -1)
    stats = summary(joint, group_by_chain=True)["Param:0"]
    # The mean-field target: a diagonal Gaussian fitted by KL(q || p) to a Gaussian posterior
    # has sd_j = 1 / sqrt(Lambda_jj) (Lambda = Cov^-1), below the marginal sd where the latents
    # correlate. Recorded per coordinate, so that a sd ratio can be read against either.
    cov = np.atleast_2d(np.cov(joint.reshape(chains * samples, -1), rowvar=False))
    mf_sd = 1.0 / np.sqrt(np.diag(np.linalg.inv(cov)))
    corr = cov / np.sqrt(np.outer(np.diag(cov), np.diag(cov)))
    np.fill_diagonal(corr, 0.0)
    offset = 0
    for name in latents:
        n = len(latents[name]["mean"])
        latents[name]["meanfield_sd"] = mf_sd[offset : offset + n].tolist()
        offset += n
    diag = {
        "max_r_hat": float(np.max(stats["r_hat"])),
        "min_n_eff": float(np.min(stats["n_eff"])),
        "divergences": divergences,
        "max_abs_correlation": float(np.max(np.abs(corr))) if corr.size else 0.0,
        "chains": chains,
        "warmup": warmup,
        "samples": samples,
        "seed": seed,
        "target_accept_prob": target,
    }
    return [n for n, _ in sites], latents, diag


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--posteriors", default="all", help="comma-separated names, or 'all'")
    parser.add_argument("--chains", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1000)
    parser.add_argument("--samples", type=int, default=2000, help="draws per chain")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--target-accept", type=float, default=0.9)
    parser.add_argument("--max-r-hat", type=float, default=1.01)
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)

    import numpyro

    numpyro.enable_x64()
    numpyro.set_host_device_count(1)

    from pyro_scorevi.compare.posteriors import POSTERIORS, get_posterior

    names = list(POSTERIORS) if args.posteriors == "all" else args.posteriors.split(",")
    record = (
        json.loads(args.out.read_text()) if args.out.exists() else {"format": 1, "posteriors": {}}
    )
    record["sampler"] = (
        "numpyro NUTS, float64, dense mass matrix, init_to_median; per posterior see diagnostics"
    )
    failed = []
    for name in names:
        posterior = get_posterior(name)
        samples, t0 = args.samples, time.perf_counter()
        for attempt in range(2):
            sites, latents, diag = run_nuts(
                posterior,
                args.chains,
                args.warmup,
                samples,
                args.seed + attempt,
                args.target_accept,
            )
            if diag["max_r_hat"] < args.max_r_hat:
                break
            print(f"{name}: max r_hat {diag['max_r_hat']:.4f}; retrying with {2 * samples} draws")
            samples *= 2
        diag["seconds"] = round(time.perf_counter() - t0, 1)
        ok = diag["max_r_hat"] < args.max_r_hat
        dim = sum(int(np.prod(v["unconstrained_shape"])) for v in latents.values())
        print(
            f"{name:22s} d={dim:3d}"
            f" max r_hat {diag['max_r_hat']:.4f} min n_eff {diag['min_n_eff']:7.0f}"
            f" divergences {diag['divergences']:3d} {diag['seconds']:6.1f} s"
            + ("" if ok else "  FAILED (not written)"),
            flush=True,
        )
        if not ok:
            failed.append(name)
            continue
        record["posteriors"][name] = {
            "description": posterior.description,
            "data_fingerprint": data_fingerprint(posterior.data()),
            "sites": sites,
            "latents": latents,
            "diagnostics": diag,
        }
        record["command"] = "python benchmarks/make_posterior_references.py " + " ".join(
            argv if argv is not None else sys.argv[1:]
        )
        # Written after each posterior, so an interrupted run keeps what it finished.
        record["posteriors"] = dict(sorted(record["posteriors"].items(), key=_registry_order))
        args.out.write_text(json.dumps(record, indent=1) + "\n")
    if failed:
        print("not converged:", ", ".join(failed))
        return 1
    return 0


def _registry_order(item):
    from pyro_scorevi.compare.posteriors import POSTERIORS

    keys = list(POSTERIORS)
    return keys.index(item[0]) if item[0] in keys else len(keys)


if __name__ == "__main__":
    sys.exit(main())
