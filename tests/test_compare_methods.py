"""Tests of the comparison's other methods: GSM and BaM (known answers of the papers), IVON's
adapter (against a plain ``ivon-opt`` loop), and every method on every problem at a tiny budget.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("pyro")
pytest.importorskip("sklearn")
pytest.importorskip("statsmodels")
jax = pytest.importorskip("jax")
pytest.importorskip("numpyro")

import jax.numpy as jnp  # noqa: E402

from pyro_scorevi.compare import gsm_bam, report  # noqa: E402
from pyro_scorevi.compare.problems import PROBLEMS, get_problem  # noqa: E402
from pyro_scorevi.compare.runner import (  # noqa: E402
    Budget,
    NoMethodApplies,
    Settings,
    neg_elbo_full_rank,
    numpyro_score_fn,
    run_comparison,
    select_methods,
)

TINY = Settings(num_particles=2, eval_samples=4, elbo_particles=2, checkpoints=2)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _dense_gaussian(d: int, seed: int = 0):
    """A Gaussian target with a dense covariance (condition number 100) and its score."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    cov = (q * np.exp(rng.uniform(np.log(0.1), np.log(10.0), d))) @ q.T
    mu = rng.standard_normal(d)
    prec = jnp.asarray(np.linalg.inv(cov), jnp.float32)
    m = jnp.asarray(mu, jnp.float32)

    def score_fn(theta, key):
        r = theta - m
        return -0.5 * jnp.sum((r @ prec) * r, -1), -(r @ prec)

    return mu, cov, score_fn


# -- GSM and BaM: known answers --------------------------------------------------------------


@pytest.mark.parametrize("fit", [gsm_bam.fit_gsm, gsm_bam.fit_bam])
@pytest.mark.parametrize("batch_size", [1, 5])
def test_full_rank_methods_recover_a_dense_gaussian(fit, batch_size):
    # Exact scores of a Gaussian target: the target is the fixed point of both updates
    # (Modi et al 2023; Cai et al 2024), reached to float32 precision (measured 1e-6).
    d = 6
    mu, cov, score_fn = _dense_gaussian(d)
    out = fit(
        score_fn, jnp.zeros(d), jnp.eye(d), 400, batch_size=batch_size, key=jax.random.PRNGKey(1)
    )
    assert np.max(np.abs(np.asarray(out.loc) - mu)) < 1e-3
    assert np.max(np.abs(np.asarray(out.cov) - cov)) < 1e-3 * np.max(np.abs(cov))
    assert out.num_rejected == 0
    assert out.history.shape == (400,) and np.all(np.isfinite(out.history))
    # The -ELBO estimate at the optimum averages to -log Z = -(d/2) log(2 pi) - log det(cov)/2;
    # one draw's sd is sqrt(d/2) (a chi-square), so 200 draws' mean is within 0.5 (4 sd).
    log_z = 0.5 * d * math.log(2 * math.pi) + 0.5 * np.linalg.slogdet(cov)[1]
    assert np.mean(out.history[-200:]) == pytest.approx(-log_z, abs=0.5)


def test_bam_with_a_large_weight_recovers_a_gaussian_in_one_step():
    # Cai et al 2024: with B >= d + 1 draws and lambda -> infinity, one BaM step on a Gaussian
    # target returns the target (Sigma Gamma Sigma = C and mu = z_bar + Sigma g_bar).
    d = 4
    mu, cov, score_fn = _dense_gaussian(d, seed=3)
    out = gsm_bam.fit_bam(
        score_fn,
        jnp.zeros(d),
        jnp.eye(d),
        1,
        batch_size=3 * d,
        key=jax.random.PRNGKey(0),
        schedule=1e6,
    )
    assert np.max(np.abs(np.asarray(out.loc) - mu)) < 1e-2
    assert np.max(np.abs(np.asarray(out.cov) - cov)) < 1e-2 * np.max(np.abs(cov))


def test_bam_default_schedule_is_the_papers():
    lam = gsm_bam.bam_schedule(batch_size=5, dim=4)
    assert [float(lam(jnp.asarray(t, jnp.float32))) for t in (0, 1, 9)] == [20.0, 10.0, 2.0]


def test_gsm_update_matches_the_score_of_a_single_draw():
    # GSM's per-draw update makes the new q's score equal g at z (Modi et al 2023, eq. 8):
    # -Sigma_new^{-1} (z - mu_new) = g.
    rng = np.random.default_rng(5)
    d = 3
    a = rng.standard_normal((d, d))
    cov = jnp.asarray(a @ a.T + np.eye(d), jnp.float32)
    loc = jnp.asarray(rng.standard_normal(d), jnp.float32)
    z = jnp.asarray(rng.standard_normal((1, d)), jnp.float32)
    g = jnp.asarray(rng.standard_normal((1, d)), jnp.float32)
    new_loc, new_cov = gsm_bam.gsm_update(loc, cov, z, g)
    score = -np.linalg.solve(np.asarray(new_cov, float), np.asarray(z[0] - new_loc, float))
    np.testing.assert_allclose(score, np.asarray(g[0]), atol=1e-4)


def _random_step_inputs(d=5, b=4, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((d, d))
    cov = a @ a.T + np.eye(d)
    return cov, rng.standard_normal(d), rng.standard_normal((b, d)), rng.standard_normal((b, d))


def test_gsm_update_is_the_papers_per_draw_formula():
    # Modi et al 2023, Algorithm 1, written out per draw with explicit matrices (float64).
    cov, mu, z, g = _random_step_inputs()
    d = len(mu)
    dmu, dcov = np.zeros(d), np.zeros((d, d))
    for zb, gb in zip(z, g):
        eps = cov @ gb - mu + zb
        c = gb @ cov @ gb + ((mu - zb) @ gb) ** 2
        rho = (-1 + math.sqrt(1 + 4 * c)) / 2
        step = (np.eye(d) - np.outer(mu - zb, gb) / (1 + rho + (mu - zb) @ gb)) @ eps / (1 + rho)
        dmu += step / len(z)
        dcov += (np.outer(mu - zb, mu - zb) - np.outer(mu + step - zb, mu + step - zb)) / len(z)
    loc, new = gsm_bam.gsm_update(*(jnp.asarray(v, jnp.float32) for v in (mu, cov, z, g)))
    np.testing.assert_allclose(np.asarray(loc), mu + dmu, atol=1e-5)
    np.testing.assert_allclose(np.asarray(new), cov + dcov, atol=1e-4)


def test_bam_update_is_the_papers_matrix_formula():
    # Cai et al 2024, Algorithm 1: Sigma = 2 V (I + (I + 4 U V)^(1/2))^(-1), by scipy's sqrtm.
    from scipy.linalg import sqrtm

    cov, mu, z, g = _random_step_inputs(seed=1)
    lam = 3.0
    zbar, gbar = z.mean(0), g.mean(0)
    c_mat, gamma = np.cov(z.T, bias=True), np.cov(g.T, bias=True)
    u = lam * gamma + lam / (1 + lam) * np.outer(gbar, gbar)
    v = cov + lam * c_mat + lam / (1 + lam) * np.outer(mu - zbar, mu - zbar)
    eye = np.eye(len(mu))
    sigma = 2 * v @ np.linalg.inv(eye + sqrtm(eye + 4 * u @ v).real)
    new_mu = mu / (1 + lam) + lam / (1 + lam) * (sigma @ gbar + zbar)
    loc, new = gsm_bam.bam_update(*(jnp.asarray(x, jnp.float32) for x in (mu, cov, z, g)), lam)
    np.testing.assert_allclose(np.asarray(loc), new_mu, atol=1e-5)
    np.testing.assert_allclose(np.asarray(new), sigma, atol=1e-4)


@pytest.mark.parametrize("fit", [gsm_bam.fit_gsm, gsm_bam.fit_bam])
def test_non_finite_scores_are_rejected_and_counted(fit):
    def score_fn(theta, key):
        bad = jnp.full(theta.shape, jnp.nan)
        return jnp.zeros(theta.shape[0]), bad

    out = fit(score_fn, jnp.ones(3), jnp.eye(3), 7, batch_size=2, key=jax.random.PRNGKey(0))
    assert out.num_rejected == 7
    np.testing.assert_array_equal(np.asarray(out.loc), np.ones(3))
    np.testing.assert_array_equal(np.asarray(out.cov), np.eye(3))


def test_bad_starting_point_names_the_argument():
    _, _, score_fn = _dense_gaussian(3)
    key = jax.random.PRNGKey(0)
    with pytest.raises(ValueError, match="init_cov must have shape"):
        gsm_bam.fit_gsm(score_fn, jnp.zeros(3), jnp.eye(2), 1, batch_size=1, key=key)
    with pytest.raises(ValueError, match="positive definite"):
        gsm_bam.fit_bam(score_fn, jnp.zeros(3), -jnp.eye(3), 1, batch_size=1, key=key)
    with pytest.raises(ValueError, match="GSM has no step-size schedule"):
        gsm_bam.make_step("gsm", score_fn, 2, schedule=1.0)


@pytest.mark.parametrize("fit", [gsm_bam.fit_gsm, gsm_bam.fit_bam])
def test_mini_batch_variants_stay_finite_on_logistic_regression(fit):
    # Mini-batch (64 of 569) scores of the logreg problem's NumPyro twin.
    problem = get_problem("logreg")
    score_fn = numpyro_score_fn(problem)
    d = sum(s.size for s in problem.load()[0].latents)
    out = fit(
        score_fn, jnp.zeros(d), 0.01 * jnp.eye(d), 100, batch_size=5, key=jax.random.PRNGKey(0)
    )
    assert np.all(np.isfinite(np.asarray(out.loc))) and np.all(np.isfinite(np.asarray(out.cov)))
    assert np.all(np.linalg.eigvalsh(np.asarray(out.cov, float)) > 0)
    assert isinstance(out.num_rejected, int)


@pytest.mark.slow  # 15-20 s; CI runs it with the slow tests
def test_numpyro_score_fn_is_the_pyro_log_joint():
    import pyro
    import torch

    problem = get_problem("sunspots")  # a positive site: the log-Jacobian must be included
    spec = problem.load()[0]
    rng = np.random.default_rng(0)
    d = sum(s.size for s in spec.latents)
    theta = rng.normal(scale=0.3, size=(2, d)).astype(np.float32)
    log_p, grad = numpyro_score_fn(problem, full_batch=True)(
        jnp.asarray(theta), jax.random.PRNGKey(0)
    )
    assert grad.shape == (2, d)
    model, args, kwargs = problem.pyro_model_and_args(full_batch=True)
    off, values, jac = 0, {}, 0.0
    for s in spec.latents:
        v = torch.as_tensor(theta[0, off : off + s.size].reshape(s.shape))
        off += s.size
        values[s.name] = v.exp() if s.positive else v
        jac += float(v.sum()) if s.positive else 0.0
    cond = pyro.poutine.condition(model, values)
    lp = pyro.poutine.trace(cond).get_trace(*args, **kwargs).log_prob_sum().item() + jac
    assert float(log_p[0]) == pytest.approx(lp, rel=1e-4)


@pytest.mark.slow
def test_full_rank_neg_elbo_agrees_with_an_exact_entropy_estimate():
    # Trace_ELBO on the Pyro model with the full-rank guide, against E_q[log p] (NumPyro log
    # joint, 5000 draws) + the exact entropy, at a close full-rank fit (full-batch BaM), where
    # log p - log q is nearly constant (measured: 55.72 vs 55.78 at 100 particles).
    problem = get_problem("logreg")
    score_fn = numpyro_score_fn(problem, full_batch=True)
    d = sum(s.size for s in problem.load()[0].latents)
    fit = gsm_bam.fit_bam(
        score_fn, jnp.zeros(d), 0.01 * jnp.eye(d), 300, batch_size=10, key=jax.random.PRNGKey(0)
    )
    m, cov = np.asarray(fit.loc, float), np.asarray(fit.cov, float)
    z = m + np.random.default_rng(0).standard_normal((5000, d)) @ np.linalg.cholesky(cov).T
    log_p, _ = score_fn(jnp.asarray(z, jnp.float32), jax.random.PRNGKey(0))
    entropy = 0.5 * d * (1 + math.log(2 * math.pi)) + 0.5 * np.linalg.slogdet(cov)[1]
    direct = -(float(np.mean(np.asarray(log_p, float))) + entropy)
    assert neg_elbo_full_rank(problem, m, cov, num_particles=50) == pytest.approx(direct, abs=1.0)


def test_full_rank_neg_elbo_of_the_gaussian_problem_is_its_exact_kl():
    from pyro_scorevi.compare import metrics as M

    problem = get_problem("gaussian")
    extra = problem.load()[1].extra
    mu, prec = extra["mu"], extra["precision"]
    assert neg_elbo_full_rank(problem, mu, np.linalg.inv(prec)) == pytest.approx(0.0, abs=1e-8)
    s = np.full(len(mu), 0.5)
    kl = neg_elbo_full_rank(problem, mu + 0.1, np.diag(s**2))
    assert kl == pytest.approx(M.gaussian_kl(mu + 0.1, s, mu, prec), rel=1e-10)


# -- IVON ----------------------------------------------------------------------------------------


def _plain_ivon_loop(data, init, seed, steps, lr, batch, mc):
    """The README's loop of ``ivon-opt`` on a hand-written digits MLP (no adapter code)."""
    import ivon
    import torch
    import torch.nn.functional as F

    torch.manual_seed(seed)
    names = ["w0", "b0", "w1", "b1"]
    params = {n: torch.tensor(init[n], dtype=torch.float32, requires_grad=True) for n in names}
    n = len(data.x_train)
    groups = [{"params": [params[k]], "weight_decay": 1.0 / n} for k in names]  # N(0, 1) priors
    opt = ivon.IVON(groups, lr=lr, ess=n, mc_samples=mc)
    x, y = torch.as_tensor(data.x_train), torch.as_tensor(data.y_train)
    for _ in range(steps):
        idx = torch.randperm(n)[:batch]
        for _ in range(mc):
            with opt.sampled_params(train=True):
                opt.zero_grad()
                h = torch.tanh(x[idx] @ params["w0"] + params["b0"])
                loss = F.cross_entropy(h @ params["w1"] + params["b1"], y[idx])
                loss.backward()
        opt.step()
    return params, opt


def test_ivon_adapter_reproduces_a_plain_ivon_loop():
    pytest.importorskip("ivon")
    from pyro_scorevi.compare.ivon_fit import IVONFit

    problem = get_problem("digits-mlp")
    spec, data, _ = problem.load()
    rng = np.random.default_rng(0)
    init = {s.name: rng.normal(scale=0.1, size=s.shape) for s in spec.latents}
    fit = IVONFit(
        spec, data.x_train, data.y_train, init, batch_size=64, lr=0.1, mc_samples=2, seed=3
    )
    losses = [fit.step() for _ in range(25)]
    params, opt = _plain_ivon_loop(data, init, seed=3, steps=25, lr=0.1, batch=64, mc=2)
    loc, scale = fit.moments()
    for (name, p), group in zip(params.items(), opt.param_groups):
        np.testing.assert_allclose(loc[name], p.detach().numpy(), rtol=0, atol=1e-6)
        sd = (1 / (group["ess"] * (group["hess"] + group["weight_decay"])).sqrt()).numpy()
        np.testing.assert_allclose(scale[name].ravel(), sd, rtol=1e-6)
    assert all(math.isfinite(v) for v in losses)


def test_ivon_prior_is_its_weight_decay_and_its_start_is_hess_init():
    pytest.importorskip("ivon")
    from pyro_scorevi.compare.ivon_fit import IVONFit

    problem = get_problem("digits-vit")  # per-site prior scales 1/sqrt(fan_in)
    spec, data, _ = problem.load()
    init = {s.name: np.zeros(s.shape) for s in spec.latents}
    fit = IVONFit(
        spec, data.x_train, data.y_train, init, batch_size=8, lr=0.1, mc_samples=1, seed=0
    )
    n = len(data.x_train)
    for s, group in zip(spec.latents, fit.optimizer.param_groups):
        assert group["weight_decay"] == pytest.approx(1 / (n * s.prior_scale**2))
        assert group["ess"] == n
    _, scale = fit.moments()
    s0 = spec.latents[0]
    expected = 1 / math.sqrt(n * (1.0 + 1 / (n * s0.prior_scale**2)))
    np.testing.assert_allclose(scale[s0.name], expected, rtol=1e-6)


def test_ivon_handles_the_positive_noise_site():
    pytest.importorskip("ivon")
    from pyro_scorevi.compare.ivon_fit import IVONFit

    problem = get_problem("sunspots")
    spec, data, _ = problem.load()
    init = {s.name: np.zeros(s.shape) for s in spec.latents}
    fit = IVONFit(
        spec, data.x_train, data.y_train, init, batch_size=32, lr=0.1, mc_samples=2, seed=0
    )
    sigma_group = fit.optimizer.param_groups[[s.name for s in spec.latents].index("sigma")]
    assert sigma_group["weight_decay"] == 0.0  # HalfNormal: a loss term, not a weight decay
    assert all(math.isfinite(fit.step()) for _ in range(5))
    loc, scale = fit.moments()
    assert all(np.all(np.isfinite(v)) for v in (*loc.values(), *scale.values()))


def test_a_diverging_ivon_fit_is_reported_not_raised(tmp_path):
    pytest.importorskip("ivon")
    problem = get_problem("sunspots")
    result = run_comparison(
        problem,
        seeds=[0],
        budget=Budget(grad_evals=400),
        settings=Settings(eval_samples=4, elbo_particles=2, checkpoints=2, ivon_lr=(1e4,)),
        methods=("ivon",),
        progress=False,
    )
    block = result["summary"]["pyro-ivon"]["equal_evals"]
    # Either the weights blew up (figures null in the strict JSON) or steps were dropped.
    assert block["crps"]["mean"] is None or block["rejected_steps"]["mean"] > 0
    report.write_json({"problems": {"sunspots": result}}, tmp_path / "r.json")
    assert report.write_plots(result, tmp_path)
    assert report.format_table(result)


def test_ivon_rejects_a_model_without_data():
    pytest.importorskip("ivon")
    from pyro_scorevi.compare.ivon_fit import IVONFit

    spec = get_problem("gaussian").load()[0]
    with pytest.raises(ValueError, match="needs data"):
        IVONFit(spec, np.zeros((1, 1)), np.zeros(1), {}, batch_size=1, lr=0.1, mc_samples=1, seed=0)


# -- The methods in the comparison -----------------------------------------------------------


def test_methods_that_do_not_apply_are_skipped_with_a_note():
    rows, notes = select_methods(get_problem("gaussian"), ("all",), ("pyro", "numpyro"))
    keys = [m.key for m in rows]
    assert keys == [
        "pyro-elbo",
        "pyro-scoreprox",
        "numpyro-elbo",
        "numpyro-scoreprox",
        "jax-gsm",
        "jax-bam",
    ]
    assert any(n.startswith("ivon: not run on gaussian") for n in notes)
    rows, notes = select_methods(get_problem("digits-mlp"), ("elbo", "ivon", "gsm"), ("pyro",))
    assert [m.key for m in rows] == ["pyro-elbo", "pyro-ivon"]
    assert any(n.startswith("gsm: not run on digits-mlp") for n in notes)
    with pytest.raises(ValueError, match="unknown method"):
        select_methods(get_problem("gaussian"), ("advi",))
    with pytest.raises(NoMethodApplies):
        run_comparison(
            get_problem("digits-mlp"), seeds=[0], budget=Budget(2), methods=("gsm",), progress=False
        )


def test_an_ivon_learning_rate_grid_gives_one_row_each():
    rows, _ = select_methods(
        get_problem("sunspots"), ("ivon",), settings=Settings(ivon_lr=(0.05, 0.2))
    )
    assert [m.key for m in rows] == ["pyro-ivon-lr0.05", "pyro-ivon-lr0.2"]
    assert [dict(m.options)["lr"] for m in rows] == [0.05, 0.2]


EXPECTED_ROWS = {
    "gaussian": ["jax-gsm", "jax-bam"],
    "logreg": ["jax-gsm", "jax-bam"],
    "digits-mlp": ["pyro-ivon"],
    "digits-vit": ["pyro-ivon"],
    "sunspots": ["pyro-ivon"],
}


@pytest.mark.parametrize("name", list(PROBLEMS))
def test_every_new_method_runs_on_every_problem_at_a_tiny_budget(name, tmp_path):
    pytest.importorskip("ivon")
    problem = get_problem(name)
    result = run_comparison(
        problem,
        seeds=[0],
        budget=Budget(grad_evals=4),
        settings=TINY,
        methods=("ivon", "gsm", "bam"),
        progress=False,
    )
    assert list(result["summary"]) == EXPECTED_ROWS[name]
    assert result["skipped"]  # the methods that do not apply, with a note
    for key, per_budget in result["summary"].items():
        for which in ("equal_evals", "equal_time"):
            block = per_budget[which]
            assert "neg_elbo" in block and problem.headline in block, (key, which)
            for metric, stat in block.items():
                assert stat["mean"] is not None and math.isfinite(stat["mean"]), (key, metric)
    for run in result["runs"]:
        assert run["equal_evals"]["grad_evals"] >= 4
        assert all(v is not None and math.isfinite(v) for v in run["curve"]["loss"])
    path = tmp_path / "r.json"
    report.write_json({"problems": {name: result}}, path)
    assert json.loads(path.read_text())["problems"][name]["skipped"] == result["skipped"]
    assert report.write_plots(result, tmp_path)


def test_full_rank_rows_recover_the_gaussian_problem():
    problem = get_problem("gaussian")
    result = run_comparison(
        problem, seeds=[0], budget=Budget(grad_evals=600), settings=TINY, methods=("gsm", "bam")
    )
    optimal_kl = problem.load()[1].extra["optimal_kl"]
    for key in ("jax-gsm", "jax-bam"):
        block = result["summary"][key]["equal_evals"]
        # The full-rank KL reaches 0, below the best mean-field fit's (kl_gap = -optimal_kl).
        assert block["neg_elbo"]["mean"] < 1e-3, key
        assert block["kl_gap"]["mean"] == pytest.approx(-optimal_kl, abs=1e-3)
        assert block["mean_z_rmse"]["mean"] < 1e-3
    lines = report.format_ranking(result)
    assert any(line.startswith("= evals: best KL gap") for line in lines)
