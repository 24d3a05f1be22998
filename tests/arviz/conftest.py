"""Shared checks for the ArviZ export tests, written once for ArviZ 0.x and ArviZ 1.x."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

az = pytest.importorskip("arviz")
matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")

from pyro_scorevi.arviz import uses_datatree  # noqa: E402

DATATREE = uses_datatree()


def group(data, name):
    """A group as an ``xarray.Dataset`` on both ArviZ lines."""
    node = data[name]
    return node.to_dataset() if hasattr(node, "to_dataset") else node


def group_names(data):
    return set(data.children) if DATATREE else set(data.groups())


def run_arviz(data, var_names):
    """``summary`` (no ess/rhat), ``loo`` and a posterior plot on the exported object."""
    import matplotlib.pyplot as plt

    summary = az.summary(data, var_names=var_names, kind="stats")
    assert not any("ess" in c or "r_hat" in c for c in summary.columns)
    assert np.all(np.isfinite(summary["mean"].to_numpy(dtype=float)))
    with warnings.catch_warnings():
        # A Pareto-k warning is a verdict on the fit, not a failure of the export.
        warnings.simplefilter("ignore", UserWarning)
        loo = az.loo(data, pointwise=True)
    elpd = float(loo.elpd if DATATREE else loo["elpd_loo"])
    assert np.isfinite(elpd)
    if DATATREE:
        az.plot_dist(data, var_names=var_names, backend="matplotlib")
    else:
        az.plot_posterior(data, var_names=var_names, show=False)
    plt.close("all")
    return summary, loo


def elpd_of(loo):
    return float(loo.elpd if DATATREE else loo["elpd_loo"])


@pytest.fixture
def azh():
    """Helpers for both ArviZ lines: ``group``, ``group_names``, ``run``, ``elpd``,
    ``datatree``."""
    from types import SimpleNamespace

    return SimpleNamespace(
        group=group, group_names=group_names, run=run_arviz, elpd=elpd_of, datatree=DATATREE
    )
