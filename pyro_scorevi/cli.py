"""Command line: ``pyro-scorevi`` (or ``python -m pyro_scorevi``).

Fits the same model with ``ScoreProximalSVI``, with ``SVI`` + ``Trace_ELBO`` (same
``AutoNormal`` guide, data, particles and budget) and with the other methods of ``--methods``
(IVON on the networks; GSM and BaM, full-rank, on the small dense problems), and prints one
table per problem; writes ``results.json``, the tables as ``results.md`` and PNG plots to the
output folder. With no argument it runs the default comparison (the digits MLP, 3 seeds,
Trace_ELBO, ScoreProximalSVI and IVON).

Usage::

    pyro-scorevi                                   # = pyro-scorevi compare
    pyro-scorevi compare --problem all --seeds 3 --numpyro --methods all --out results/
    pyro-scorevi compare -p logreg gaussian --grad-evals 2000 --seconds 5 --methods elbo,bam
    pyro-scorevi compare --methods ivon --ivon-lr 0.05 0.1 0.2   # IVON's learning-rate grid
    pyro-scorevi list
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import pathlib
import shlex
import sys
import tempfile
import time

__all__ = ["main", "build_parser"]

_SUBCOMMANDS = ("compare", "list")


class UserError(Exception):
    """Bad input: reported as one message and exit code 2, never a traceback."""


def build_parser() -> argparse.ArgumentParser:
    from pyro_scorevi import __version__

    parser = argparse.ArgumentParser(
        prog="pyro-scorevi",
        description=(
            "Score-based proximal VI against ELBO SVI, IVON, GSM and BaM, side by side. With no "
            "subcommand, runs 'compare' (the default problem, digits-mlp, 3 seeds)."
        ),
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{compare,list}")
    sub.add_parser("list", help="list the problems and the methods")
    c = sub.add_parser(
        "compare",
        help="run the comparison (the default subcommand)",
        description="Fit each problem with ScoreProximalSVI, SVI + Trace_ELBO and the other "
        "methods of --methods under equal budgets of gradient evaluations and of wall time; "
        "print the table, write results.json, the tables as results.md and PNG plots.",
    )
    c.add_argument(
        "-p",
        "--problem",
        nargs="+",
        default=None,
        metavar="NAME",
        help="problem name(s), or 'all' (default: digits-mlp); see 'pyro-scorevi list'",
    )
    c.add_argument("--seeds", type=int, default=3, help="number of seeds, 0..n-1 (default 3)")
    c.add_argument(
        "--grad-evals",
        type=int,
        default=None,
        help="gradient evaluations per fit (default: the problem's, see 'list')",
    )
    c.add_argument(
        "--seconds",
        type=float,
        default=None,
        help="wall time per fit for the equal-time budget (default: the time the ELBO "
        "baseline took for the gradient budget, per seed)",
    )
    c.add_argument(
        "--num-particles",
        type=int,
        default=2,
        help="particles per step of elbo, scoreprox and ivon (S gradient evaluations; IVON's "
        "mc_samples; default 2)",
    )
    c.add_argument(
        "--prox-weight",
        type=float,
        default=None,
        help="a fixed lambda (default: the problem's; none set: the library's default step rule)",
    )
    c.add_argument(
        "--scale-prox-weight",
        type=float,
        default=None,
        help="lambda_s, the weight of the scale part of the KL (default: the problem's, "
        "else --prox-weight)",
    )
    c.add_argument(
        "--rule",
        default=None,
        metavar="JSON",
        help="AdaptiveStep keyword arguments for ScoreProximalSVI in both backends, as JSON, "
        "e.g. '{\"max_variance_ratio\": 5}' (default: the library's default rule)",
    )
    c.add_argument("--lr", type=float, default=None, help="Adam lr of the ELBO baseline (1e-2)")
    c.add_argument(
        "-m",
        "--methods",
        nargs="+",
        default=None,
        metavar="LIST",
        help="methods to run, a comma list or 'all': elbo, scoreprox, ivon (network problems), "
        "gsm, bam (full-rank; gaussian and logreg); default elbo,scoreprox,ivon. Methods that do "
        "not apply to a problem are skipped with a note",
    )
    c.add_argument(
        "--ivon-lr",
        type=float,
        nargs="+",
        default=None,
        metavar="LR",
        help="IVON learning rate(s), one row each (default: the problem's best of the grid "
        "0.05 0.1 0.2 0.5 1 2: 1 on digits-mlp and digits-vit, 0.05 on sunspots; see "
        "pyro_scorevi.compare.ivon_fit)",
    )
    c.add_argument(
        "--ivon-hess-init",
        type=float,
        default=1.0,
        help="IVON's initial Hessian hess_init (default 1, the ivon-opt default)",
    )
    c.add_argument(
        "--score-batch-size",
        type=int,
        default=None,
        help="draws (gradient evaluations) per GSM/BaM iteration (default: 2 for GSM, 5 for BaM)",
    )
    c.add_argument(
        "--eval-samples", type=int, default=100, help="posterior draws per figure (default 100)"
    )
    c.add_argument(
        "--numpyro",
        action="store_true",
        help="also run NumPyro's SVI + Trace_ELBO and pyro_scorevi.numpyro.ScoreProximalSVI "
        "(GSM and BaM always run in JAX on the NumPyro model)",
    )
    c.add_argument(
        "-o",
        "--out",
        type=pathlib.Path,
        default=pathlib.Path("scorevi-compare"),
        help="output folder for results.json and the PNGs (default ./scorevi-compare)",
    )
    c.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    c.add_argument("--no-progress", action="store_true", help="no progress bar")
    c.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads for torch and XLA (default 1: fastest and steadiest for these "
        "small models, and fair to both methods)",
    )
    c.add_argument("-v", "--verbose", action="store_true", help="log each fit to stderr")
    return parser


def _normalise_argv(argv: list[str]) -> list[str]:
    if not argv or argv[0] not in (*_SUBCOMMANDS, "-h", "--help", "--version"):
        return ["compare", *argv]
    return argv


def _list_problems() -> int:
    from pyro_scorevi.compare.problems import DEFAULT_PROBLEM, PROBLEMS

    width = max(len(n) for n in PROBLEMS)
    for name, p in PROBLEMS.items():
        mark = " (default)" if name == DEFAULT_PROBLEM else ""
        print(
            f"{name.ljust(width)}  {p.description}{mark}\n{' ' * width}  "
            f"headline {p.headline}; {p.grad_evals} gradient evaluations; "
            f"batch {p.batch_size or ('none (no data)' if p.kind == 'gaussian' else 'full')}; "
            f"init scale {p.init_scale:g}; "
            + ("adaptive step" if p.prox_weight is None else f"lambda {p.prox_weight:g}")
            + ("" if p.scale_prox_weight is None else f", lambda_s {p.scale_prox_weight:g}")
        )
    from pyro_scorevi.compare.runner import ALGORITHMS, DEFAULT_ALGORITHMS

    print("\nmethods (--methods):")
    width = max(len(a) for a in ALGORITHMS)
    for name, a in ALGORITHMS.items():
        mark = " (default)" if name in DEFAULT_ALGORITHMS else ""
        where = (
            "every problem"
            if a.kinds is None
            else "on " + ", ".join(n for n, p in PROBLEMS.items() if p.kind in a.kinds)
        )
        print(f"{name.ljust(width)}  {a.description}; {where}{mark}")
    return 0


def _check_args(args: argparse.Namespace) -> None:
    from pyro_scorevi.compare.problems import DEFAULT_PROBLEM, PROBLEMS

    names = args.problem or [DEFAULT_PROBLEM]
    if "all" in names:
        names = list(PROBLEMS)
    unknown = [n for n in names if n not in PROBLEMS]
    if unknown:
        raise UserError(
            f"unknown problem {', '.join(map(repr, unknown))}; choose from "
            f"{', '.join(PROBLEMS)} or 'all' (see 'pyro-scorevi list')."
        )
    args.problem = list(dict.fromkeys(names))
    if args.seeds < 1:
        raise UserError(f"--seeds must be >= 1 (got {args.seeds}).")
    if args.num_particles < 1:
        raise UserError(f"--num-particles must be >= 1 (got {args.num_particles}).")
    if args.grad_evals is not None and args.grad_evals < args.num_particles:
        raise UserError(
            f"impossible budget: --grad-evals {args.grad_evals} is less than one step "
            f"(--num-particles {args.num_particles} gradient evaluations); give "
            f"--grad-evals >= {args.num_particles}."
        )
    if args.seconds is not None and not (math.isfinite(args.seconds) and args.seconds > 0):
        raise UserError(f"impossible budget: --seconds must be > 0 (got {args.seconds}).")
    for flag, value in (
        ("--prox-weight", args.prox_weight),
        ("--scale-prox-weight", args.scale_prox_weight),
        ("--lr", args.lr),
    ):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise UserError(f"{flag} must be a positive number (got {value}).")
    if args.rule is not None:
        args.rule = _step_rule_kwargs(args)
    _check_methods(args)
    if args.ivon_lr is not None:
        bad = [v for v in args.ivon_lr if not (math.isfinite(v) and v > 0)]
        if bad:
            raise UserError(f"--ivon-lr must be positive numbers (got {bad[0]}).")
    if not (math.isfinite(args.ivon_hess_init) and args.ivon_hess_init > 0):
        raise UserError(f"--ivon-hess-init must be a positive number (got {args.ivon_hess_init}).")
    if args.score_batch_size is not None and args.score_batch_size < 1:
        raise UserError(f"--score-batch-size must be >= 1 (got {args.score_batch_size}).")
    if args.eval_samples < 2:
        raise UserError(f"--eval-samples must be >= 2 (got {args.eval_samples}).")
    if args.threads < 1:
        raise UserError(f"--threads must be >= 1 (got {args.threads}).")
    _check_dependencies(args)
    _check_some_method_applies(args)
    if args.numpyro:
        from pyro_scorevi.compare.runner import numpyro_available

        ok, why = numpyro_available()
        if not ok:
            raise UserError(
                f"--numpyro needs JAX, NumPyro and pyro_scorevi.numpyro, which could not be "
                f'imported ({why}). Install them with: pip install "pyro_scorevi[numpyro]"'
            )
    _check_out_dir(args.out)


def _step_rule_kwargs(args: argparse.Namespace) -> dict:
    """``--rule`` parsed and checked: a JSON object of ``AdaptiveStep`` keyword arguments."""
    from pyro_scorevi import AdaptiveStep

    if args.prox_weight is not None or args.scale_prox_weight is not None:
        raise UserError(
            "--rule sets the adaptive rule, --prox-weight / --scale-prox-weight the fixed "
            "weight: pass one of them."
        )
    try:
        rule = json.loads(args.rule)
    except json.JSONDecodeError as error:
        raise UserError(
            f"--rule must be a JSON object of AdaptiveStep keyword arguments (got {args.rule!r}: "
            f"{error}); e.g. --rule '{{\"max_variance_ratio\": 5}}'."
        ) from None
    if not isinstance(rule, dict):
        raise UserError(
            f"--rule must be a JSON object of AdaptiveStep keyword arguments (got {args.rule!r})."
        )
    try:
        AdaptiveStep(**rule)
    except (TypeError, ValueError) as error:
        raise UserError(f"--rule {args.rule}: {error}") from None
    return rule


def _check_methods(args: argparse.Namespace) -> None:
    """Parses ``--methods`` into ``args.methods`` (a tuple of names); a method named
    explicitly must be installed (the default set and 'all' skip a missing one with a note)."""
    from pyro_scorevi.compare import runner

    if args.methods is None:
        args.methods = runner.DEFAULT_ALGORITHMS
        return
    names = [n.strip() for item in args.methods for n in item.split(",") if n.strip()]
    if not names:
        raise UserError("--methods needs at least one name (or 'all').")
    if "all" in names:
        args.methods = tuple(runner.ALGORITHMS)
        return
    unknown = [n for n in names if n not in runner.ALGORITHMS]
    if unknown:
        raise UserError(
            f"unknown method {', '.join(map(repr, unknown))}; choose from "
            f"{', '.join(runner.ALGORITHMS)} or 'all' (see 'pyro-scorevi list')."
        )
    args.methods = tuple(dict.fromkeys(names))
    if "ivon" in args.methods:
        ok, why = runner.ivon_available()
        if not ok:
            raise UserError(
                f"--methods ivon needs the ivon-opt package, which could not be imported "
                f"({why}). Install it with: pip install ivon-opt"
            )
    if {"gsm", "bam"} & set(args.methods):
        ok, why = runner.jax_available()
        if not ok:
            raise UserError(
                f"--methods gsm/bam run in JAX on the NumPyro model, which could not be imported "
                f'({why}). Install them with: pip install "pyro_scorevi[numpyro]"'
            )


def _check_some_method_applies(args: argparse.Namespace) -> None:
    """At least one selected method must apply to one selected problem (before any fitting)."""
    from pyro_scorevi.compare.problems import PROBLEMS
    from pyro_scorevi.compare.runner import select_methods

    backends = ("pyro", "numpyro") if args.numpyro else ("pyro",)
    notes = []
    for name in args.problem:
        rows, why = select_methods(PROBLEMS[name], args.methods, backends)
        if rows:
            return
        notes += why
    raise UserError(
        f"no method of --methods {','.join(args.methods)} applies to "
        f"{', '.join(args.problem)} ({'; '.join(notes)})."
    )


def _check_dependencies(args: argparse.Namespace) -> None:
    import importlib.util

    from pyro_scorevi.compare.problems import PROBLEMS

    needed = ["torch", "pyro", "tqdm"]
    sources = {PROBLEMS[n].kind for n in args.problem}
    if sources & {"classifier", "posterior"}:
        needed.append("sklearn")
    if "forecaster" in sources:
        needed.append("statsmodels")
    if not args.no_plots:
        needed.append("matplotlib")
    missing = [m for m in needed if importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(
            f"the comparison needs {', '.join(missing)}, which could not be found; install "
            'them with: pip install "pyro_scorevi[compare]"'
        )


def _check_out_dir(out: pathlib.Path) -> None:
    """Creates ``out`` and proves it writable before any fitting starts."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise UserError(
            f"output folder {str(out)!r} is not writable ({reason}); choose another with --out."
        ) from None


def _set_threads(n: int) -> None:
    # XLA reads its flags when jax first initialises, so this must precede any jax import.
    if n == 1:
        flags = os.environ.get("XLA_FLAGS", "")
        if "xla_cpu_multi_thread_eigen" not in flags:
            os.environ["XLA_FLAGS"] = (
                flags + " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
            ).strip()
    import torch

    torch.set_num_threads(n)


def _compare(args: argparse.Namespace, argv: list[str]) -> int:
    _check_args(args)
    _set_threads(args.threads)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from pyro_scorevi import __version__
    from pyro_scorevi.compare import report
    from pyro_scorevi.compare.problems import get_problem
    from pyro_scorevi.compare.runner import Budget, NoMethodApplies, Settings, run_comparison

    settings = Settings(
        num_particles=args.num_particles,
        prox_weight=args.prox_weight,
        scale_prox_weight=args.scale_prox_weight,
        elbo_lr=args.lr,
        eval_samples=args.eval_samples,
        ivon_lr=None if args.ivon_lr is None else tuple(args.ivon_lr),
        ivon_hess_init=args.ivon_hess_init,
        score_batch_size=args.score_batch_size,
        step_rule=args.rule,
    )
    backends = ("pyro", "numpyro") if args.numpyro else ("pyro",)
    started = time.perf_counter()
    payload = {
        "command": shlex.join(["pyro-scorevi", *argv]),
        "version": __version__,
        "threads": args.threads,
        "problems": {},
    }
    json_path = args.out / "results.json"
    markdown_path = args.out / "results.md"
    tables: list[str] = []
    written = []
    for name in args.problem:
        problem = get_problem(name)
        budget = Budget(args.grad_evals or problem.grad_evals, args.seconds)
        if budget.grad_evals < args.num_particles:
            raise UserError(
                f"impossible budget for {name}: {budget.grad_evals} gradient evaluations is "
                f"less than one step of {args.num_particles}; lower --num-particles."
            )
        try:
            result = run_comparison(
                problem,
                seeds=list(range(args.seeds)),
                budget=budget,
                settings=settings,
                backends=backends,
                progress=not args.no_progress,
                methods=args.methods,
            )
        except NoMethodApplies as exc:
            print(f"{name}: skipped, {exc}\n")
            continue
        payload["problems"][name] = result
        print(report.format_table(result))
        for line in report.format_verdict(result):
            print("  " + line)
        for note in result.get("skipped", []):
            print("  note: " + note)
        print()
        # Written after each problem, so a long suite keeps what it has finished.
        payload["wall_s_total"] = time.perf_counter() - started
        report.write_json(payload, json_path)
        tables.append(report.format_markdown(result))
        markdown_path.write_text(f"<!-- {payload['command']} -->\n\n" + "\n".join(tables))
        if not args.no_plots:
            written += report.write_plots(result, args.out)
    sys.stdout.flush()
    print(f"wrote {json_path}", file=sys.stderr)
    print(f"wrote {markdown_path}", file=sys.stderr)
    for path in written:
        print(f"wrote {path}", file=sys.stderr)
    print(f"total {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (0 ok, 2 bad input, 130 interrupted)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(_normalise_argv(argv))
    except SystemExit as exc:  # argparse already printed usage and the message
        return int(exc.code or 0)
    try:
        if args.command == "list":
            return _list_problems()
        return _compare(args, argv)
    except UserError as exc:
        print(f"pyro-scorevi: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pyro-scorevi: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
