"""Backend-free tests of pyro_scorevi.arviz: builders, run info, PSIS k-hat, LOO correction."""

from __future__ import annotations

import subprocess
import sys
import warnings

import numpy as np
import pytest

az = pytest.importorskip("arviz")

from pyro_scorevi.arviz import (  # noqa: E402
    LOG_P_VAR,
    LOG_Q_VAR,
    VI_GROUP,
    _common,
    vi_loo,
    vi_pareto_khat,
)


def test_import_needs_neither_torch_nor_jax():
    code = (
        "import sys, pyro_scorevi.arviz; "
        "bad = [m for m in ('torch', 'jax', 'pyro', 'numpyro') if m in sys.modules]; "
        "sys.exit(1 if bad else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_missing_arviz_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "arviz", None)
    with pytest.raises(ImportError, match=r'pip install "pyro_scorevi\[arviz\]"'):
        _common.require_arviz()


def test_missing_backend_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "numpyro", None)
    with pytest.raises(ImportError, match=r"pyro_scorevi\[numpyro,arviz\]"):
        _common.require_backend("numpyro", 'pip install "pyro_scorevi[numpyro,arviz]"')


def test_site_dims_from_plates():
    # value shape (batch: data=-2, feature=-1) + one event dim
    dims = _common.site_dims("w", 3, 1, [("data", -2), ("feature", -1)])
    assert dims == ["data", "feature", "w_dim_2"]
    # a plate that does not broadcast into this site's value keeps the default name
    assert _common.site_dims("s", 1, 0, [("outer", -2), ("data", -1)]) == ["data"]
    assert _common.site_dims("c", 0, 0, [("data", -1)]) == []


def test_merge_dims_validates():
    defaults = {"beta": ["feature"], "y": ["data"]}
    assert _common.merge_dims(defaults, {"y": ["obs_id"]}, defaults)["y"] == ["obs_id"]
    with pytest.raises(ValueError, match="'nope'"):
        _common.merge_dims(defaults, {"nope": ["x"]}, defaults)
    with pytest.raises(TypeError, match=r"dims\['y'\]"):
        _common.merge_dims(defaults, {"y": "obs_id"}, defaults)
    with pytest.raises(TypeError, match="dims must be a mapping"):
        _common.merge_dims(defaults, [("y", ["a"])], defaults)


def test_num_draws_validated():
    with pytest.raises(ValueError, match="num_draws >= 2"):
        _common.check_num_draws(1)
    with pytest.raises(TypeError, match="num_draws must be an int"):
        _common.check_num_draws(10.0)


def test_run_info_duck_typed_and_explicit_wins():
    class WithDict:
        losses = [3.0, 2.0, 1.0]

        def hyperparameters(self):
            return {"prox_weight": 100.0, "antithetic": True}

    losses, hp = _common.collect_run_info(WithDict())
    np.testing.assert_array_equal(losses, [3.0, 2.0, 1.0])
    assert hp == {"prox_weight": 100.0, "antithetic": True, "algorithm": "WithDict"}

    class WithAttrs:
        num_particles = 2
        prox_weight = 50.0
        loss_history = (5.0, 4.0)

    losses, hp = _common.collect_run_info(
        WithAttrs(), losses=[1.0], hyperparameters={"prox_weight": 10.0}
    )
    np.testing.assert_array_equal(losses, [1.0])
    assert hp == {"num_particles": 2, "prox_weight": 10.0, "algorithm": "WithAttrs"}
    with pytest.raises(ValueError, match="1-d"):
        _common.collect_run_info(losses=np.zeros((2, 2)))
    with pytest.raises(TypeError, match="hyperparameters must be a dict"):
        _common.collect_run_info(hyperparameters=[1, 2])


def _fake_export(rng, log_p, log_q, n_obs=15):
    s = log_p.size
    mu = rng.normal(size=s)
    y = rng.normal(size=n_obs)
    loglik = -0.5 * (y[None, :] - mu[:, None]) ** 2 - 0.5 * np.log(2 * np.pi)
    return _common.build(
        {
            "posterior": {"mu": mu[None]},
            "log_likelihood": {"y": loglik[None]},
            "posterior_predictive": {"y": rng.normal(mu[:, None], 1.0, (s, n_obs))[None]},
            "observed_data": {"y": y},
            "sample_stats": {LOG_P_VAR: log_p[None], LOG_Q_VAR: log_q[None]},
        },
        dims={"y": ["data"]},
        coords={"data": np.arange(100, 100 + n_obs)},
        losses=np.array([3.0, 2.0, 1.5]),
        hyperparameters={"prox_weight": 100.0, "antithetic": True, "schedule": object()},
        attrs={"inference_library": "test"},
    )


def test_build_layout(azh):
    rng = np.random.default_rng(0)
    data = _fake_export(rng, rng.normal(size=200), rng.normal(size=200))
    assert {"posterior", "log_likelihood", "posterior_predictive", "observed_data"} <= (
        azh.group_names(data)
    )
    post = azh.group(data, "posterior")
    assert dict(post.sizes) == {"chain": 1, "draw": 200}
    assert post.attrs["prox_weight"] == 100.0
    assert post.attrs["antithetic"] == 1  # bools stored as 0/1 (netCDF has no bool attrs)
    assert post.attrs["inference_library"] == "test"
    ll = azh.group(data, "log_likelihood")["y"]
    assert ll.dims == ("chain", "draw", "data")
    assert list(ll["data"].values) == list(range(100, 115))
    vi = azh.group(data, VI_GROUP)
    assert vi["loss"].dims == ("vi_step",)
    np.testing.assert_array_equal(vi["loss"].values, [3.0, 2.0, 1.5])
    assert vi.attrs["schedule"].startswith("<object")
    azh.run(data, ["mu"])


def test_khat_known_tails():
    rng = np.random.default_rng(1)
    # exp(lw) ~ Pareto with shape xi has tail index k = xi: w = U^(-xi).
    for xi in (0.2, 0.9):
        lw = -xi * np.log(rng.uniform(size=4000))
        res = vi_pareto_khat(log_weights=lw)
        # Monte Carlo tier: the GPD fit on ~190 tail draws has sd of about 0.1.
        assert abs(res.khat - xi) < 0.2, (xi, res.khat)
        assert res.ok == (res.khat <= res.good_k)
    # identical weights (q = p up to normalisation): no tail at all
    res = vi_pareto_khat(log_weights=np.full(100, -3.0))
    assert res.khat == -np.inf and res.ok
    np.testing.assert_allclose(res.smoothed_log_weights, -np.log(100))
    # float jitter around a constant (an exact fit in float32) is a good fit too
    assert vi_pareto_khat(log_weights=-3.0 + 1e-6 * rng.standard_normal(1000)).khat < 0.5


def test_khat_from_export_and_argument_errors(azh):
    rng = np.random.default_rng(2)
    log_q = rng.normal(size=500)
    data = _fake_export(rng, log_q + 0.01 * rng.normal(size=500), log_q)
    res = vi_pareto_khat(data)
    assert res.log_weights.shape == (500,) and res.smoothed_log_weights.shape == (500,)
    assert res.khat < 0.5 and res.ok
    # smoothed weights are self-normalised
    np.testing.assert_allclose(np.exp(res.smoothed_log_weights).sum(), 1.0, rtol=1e-6)
    with pytest.raises(ValueError, match="exactly one"):
        vi_pareto_khat()
    with pytest.raises(ValueError, match="exactly one"):
        vi_pareto_khat(data, log_weights=np.zeros(10))
    with pytest.raises(ValueError, match="non-finite"):
        vi_pareto_khat(log_weights=np.array([0.0, 1.0, -np.inf, 2.0, 3.0, 1.0]))
    with pytest.raises(ValueError, match="at least 5"):
        vi_pareto_khat(log_weights=np.zeros(3))


def test_vi_loo_without_correction_matches_az_loo(azh):
    # log p - log q constant: the p/q correction is void and the result must equal az.loo.
    rng = np.random.default_rng(3)
    log_q = rng.normal(size=400)
    data = _fake_export(rng, log_q + 2.0, log_q)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        ours = vi_loo(data, pointwise=True)
        ref = az.loo(data, pointwise=True, **({} if azh.datatree else {"reff": 1.0}))
    # identity tier, up to the r_eff ArviZ 1.x estimates for one chain of iid draws
    tol = 1e-2 if azh.datatree else 1e-8
    np.testing.assert_allclose(azh.elpd(ours), azh.elpd(ref), rtol=tol)
    k_ours = np.asarray(ours.pareto_k).ravel()
    assert k_ours.shape == (15,)


def test_vi_loo_correction_moves_elpd(azh):
    # A heavy p/q correction must change the estimate and raise the pointwise k-hats.
    rng = np.random.default_rng(4)
    log_q = rng.normal(size=400)
    flat = _fake_export(rng, log_q, log_q)
    rng = np.random.default_rng(4)
    log_q = rng.normal(size=400)
    tilted = _fake_export(rng, log_q + 3.0 * rng.standard_normal(400), log_q)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        a, b = vi_loo(flat, pointwise=True), vi_loo(tilted, pointwise=True)
    assert np.max(np.asarray(b.pareto_k)) > np.max(np.asarray(a.pareto_k))
    assert azh.elpd(a) != azh.elpd(b)
