"""Tests of the ``pyro-scorevi`` command line: bad input and one run as a user would."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import pytest

from pyro_scorevi import cli


def _run_main(argv, capsys):
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_no_argument_runs_compare():
    assert cli._normalise_argv([]) == ["compare"]
    assert cli._normalise_argv(["--seeds", "3"]) == ["compare", "--seeds", "3"]
    assert cli._normalise_argv(["list"]) == ["list"]


def test_list_names_every_problem(capsys):
    from pyro_scorevi.compare.problems import PROBLEMS

    code, out, _ = _run_main(["list"], capsys)
    assert code == 0
    for name in PROBLEMS:
        assert name in out
    assert "(default)" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--problem", "mnist"], "unknown problem 'mnist'"),
        (["-p", "gaussian", "nope"], "unknown problem 'nope'"),
        (["--grad-evals", "1"], "impossible budget"),
        (["--grad-evals", "0"], "impossible budget"),
        (["--grad-evals", "3", "--num-particles", "4"], "impossible budget"),
        (["--seconds", "0"], "impossible budget"),
        (["--seconds", "-1"], "impossible budget"),
        (["--seconds", "nan"], "impossible budget"),
        (["--seeds", "0"], "--seeds must be >= 1"),
        (["--num-particles", "0"], "--num-particles must be >= 1"),
        (["--prox-weight", "-3"], "--prox-weight must be a positive number"),
        (["--scale-prox-weight", "0"], "--scale-prox-weight must be a positive number"),
        (["--lr", "0"], "--lr must be a positive number"),
        (["--methods", "advi"], "unknown method 'advi'"),
        (["--methods", "elbo,nope"], "unknown method 'nope'"),
        (["--ivon-lr", "0"], "--ivon-lr must be positive"),
        (["--ivon-hess-init", "-1"], "--ivon-hess-init must be a positive number"),
        (["--score-batch-size", "0"], "--score-batch-size must be >= 1"),
        (["-p", "digits-mlp", "--methods", "gsm,bam"], "no method of --methods gsm,bam applies"),
        (["--rule", "x"], "--rule must be a JSON object of AdaptiveStep keyword arguments"),
        (["--rule", "[1]"], "--rule must be a JSON object"),
        (["--rule", '{"nope": 1}'], "unexpected keyword argument 'nope'"),
        (["--rule", '{"max_variance_ratio": 0.5}'], "max_variance_ratio must satisfy"),
        (["--rule", "{}", "--prox-weight", "3"], "pass one of them"),
    ],
)
def test_bad_input_is_one_message_and_exit_2(argv, message, capsys, tmp_path):
    code, out, err = _run_main([*argv, "--out", str(tmp_path)], capsys)
    assert code == 2
    assert message in err
    assert err.startswith("pyro-scorevi: error:") and "Traceback" not in err
    assert out == ""


def test_argparse_errors_exit_2_without_traceback(capsys):
    code, _, err = _run_main(["--seeds", "three"], capsys)
    assert code == 2 and "invalid int value" in err and "Traceback" not in err


def test_unwritable_output_folder(capsys, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    code, _, err = _run_main(["--out", str(blocker / "sub"), "--grad-evals", "2"], capsys)
    assert code == 2 and "not writable" in err and "--out" in err


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="needs a non-root POSIX user")
def test_read_only_output_folder(capsys, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        code, _, err = _run_main(["--out", str(ro), "--grad-evals", "2"], capsys)
    finally:
        ro.chmod(0o700)
    assert code == 2 and "not writable" in err


def test_numpyro_option_fails_clearly_when_missing(capsys, tmp_path, monkeypatch):
    from pyro_scorevi.compare import runner

    monkeypatch.setattr(runner, "numpyro_available", lambda: (False, "ImportError: no jax"))
    code, _, err = _run_main(["--numpyro", "--out", str(tmp_path)], capsys)
    assert code == 2
    assert "--numpyro needs" in err and 'pip install "pyro_scorevi[numpyro]"' in err


def test_missing_dependency_names_the_extra(capsys, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "statsmodels" else real(name)
    )
    code, _, err = _run_main(["-p", "sunspots", "--out", str(tmp_path)], capsys)
    assert code == 2 and "statsmodels" in err and 'pip install "pyro_scorevi[compare]"' in err


def test_user_command_end_to_end(tmp_path):
    """Runs the main-job command in a subprocess, as a user would, at a tiny budget."""
    pytest.importorskip("torch")
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    exe = shutil.which("pyro-scorevi")
    cmd = [exe] if exe else [sys.executable, "-m", "pyro_scorevi"]
    out = tmp_path / "out"
    args = ["--grad-evals", "6", "--seeds", "3", "--eval-samples", "4", "--out", str(out)]
    proc = subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert "digits-mlp" in proc.stdout and "Pyro ScoreProximalSVI" in proc.stdout
    assert "IVON lr=" in proc.stdout  # the default rows include IVON on the networks
    assert "= evals" in proc.stdout and "= time" in proc.stdout
    data = json.loads((out / "results.json").read_text())
    result = data["problems"]["digits-mlp"]
    assert result["budget"]["seeds"] == [0, 1, 2]
    assert list(result["methods"]) == ["pyro-elbo", "pyro-scoreprox", "pyro-ivon"]
    for method in ("pyro-elbo", "pyro-scoreprox", "pyro-ivon"):
        for which in ("equal_evals", "equal_time"):
            block = result["summary"][method][which]
            for metric in ("nll", "accuracy", "ece", "brier", "neg_elbo", "grad_evals", "wall_s"):
                assert math.isfinite(block[metric]["mean"]), (method, which, metric)
                assert block[metric]["n"] == 3
    for png in ("digits-mlp_curves.png", "digits-mlp_reliability.png"):
        assert (out / png).stat().st_size > 1000
    # The Markdown tables: one row per (budget, method), the same figures as the JSON.
    markdown = (out / "results.md").read_text()
    rows = [r for r in markdown.splitlines() if r.startswith("| = ")]
    assert len(rows) == 6 and "### digits-mlp" in markdown
    assert "best NLL" in markdown  # the ranking of every method
    nll = result["summary"]["pyro-scoreprox"]["equal_evals"]["nll"]["mean"]
    assert f"{nll:.4g}" in rows[1]


def test_methods_option_runs_the_named_methods_and_notes_the_rest(tmp_path, capsys):
    pytest.importorskip("jax")
    pytest.importorskip("numpyro")
    out = tmp_path / "o"
    argv = ["-p", "gaussian", "--methods", "elbo,gsm", "ivon", "--grad-evals", "4"]
    argv += ["--seeds", "1", "--eval-samples", "4", "--no-plots", "--no-progress"]
    argv += ["--out", str(out)]
    code, stdout, err = _run_main(argv, capsys)
    assert code == 0, err
    assert "GSM full-rank (JAX)" in stdout and "Pyro SVI+Trace_ELBO" in stdout
    assert "ScoreProximalSVI" not in stdout
    assert "note: ivon: not run on gaussian" in stdout
    data = json.loads((out / "results.json").read_text())
    assert list(data["problems"]["gaussian"]["methods"]) == ["pyro-elbo", "jax-gsm"]


def test_list_names_the_methods(capsys):
    code, out, _ = _run_main(["list"], capsys)
    assert code == 0
    for name in ("elbo", "scoreprox", "ivon", "gsm", "bam"):
        assert f"\n{name} " in out


def test_python_dash_m_bad_problem_exits_2_without_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "pyro_scorevi", "compare", "-p", "bogus", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "unknown problem 'bogus'" in proc.stderr and "Traceback" not in proc.stderr


def test_rule_option_reaches_both_backends_fits(tmp_path, capsys):
    """``--rule`` builds ``AdaptiveStep(**rule)`` for ScoreProximalSVI in both backends and is
    recorded in results.json."""
    pytest.importorskip("numpyro")
    from pyro_scorevi import AdaptiveStep
    from pyro_scorevi.compare.problems import get_problem
    from pyro_scorevi.compare.runner import Settings, _score_proximal_options

    rule = {"max_variance_ratio": 5.0, "variance_ratio_memory": 1.0}
    options = _score_proximal_options(get_problem("gaussian"), Settings(step_rule=rule))
    assert options["step_rule"] == AdaptiveStep(**rule)
    assert "step_rule" not in _score_proximal_options(get_problem("gaussian"), Settings())
    out = tmp_path / "o"
    argv = ["-p", "gaussian", "--methods", "scoreprox", "--numpyro", "--grad-evals", "4"]
    argv += ["--seeds", "1", "--eval-samples", "4", "--no-plots", "--no-progress"]
    argv += ["--rule", json.dumps(rule), "--out", str(out)]
    code, stdout, err = _run_main(argv, capsys)
    assert code == 0, err
    data = json.loads((out / "results.json").read_text())
    assert data["problems"]["gaussian"]["settings"]["step_rule"] == rule
    assert "Pyro ScoreProximalSVI" in stdout and "NumPyro ScoreProximalSVI" in stdout
