"""Score-based proximal variational inference for Pyro and NumPyro.

``import pyro_scorevi`` imports neither torch nor jax: the Pyro class is loaded on first use
(``pyro_scorevi.ScoreProximalSVI``) and the NumPyro mirror lives in ``pyro_scorevi.numpyro``.
"""

from __future__ import annotations

from typing import Any

from pyro_scorevi import schedules
from pyro_scorevi.schedules import ConstantWeight, PolynomialGrowth
from pyro_scorevi.step_rules import AdaptiveStep, FixedStep

__version__ = "0.1.0"

__all__ = [
    "ScoreProximalSVI",
    "AdaptiveStep",
    "FixedStep",
    "ConstantWeight",
    "PolynomialGrowth",
    "schedules",
    "__version__",
]

_LAZY = {"ScoreProximalSVI": "pyro_scorevi.svi"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'pyro_scorevi' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
