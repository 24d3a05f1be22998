"""Tests of the comparison package: metrics, twin models, and every problem at a tiny budget."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("pyro")
pytest.importorskip("sklearn")
pytest.importorskip("statsmodels")
pytest.importorskip("matplotlib")

from pyro_scorevi.compare import metrics as M  # noqa: E402
from pyro_scorevi.compare import report  # noqa: E402
from pyro_scorevi.compare.problems import PROBLEMS, get_problem, nuts_reference  # noqa: E402
from pyro_scorevi.compare.runner import (  # noqa: E402
    Budget,
    Settings,
    ivon_available,
    numpyro_available,
    run_comparison,
)

#: Settings of the smoke runs: a handful of steps and draws, enough to exercise every code path.
TINY = Settings(num_particles=2, eval_samples=4, elbo_particles=2, checkpoints=2)

EXPECTED = {
    "gaussian": {"kl_gap", "neg_elbo", "mean_z_rmse", "log_sd_rmse"},
    "posterior": {"mean_z_rmse", "log_sd_rmse", "log_sd_bias", "neg_elbo"},
    "classifier": {"nll", "accuracy", "ece", "brier", "neg_elbo"},
    "forecaster": {"mse", "mae", "crps", "coverage90", "neg_elbo"},
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # The test machines are shared: one torch thread avoids oversubscription stalls.
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# -- metrics (identities: 1e-6; Monte Carlo: a few standard errors) ---------------------------


def test_crps_matches_normal_closed_form():
    from math import erf, exp, pi, sqrt

    rng = np.random.default_rng(0)
    y = rng.normal(size=40)
    draws = rng.normal(size=(20000, 40))
    cdf = np.array([0.5 * (1 + erf(v / sqrt(2))) for v in y])
    pdf = np.array([exp(-v * v / 2) / sqrt(2 * pi) for v in y])
    exact = np.mean(y * (2 * cdf - 1) + 2 * pdf - 1 / sqrt(pi))
    # MC error of the mean over 40 points with 20000 draws is ~3e-3.
    assert M.crps(draws, y) == pytest.approx(exact, abs=1e-2)


def test_crps_of_point_mass_is_absolute_error():
    y = np.array([0.0, 1.0, -2.0])
    draws = np.tile(np.array([1.0, 1.0, 1.0]), (5, 1))
    assert M.crps(draws, y) == pytest.approx(np.mean(np.abs(1.0 - y)), abs=1e-12)


def test_classifier_metrics_on_perfect_and_uniform_predictions():
    y = np.array([0, 1, 2, 1])
    perfect = np.eye(3)[y]
    assert M.accuracy(perfect, y) == 1.0
    assert M.nll(perfect, y) == pytest.approx(0.0, abs=1e-9)
    assert M.brier(perfect, y) == pytest.approx(0.0, abs=1e-12)
    assert M.ece(perfect, y) == pytest.approx(0.0, abs=1e-12)
    uniform = np.full((4, 3), 1 / 3)
    assert M.nll(uniform, y) == pytest.approx(math.log(3), abs=1e-12)
    assert M.brier(uniform, y) == pytest.approx(2 / 3, abs=1e-12)


def test_ece_of_calibrated_forecasts_is_small():
    rng = np.random.default_rng(1)
    n = 20000
    conf = rng.uniform(0.5, 1.0, n)
    correct = rng.uniform(size=n) < conf
    y = np.where(correct, 0, 1)
    probs = np.stack([conf, 1 - conf], -1)
    assert M.ece(probs, y) < 0.02
    conf_b, acc_b, count = M.reliability(probs, y)
    assert count.sum() == n and len(count) == M.ECE_BINS == 15


def test_coverage_and_gaussian_kl():
    rng = np.random.default_rng(2)
    draws = rng.normal(size=(4000, 2000))
    y = rng.normal(size=2000)
    assert M.coverage(draws, y, 0.9) == pytest.approx(0.9, abs=0.03)
    prec = np.array([[2.0, 0.5], [0.5, 1.0]])
    mu = np.array([1.0, -1.0])
    assert M.gaussian_kl(mu, 1 / np.sqrt(np.diag(prec)), mu, prec) > 0  # mean-field gap
    cov = np.diag([0.5, 2.0])
    assert M.gaussian_kl(mu, np.sqrt(np.diag(cov)), mu, np.linalg.inv(cov)) == pytest.approx(
        0.0, abs=1e-12
    )


# -- problems and ground truth -----------------------------------------------------------------


def test_nuts_reference_is_complete():
    ref = nuts_reference()
    n = sum(s.size for s in get_problem("logreg").load()[0].latents)
    assert len(ref["mean"]) == len(ref["sd"]) == n
    assert all(s > 0 for s in ref["sd"])
    assert ref["max_r_hat"] < 1.01 and ref["min_n_eff"] > 1000


def test_unknown_problem_names_the_choices():
    with pytest.raises(KeyError, match="digits-mlp"):
        get_problem("nope")


@pytest.mark.skipif(not numpyro_available()[0], reason="NumPyro backend not importable")
@pytest.mark.parametrize(
    "name", ["logreg", pytest.param("digits-vit", marks=pytest.mark.slow), "sunspots"]
)
def test_pyro_and_numpyro_twins_have_the_same_log_joint(name):
    # Parity tier (float32 models): 1e-4 relative.
    import jax
    import numpyro
    import pyro
    import torch

    problem = get_problem(name)
    rng = np.random.default_rng(0)
    values = {
        s.name: (np.abs if s.positive else np.asarray)(
            rng.normal(scale=0.3, size=s.shape).astype(np.float32) + (0.5 if s.positive else 0)
        )
        for s in problem.load()[0].latents
    }
    model, args, kwargs = problem.pyro_model_and_args(full_batch=True)
    cond = pyro.poutine.condition(model, {k: torch.as_tensor(v) for k, v in values.items()})
    lp_pyro = pyro.poutine.trace(cond).get_trace(*args, **kwargs).log_prob_sum().item()
    nmodel, nargs, nkwargs = problem.numpyro_model_and_args(full_batch=True)
    lp_np, _ = numpyro.infer.util.log_density(
        nmodel, nargs, nkwargs, {k: jax.numpy.asarray(v) for k, v in values.items()}
    )
    assert float(lp_np) == pytest.approx(lp_pyro, rel=1e-4)


# -- every problem at a tiny budget -------------------------------------------------------------


def _check_complete(result, kind, methods):
    assert set(result["summary"]) == set(methods)
    for key in methods:
        for which in ("equal_evals", "equal_time"):
            block = result["summary"][key][which]
            assert EXPECTED[kind] <= set(block), (key, which, set(block))
            for name, stat in block.items():
                assert stat["mean"] is not None and math.isfinite(stat["mean"]), (key, name)
                assert all(v is not None and math.isfinite(v) for v in stat["values"]), name


@pytest.mark.parametrize("name", list(PROBLEMS))
def test_every_problem_runs_at_a_tiny_budget(name, tmp_path):
    problem = get_problem(name)
    result = run_comparison(
        problem, seeds=[0, 1], budget=Budget(grad_evals=4), settings=TINY, progress=False
    )
    # The default rows: IVON joins on the network problems (when ivon-opt is installed).
    expected = ["pyro-elbo", "pyro-scoreprox"]
    if problem.kind in ("classifier", "forecaster") and ivon_available()[0]:
        expected.append("pyro-ivon")
    assert list(result["methods"]) == expected
    _check_complete(result, problem.kind, expected)
    for run in result["runs"]:
        assert run["equal_evals"]["grad_evals"] == 4
        # Default time budget: the baseline's time, reached by the challenger too.
        base = next(
            r for r in result["runs"] if r["seed"] == run["seed"] and r["method"] == "pyro-elbo"
        )
        assert run["equal_time"]["wall_s"] >= base["equal_evals"]["wall_s"]
        assert len(run["curve"]["loss"]) == len(run["curve"]["grad_evals"]) > 0
        assert all(v is not None and math.isfinite(v) for v in run["curve"]["loss"])
    # The JSON is strict (no NaN) and round-trips; the plots are written.
    path = tmp_path / "r.json"
    report.write_json({"problems": {name: result}}, path)
    assert json.loads(path.read_text())["problems"][name]["summary"] == result["summary"]
    pngs = report.write_plots(result, tmp_path)
    assert pngs and all(p.stat().st_size > 1000 for p in pngs)
    expected_plots = {"classifier": 2, "forecaster": 2}.get(problem.kind, 1)
    assert len(pngs) == expected_plots
    table = report.format_table(result)
    assert "Pyro ScoreProximalSVI" in table and "= time" in table


def test_given_time_budget_is_met_by_both_methods():
    result = run_comparison(
        get_problem("gaussian"),
        seeds=[0],
        budget=Budget(grad_evals=2, seconds=0.05),
        settings=TINY,
        progress=False,
    )
    for run in result["runs"]:
        assert run["equal_evals"]["grad_evals"] == 2
        assert run["equal_time"]["wall_s"] >= 0.05


@pytest.mark.skipif(not numpyro_available()[0], reason="NumPyro backend not importable")
def test_proximal_weights_come_from_settings_else_the_problem():
    from dataclasses import replace

    from pyro_scorevi.compare.runner import _proximal_weights

    vit = get_problem("digits-vit")
    assert _proximal_weights(vit, TINY) == {
        "prox_weight": vit.prox_weight,
        "scale_prox_weight": vit.scale_prox_weight,
    }
    # A given prox_weight alone is the paper's single weight, not mixed with the problem's
    # scale weight.
    given = replace(TINY, prox_weight=50.0)
    assert _proximal_weights(vit, given) == {"prox_weight": 50.0, "scale_prox_weight": None}
    both = replace(TINY, prox_weight=50.0, scale_prox_weight=500.0)
    assert _proximal_weights(vit, both) == {"prox_weight": 50.0, "scale_prox_weight": 500.0}


@pytest.mark.slow  # 15-20 s; CI runs it with the slow tests
def test_numpyro_columns_join():
    problem = get_problem("logreg")
    result = run_comparison(
        problem,
        seeds=[0],
        budget=Budget(grad_evals=4),
        settings=TINY,
        backends=("pyro", "numpyro"),
        progress=False,
    )
    methods = ["pyro-elbo", "pyro-scoreprox", "numpyro-elbo", "numpyro-scoreprox"]
    _check_complete(result, problem.kind, methods)
    verdict = report.format_verdict(result)
    # Score-proximal vs ELBO per backend and budget, then every method ranked per budget on
    # the headline and on -ELBO.
    assert [v.split()[0] for v in verdict[:4]] == ["pyro", "pyro", "numpyro", "numpyro"]
    assert verdict[4:] == report.format_ranking(result) and len(verdict[4:]) == 4
    assert verdict[4].startswith("= evals: best mean err (sd)")
    assert any("ivon: not run on logreg" in n for n in result["skipped"])
