"""NumPyro / JAX backend of pyro_scorevi (never imports torch or pyro).

Install with ``pip install "pyro_scorevi[numpyro]"``. The public objects mirror
``numpyro.infer.SVI`` (:class:`ScoreProximalSVI`) and the torch functional core
(:mod:`pyro_scorevi.numpyro.proximal` uses the names of :mod:`pyro_scorevi.proximal`).
"""

from __future__ import annotations

try:
    import jax  # noqa: F401
    import numpyro  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised in a subprocess test
    raise ImportError(
        "pyro_scorevi.numpyro needs JAX and NumPyro, which are not installed "
        f'({exc}). Install them with: pip install "pyro_scorevi[numpyro]"'
    ) from exc

from pyro_scorevi.numpyro.proximal import (
    ScoreStatistics,
    diagonal_proximal_update,
    score_statistics,
    solve_mean,
    solve_precision,
)
from pyro_scorevi.numpyro.svi import (
    ScoreProximalConfig,
    ScoreProximalRunResult,
    ScoreProximalState,
    ScoreProximalSVI,
)

__all__ = [
    "ScoreProximalSVI",
    "ScoreProximalState",
    "ScoreProximalRunResult",
    "ScoreProximalConfig",
    "ScoreStatistics",
    "score_statistics",
    "solve_precision",
    "solve_mean",
    "diagonal_proximal_update",
]
