"""The posterior suite of issue 11: the Pyro/NumPyro mirror, the cached references, the runner.

The key check is the mirror: each posterior's Pyro and NumPyro models must be the same density
(same sites, same supports, same likelihood scaling), or the two backends' columns of the table
compare different posteriors. It is checked at points near the reference mean in float64.
"""

from __future__ import annotations

import importlib.util
import json
import math
import pathlib
import sys

import numpy as np
import pytest

pytest.importorskip("numpyro")
pytest.importorskip("sklearn")
pytest.importorskip("statsmodels")

import jax  # noqa: E402

from pyro_scorevi.compare import posteriors as P  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
NAMES = list(P.POSTERIORS)


def _load_script(name: str):
    """Imports ``benchmarks/<name>.py`` once (registered in ``sys.modules``, which its
    dataclasses need)."""
    key = f"_benchmarks_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, ROOT / "benchmarks" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]


def _point(name: str, rng, spread: float) -> dict[str, np.ndarray]:
    """The reference mean plus ``spread`` reference sds of noise, per site (unconstrained)."""
    ref = P.reference(name)
    out = {}
    for site in ref["sites"]:
        lat = ref["latents"][site]
        mean, sd = np.asarray(lat["mean"]), np.asarray(lat["sd"])
        z = mean + spread * sd * rng.standard_normal(mean.shape)
        out[site] = z.reshape(lat["unconstrained_shape"])
    return out


def test_registry_has_the_issue_posteriors():
    assert len(NAMES) >= 12
    for p in P.POSTERIORS.values():
        assert p.description and p.why
    assert P.get_posterior("subsampled-linreg").batch_size == 64
    with pytest.raises(KeyError, match="choose from"):
        P.get_posterior("nope")


@pytest.mark.parametrize("name", NAMES)
def test_pyro_and_numpyro_models_are_the_same_density(name):
    posterior = P.get_posterior(name)
    rng = np.random.default_rng(0)
    for spread in (0.0, 1.0):
        point = _point(name, rng, spread)
        with jax.enable_x64(True):
            lp_numpyro = float(P.numpyro_log_density(posterior, point))
        lp_pyro = float(P.pyro_log_density(posterior, point))
        assert math.isfinite(lp_pyro) and math.isfinite(lp_numpyro)
        assert lp_pyro == pytest.approx(lp_numpyro, rel=1e-4, abs=1e-6), (name, spread)


@pytest.mark.parametrize("name", NAMES)
def test_reference_is_cached_with_the_model_coordinates(name):
    from numpyro.distributions.transforms import biject_to

    posterior = P.get_posterior(name)
    ref = P.reference(name)
    sites = P.latent_sites(posterior)
    assert ref["sites"] == [n for n, _ in sites]
    ref_script = _load_script("make_posterior_references")
    assert ref["data_fingerprint"] == ref_script.data_fingerprint(posterior.data()), (
        "the data changed since the reference was made: rerun "
        f"python benchmarks/make_posterior_references.py --posteriors {name}"
    )
    model, args, kwargs = posterior.numpyro_model_and_args(full_batch=True)
    from numpyro import handlers

    tr = handlers.trace(handlers.seed(model, 0)).get_trace(*args, **kwargs)
    for site, support in sites:
        lat = ref["latents"][site]
        u = biject_to(support).inv(tr[site]["value"])
        assert list(np.shape(u)) == lat["unconstrained_shape"]
        assert list(np.shape(tr[site]["value"])) == lat["shape"]
        n = int(np.prod(lat["unconstrained_shape"]))
        assert len(lat["mean"]) == len(lat["sd"]) == n
        assert np.all(np.isfinite(lat["mean"])) and np.all(np.asarray(lat["sd"]) > 0)
        assert len(lat["constrained_mean"]) == int(np.prod(lat["shape"]))
    diag = ref["diagnostics"]
    assert diag["max_r_hat"] < 1.01
    assert diag["min_n_eff"] > 400


@pytest.mark.slow  # 15-20 s; CI runs it with the slow tests
def test_flat_target_matches_numpyro_log_density():
    posterior = P.get_posterior("eight-schools")
    target = P.flat_target(posterior)
    point = _point("eight-schools", np.random.default_rng(1), 0.5)
    theta = target.ravel(point)[None]
    log_p, grad = target.score_fn(np.repeat(theta, 2, 0), jax.random.PRNGKey(0))
    assert log_p.shape == (2,) and grad.shape == (2, target.dim)
    expected = float(P.numpyro_log_density(posterior, point))
    assert float(log_p[0]) == pytest.approx(expected, rel=1e-4)
    # Subsampled: the mini-batch comes from the key; the same key, the same batch.
    sub = P.flat_target(P.get_posterior("subsampled-linreg"))
    theta = np.zeros((3, sub.dim), np.float32)
    a, _ = sub.score_fn(theta, jax.random.PRNGKey(3))
    b, _ = sub.score_fn(theta, jax.random.PRNGKey(3))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow  # 15-20 s; CI runs it with the slow tests
def test_tiny_suite_gives_a_complete_finite_table(tmp_path, capsys):
    suite = _load_script("posterior_suite")
    out = tmp_path / "suite.json"
    names = ["raw-linreg-issue", "eight-schools"]
    methods = list(suite.DEFAULT_METHODS)
    suite.main(
        [
            "--posteriors",
            ",".join(names),
            "--methods",
            ",".join(methods),
            "--seeds",
            "0",
            "--evals",
            "40",
            "--out",
            str(out),
            "--quiet",
        ]
    )
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert {(r["posterior"], r["method"]) for r in rows} == {(p, m) for p in names for m in methods}
    for r in rows:
        assert "crash" not in r["flags"], r.get("error")
        assert r["steps"] == 40 // result["num_particles"]
        for key in ("mean_err", "max_err", "sd_ratio", "wall"):
            assert math.isfinite(r[key]), (r["posterior"], r["method"], key)
        dim = sum(len(v["mean"]) for v in P.reference(r["posterior"])["latents"].values())
        assert len(r["loc"]) == len(r["scale"]) == dim
    assert len(result["aggregate"]) == len(names) * len(methods)
    table = suite.markdown_table(result["aggregate"])
    assert table.count("\n") == 1 + len(names) * len(methods)
    # --render reprints the tables from the JSON without fitting.
    capsys.readouterr()
    assert suite.main(["--render", str(out)]) == 0
    printed = capsys.readouterr().out
    assert table in printed and "Issue 11 criterion" in printed


def test_stuck_and_crash_flags():
    suite = _load_script("posterior_suite")
    posterior = P.get_posterior("raw-linreg-issue")
    ref = P.reference(posterior.name)
    far = {n: np.asarray(ref["latents"][n]["mean"]) + 50.0 for n in ref["sites"]}
    far = {n: v.reshape(ref["latents"][n]["unconstrained_shape"]) for n, v in far.items()}
    scale = {n: np.ones_like(v) for n, v in far.items()}
    steps = 100
    fit = suite.FitResult(far, scale, far, steps, 0, np.zeros(steps, bool), 1.0)
    assert suite.score_fit(posterior, fit)["flags"] == ["stuck"]  # far and not moving
    bad = np.zeros(steps, bool)
    bad[-10:] = True
    fit = suite.FitResult(far, scale, None, steps, 10, bad, 1.0)
    assert "stuck" in suite.score_fit(posterior, fit)["flags"]  # last 10% all rejected

    def boom(posterior, seed, evals):
        raise RuntimeError("boom")

    row = suite.run_one(posterior, suite.Method("boom", "boom", "none", "none", boom), 0, 10)
    assert row["flags"] == ["crash"] and "boom" in row["error"]
