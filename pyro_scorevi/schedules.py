"""Schedules for the proximal weight :math:`\\lambda_t` (an inverse step size).

Backend-agnostic: a schedule is called with the step count ``t`` as a Python ``int`` (PyTorch
backend) or a traced integer array (JAX backend) and uses only arithmetic, so it works under
``jax.jit`` and ``lax.scan``.

With :math:`\\lambda` fixed the iterates fluctuate around the optimum with a spread of order
:math:`s/\\sqrt{\\lambda}`; a weight that grows like :math:`t^\\kappa` with
:math:`\\tfrac12 < \\kappa \\le 1` satisfies the Robbins-Monro conditions on the step size
:math:`1/\\lambda_t` and removes that noise floor, at the price of slower late progress.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Union

__all__ = ["ConstantWeight", "PolynomialGrowth", "ProxWeight", "as_schedule"]


@dataclass(frozen=True)
class ConstantWeight:
    """:math:`\\lambda_t = \\lambda` for every step.

    Args:
        value: the proximal weight :math:`\\lambda > 0`.
    """

    value: float

    def __post_init__(self):
        _check_positive("value", self.value)

    def __call__(self, step: Any) -> Any:
        return self.value + 0 * step


@dataclass(frozen=True)
class PolynomialGrowth:
    """:math:`\\lambda_t = \\lambda_0\\,(1 + t/\\tau)^{\\kappa}`.

    Constant (:math:`\\approx\\lambda_0`) for :math:`t \\ll \\tau`, then growing like
    :math:`t^\\kappa`, which averages out the Monte Carlo and mini-batch noise of late steps.

    Args:
        initial: :math:`\\lambda_0 > 0`.
        warmup_steps: :math:`\\tau > 0`, the step count at which growth sets in.
        power: :math:`\\kappa \\ge 0`; :math:`\\kappa \\in (1/2, 1]` gives Robbins-Monro steps.
    """

    initial: float
    warmup_steps: float
    power: float = 1.0

    def __post_init__(self):
        _check_positive("initial", self.initial)
        _check_positive("warmup_steps", self.warmup_steps)
        if not isinstance(self.power, (int, float)) or self.power < 0:
            raise ValueError(
                f"power must satisfy power >= 0 (got power = {self.power!r}); use 0 for a "
                "constant weight or a value in (0.5, 1] for Robbins-Monro steps."
            )

    def __call__(self, step: Any) -> Any:
        return self.initial * (1 + step / self.warmup_steps) ** self.power


ProxWeight = Union[float, Callable[[Any], Any]]


def as_schedule(prox_weight: ProxWeight, name: str = "prox_weight") -> Callable[[Any], Any]:
    """Turns a positive number into :class:`ConstantWeight`; passes a callable through.
    ``name`` is the argument named in the errors (``TypeError`` for a non-number, ``ValueError``
    for a number that is not > 0), which both backends raise at construction."""
    if callable(prox_weight):
        return prox_weight
    if isinstance(prox_weight, bool) or not isinstance(prox_weight, (int, float)):
        raise TypeError(
            f"{name} must be a positive float or a callable step -> weight (got "
            f"{type(prox_weight).__name__} {prox_weight!r}); e.g. {name}=100.0 or "
            f"{name}=pyro_scorevi.schedules.PolynomialGrowth(100.0, 1000)."
        )
    if not prox_weight > 0:
        raise ValueError(
            f"{name} must satisfy {name} > 0 (got {name} = {prox_weight!r}); it is an inverse "
            f"step size, e.g. {name}=100.0 or a schedule such as "
            "pyro_scorevi.PolynomialGrowth(100.0, 1000)."
        )
    return ConstantWeight(float(prox_weight))


def _check_positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must satisfy {name} > 0 (got {name} = {value!r}).")
