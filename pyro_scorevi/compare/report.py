"""Renders a comparison: the terminal table, the JSON file and the PNG plots.

Plots use Matplotlib's object API with the Agg canvas (no ``pyplot``, no global backend
switch), so they work headless and leave a user's Matplotlib state alone.
"""

from __future__ import annotations

import json
import math
import pathlib
from typing import Any

__all__ = [
    "format_table",
    "format_markdown",
    "format_verdict",
    "format_ranking",
    "write_json",
    "write_plots",
    "METRIC_INFO",
]

#: Display name and direction of each figure (+1: higher is better, -1: lower is better,
#: 0: closer to the stated target is better).
METRIC_INFO: dict[str, tuple[str, int]] = {
    "neg_elbo": ("-ELBO", -1),
    "kl_gap": ("KL gap", -1),
    "mean_z_rmse": ("mean err (sd)", -1),
    "log_sd_rmse": ("log-sd err", -1),
    "log_sd_bias": ("log-sd bias", 0),
    "nll": ("NLL", -1),
    "accuracy": ("accuracy", +1),
    "ece": ("ECE", -1),
    "brier": ("Brier", -1),
    "mse": ("MSE", -1),
    "mae": ("MAE", -1),
    "crps": ("CRPS", -1),
    "coverage90": ("cover90", 0),
}

_TARGET = {"log_sd_bias": 0.0, "coverage90": 0.9}

_BUDGETS = (("equal_evals", "= evals"), ("equal_time", "= time"))


def _fmt(stat: dict[str, Any]) -> str:
    mean, sd = stat.get("mean"), stat.get("sd")
    if mean is None:
        return "nan"
    if sd is None or stat.get("n", 0) < 2:
        return f"{mean:.4g}"
    return f"{mean:.4g} ± {sd:.2g}"


def _table(result: dict[str, Any]) -> tuple[str, list[str], list[list[str]]]:
    """``(title, header, rows)`` of one problem's table; rows = (budget, method)."""
    summary = result["summary"]
    methods = list(result["methods"])
    present = {m for key in methods for m in summary[key]["equal_evals"]}
    metric_names = [m for m in METRIC_INFO if m in present]
    header = ["budget", "method", "grad evals", "wall s"] + [
        METRIC_INFO[m][0] for m in metric_names
    ]
    rows = []
    for which, label in _BUDGETS:
        for key in methods:
            block = summary[key][which]
            rows.append(
                [label, result["methods"][key]["label"], _fmt_int(block["grad_evals"])]
                + [f"{block['wall_s']['mean']:.2f}" if block["wall_s"]["mean"] is not None else "-"]
                + [_fmt(block[m]) if m in block else "-" for m in metric_names]
            )
    b = result["budget"]
    seconds = (
        f"{b['seconds']:g} s" if b["seconds"] is not None else "the ELBO baseline's time, per seed"
    )
    per_step = f"S = {b['num_particles']} per step"
    batch = result.get("settings", {}).get("score_batch_size", {})
    full_rank = [result["methods"][k]["algorithm"] for k in methods]
    names = {"gsm": "GSM", "bam": "BaM"}
    extra = [f"{names[a]} B = {batch[a]}" for a in names if a in full_rank and a in batch]
    if extra:
        per_step += ", " + ", ".join(extra)
    title = (
        f"{result['problem']}: {result['description']}\n"
        f"  {result['num_latents']} latents; budget {b['grad_evals']} gradient evaluations "
        f"({per_step}) or {seconds}; {len(b['seeds'])} seed(s); "
        "mean ± sd over seeds"
    )
    return title, header, rows


def format_table(result: dict[str, Any]) -> str:
    """One problem's table: rows = (budget, method), columns = evaluations, seconds, figures.

    Entries are the mean ± sd over seeds.
    """
    title, header, rows = _table(result)
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells):
        return "  ".join(
            str(c).ljust(w) if i < 2 else str(c).rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths))
        )

    num_methods = len(result["methods"])
    sep = "-" * len(line(header))
    out = [title, sep, line(header), sep]
    for i, r in enumerate(rows):
        if i == num_methods:
            out.append(sep)
        out.append(line(r))
    out.append(sep)
    return "\n".join(out)


def format_markdown(result: dict[str, Any]) -> str:
    """The same table and verdict lines as Markdown (what ``docs/results.md`` shows)."""
    title, header, rows = _table(result)
    out = [f"### {result['problem']}", "", title.split("\n", 1)[1].strip(), ""]
    out.append("| " + " | ".join(header) + " |")
    out.append("|" + "---|" * len(header))
    out += ["| " + " | ".join(r) + " |" for r in rows]
    out.append("")
    out += [f"- {' '.join(v.split())}" for v in format_verdict(result)]
    out += [f"- note: {n}" for n in result.get("skipped", [])]
    return "\n".join(out) + "\n"


def _fmt_int(stat: dict[str, Any]) -> str:
    mean = stat.get("mean")
    return "-" if mean is None else f"{mean:.0f}"


def _better(metric: str, a: float, b: float) -> bool:
    """Whether ``a`` beats ``b`` on ``metric``."""
    sign = METRIC_INFO[metric][1]
    if sign == 0:
        t = _TARGET[metric]
        return abs(a - t) < abs(b - t)
    return a * sign > b * sign


#: Figures whose differences read best in absolute terms (nats), not as a percentage.
_ABSOLUTE = {"neg_elbo", "kl_gap"}


def _ranking(result: dict[str, Any], which: str, metric: str) -> list[tuple[str, float]]:
    """``(method key, mean)`` of every row with a finite ``metric``, best first."""
    import functools

    summary = result["summary"]
    have = [
        (key, summary[key][which][metric]["mean"])
        for key in result["methods"]
        if metric in summary[key][which] and summary[key][which][metric]["mean"] is not None
    ]

    def cmp(a, b):
        return -1 if _better(metric, a[1], b[1]) else (1 if _better(metric, b[1], a[1]) else 0)

    return sorted(have, key=functools.cmp_to_key(cmp))


def format_ranking(result: dict[str, Any]) -> list[str]:
    """Per budget, every method on the headline figure and on ``-ELBO``, best first, with
    each one's distance to the best (relative; in nats for ``-ELBO`` and the KL gap)."""
    lines = []
    methods = result["methods"]
    metrics = list(dict.fromkeys([result["headline"], "neg_elbo"]))
    for which, label in _BUDGETS:
        for metric in metrics:
            ranked = _ranking(result, which, metric)
            if len(ranked) < 2:
                continue
            (best_key, best), rest = ranked[0], ranked[1:]
            parts = []
            for key, v in rest:
                if METRIC_INFO[metric][1] == 0:
                    gap = ""
                elif metric in _ABSOLUTE:
                    gap = f" ({v - best:+.3g})"
                else:
                    gap = f" ({(v - best) / abs(best):+.0%})" if best else ""
                parts.append(f"{methods[key]['label']} {v:.4g}{gap}")
            lines.append(
                f"{label}: best {METRIC_INFO[metric][0]} {methods[best_key]['label']} "
                f"{best:.4g}; then " + ", ".join(parts)
            )
    return lines


def format_verdict(result: dict[str, Any]) -> list[str]:
    """One line per backend and budget on the headline figure, score-proximal against the ELBO
    baseline; then :func:`format_ranking` (every method, best first)."""
    lines = []
    summary = result["summary"]
    h = result["headline"]
    for backend in ("pyro", "numpyro"):
        base, chal = f"{backend}-elbo", f"{backend}-scoreprox"
        if base not in summary or chal not in summary:
            continue
        for which, label in _BUDGETS:
            a = summary[chal][which][h]["mean"]
            b = summary[base][which][h]["mean"]
            if a is None or b is None:
                lines.append(f"{backend} {label}: {h} not finite for one method")
                continue
            word = "wins" if _better(h, a, b) else "loses"
            rel = f" ({(a - b) / abs(b):+.0%})" if b else ""
            lines.append(
                f"{backend:7s} {label}: score-proximal {word} on {METRIC_INFO[h][0]}: "
                f"{a:.4g} vs ELBO {b:.4g}{rel}"
            )
    return lines + format_ranking(result)


def write_json(payload: dict[str, Any], path: pathlib.Path) -> None:
    """Writes ``payload`` with non-finite floats as ``null`` (strict JSON)."""
    path.write_text(json.dumps(_strict(payload), indent=1, allow_nan=False) + "\n")


def _strict(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _strict(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_strict(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


# ---------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------

_COLORS = {
    "pyro-elbo": "tab:blue",
    "pyro-scoreprox": "tab:red",
    "numpyro-elbo": "tab:cyan",
    "numpyro-scoreprox": "tab:orange",
    "pyro-ivon": "tab:green",
    "jax-gsm": "tab:purple",
    "jax-bam": "tab:brown",
}

_SPARE = ("tab:olive", "tab:pink", "tab:gray", "darkgreen", "gold", "navy")


def _colors(result: dict[str, Any]) -> dict[str, str]:
    """A colour per method: the fixed ones above, then spare ones (e.g. an IVON lr grid)."""
    out, spare = {}, iter(_SPARE * 4)
    for key in result["methods"]:
        out[key] = _COLORS.get(key) or next(spare)
    return out


def _figure(rows: int, cols: int, size: tuple[float, float]):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False)
    return fig, axes


def _positive(values: list[Any]) -> bool:
    return all(v is None or v > 0 for v in values)


def _plot_curves(result: dict[str, Any], path: pathlib.Path) -> None:
    h = result["headline"]
    colors = _colors(result)
    fig, axes = _figure(2, 2, (11, 7.5))
    seen = set()
    log_loss, log_err = True, True
    for run in result["runs"]:
        key = run["method"]
        label = None if key in seen else result["methods"][key]["label"]
        seen.add(key)
        c = colors[key]
        curve, ck = run["curve"], run["checkpoints"]
        loss = [math.nan if v is None else v for v in curve["loss"]]
        err = [math.nan if v is None else v for v in ck[h]]
        log_loss &= _positive(curve["loss"])
        log_err &= _positive(ck[h])
        for j, x in enumerate(("wall_s", "grad_evals")):
            axes[0, j].plot(curve[x], loss, color=c, alpha=0.7, lw=1, label=label)
            axes[1, j].plot(ck[x], err, color=c, alpha=0.7, lw=1, marker=".", ms=3, label=label)
    seconds = result["runs"][0]["equal_evals"]["wall_s"] if result["runs"] else None
    for j, (x, xl) in enumerate((("wall_s", "wall time (s)"), ("grad_evals", "gradient evals"))):
        axes[0, j].set_ylabel("-ELBO (per-step estimate, binned)")
        axes[1, j].set_ylabel(f"{METRIC_INFO[h][0]} ({h})")
        for i in range(2):
            axes[i, j].set_xlabel(xl)
            axes[i, j].grid(alpha=0.3)
        if log_loss:
            axes[0, j].set_yscale("log")
        if log_err:
            axes[1, j].set_yscale("log")
        if x == "grad_evals":
            for i in range(2):
                axes[i, j].axvline(result["budget"]["grad_evals"], color="gray", ls=":", lw=1)
        elif seconds is not None:
            for i in range(2):
                axes[i, j].axvline(seconds, color="gray", ls=":", lw=1)
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(f"{result['problem']}: {result['description']}", fontsize=10)
    fig.savefig(path, dpi=110)


def _plot_reliability(result: dict[str, Any], path: pathlib.Path) -> None:
    keys = list(result["methods"])
    colors = _colors(result)
    fig, axes = _figure(1, len(keys), (3.4 * len(keys), 3.6))
    for ax, key in zip(axes[0], keys):
        run = next(r for r in result["runs"] if r["method"] == key)
        p = _nan_lists(run["equal_evals"]["plot"])
        conf = p["confidence"]
        acc = p["accuracy"]
        edges = [i / len(conf) for i in range(len(conf) + 1)]
        centers = [(a + b) / 2 for a, b in zip(edges[:-1], edges[1:])]
        ax.bar(centers, acc, width=1 / len(conf), color=colors[key], alpha=0.7, ec="k", lw=0.5)
        ax.plot([0, 1], [0, 1], "k--", lw=1)
        ax.plot(conf, acc, "k.", ms=4)
        ece = run["equal_evals"]["metrics"]["ece"]
        ax.set_title(
            f"{result['methods'][key]['label']}\nECE {_num(ece, '.3f')} (seed {run['seed']})",
            fontsize=9,
        )
        ax.set_xlabel("confidence")
        ax.set_ylabel("accuracy")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
    fig.savefig(path, dpi=110)


def _num(value: float | None, spec: str) -> str:
    return "nan" if value is None else format(value, spec)


def _nan_lists(plot: dict[str, list[Any]]) -> dict[str, list[float]]:
    """The plot arrays with JSON's nulls (a diverged fit) back as NaN."""
    return {k: [math.nan if v is None else v for v in vals] for k, vals in plot.items()}


def _plot_bands(result: dict[str, Any], path: pathlib.Path) -> None:
    keys = list(result["methods"])
    colors = _colors(result)
    fig, axes = _figure(len(keys), 1, (8, 2.4 * len(keys)))
    for ax, key in zip(axes[:, 0], keys):
        run = next(r for r in result["runs"] if r["method"] == key)
        p = _nan_lists(run["equal_evals"]["plot"])
        ax.fill_between(p["time"], p["lo"], p["hi"], color=colors[key], alpha=0.3, label="90% band")
        ax.plot(p["time"], p["mean"], color=colors[key], label="predictive mean")
        ax.plot(p["time"], p["y"], "k.", ms=4, label="observed")
        m = run["equal_evals"]["metrics"]
        ax.set_title(
            f"{result['methods'][key]['label']}: CRPS {_num(m['crps'], '.3g')}, "
            f"coverage {_num(m['coverage90'], '.2f')} (seed {run['seed']})",
            fontsize=9,
        )
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    axes[-1, 0].set_xlabel("year")
    fig.savefig(path, dpi=110)


def write_plots(result: dict[str, Any], out_dir: pathlib.Path) -> list[pathlib.Path]:
    """Writes the problem's PNGs to ``out_dir``; returns their paths."""
    name = result["problem"]
    paths = [out_dir / f"{name}_curves.png"]
    _plot_curves(result, paths[0])
    if result["kind"] == "classifier":
        paths.append(out_dir / f"{name}_reliability.png")
        _plot_reliability(result, paths[-1])
    elif result["kind"] == "forecaster":
        paths.append(out_dir / f"{name}_bands.png")
        _plot_bands(result, paths[-1])
    return paths
