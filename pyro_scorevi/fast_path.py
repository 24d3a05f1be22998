"""The traced fast path: one closed-form step captured once as an FX graph.

A step of the closed-form family runs the model ``S`` times through Pyro's handlers; for a
neural network most of that time is Python, not arithmetic. :class:`TracedStep` records the
step's particle loop (sampling, the model's log joint, its gradient, the per-coordinate sums;
the proximal update itself runs eagerly, in :mod:`pyro_scorevi.core`) with
:func:`torch.fx.experimental.proxy_tensor.make_fx` into a graph of ATen operations and replays
it on later steps: the same operations, the same random draws (``randn``, the plate's
``randperm`` are ops of the graph), without Pyro's Python overhead.
With ``compile=True`` the graph is further compiled by :func:`torch.compile` (inductor, with
``fallback_random`` so that it draws the same random numbers as the eager step).

Like :class:`pyro.infer.JitTrace_ELBO`, the graph assumes a static model: its structure and
control flow may depend on the shapes and non-tensor values of the arguments (these key a
cache of graphs), not on tensor values. Each new graph is checked once against the eager path
on the same random numbers, and is used only if it reproduces it; otherwise the step stays
eager. Support checks of ``Distribution.validate_args`` run in that eager check, not in the
graph. A model's own ``pyro.param`` values held fixed (no ``optim=``) are constants of the
graph: after changing them, build a new ``ScoreProximalSVI``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Any

import pyro
import torch
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils._pytree import tree_flatten, tree_unflatten

__all__ = ["TracedStep"]

logger = logging.getLogger(__name__)

#: Graphs kept per instance (one per distinct argument signature); beyond it steps stay eager.
MAX_GRAPHS = 8

#: In automatic mode, eager steps before tracing: tracing costs about as much as a few hundred
#: steps of a small network, so short runs (and most tests) never pay for it.
AUTO_START_AFTER = 100


class TracedStep:
    """Wraps ``compute(loc, scale, args, kwargs) -> (*tensors, params, param_grads)``.

    The graph replaces ``compute`` for the tensor outputs; a model with its own ``pyro.param``
    sites (whose gradients the graph does not return) stays eager.

    Args:
        compute: the eager step.
        required: trace from the first call, and raise instead of falling back to the eager path
            when a graph cannot be used; otherwise trace after ``AUTO_START_AFTER`` eager calls.
        compile: compile each graph with :func:`torch.compile`.
    """

    def __init__(self, compute: Callable[..., tuple], required: bool = False, compile=False):
        self.compute = compute
        self.required = required
        self.compile = compile
        self._eager_calls_left = 0 if required else AUTO_START_AFTER
        self._graphs: dict[Any, Callable | None] = {}

    def __call__(self, loc, scale, args: tuple, kwargs: dict) -> tuple:
        if self._eager_calls_left > 0:
            self._eager_calls_left -= 1
            return self.compute(loc, scale, args, kwargs)
        leaves, spec = tree_flatten((args, kwargs))
        is_tensor = [isinstance(leaf, torch.Tensor) for leaf in leaves]
        tensors = [leaf for leaf, t in zip(leaves, is_tensor) if t]
        key = _signature(loc, leaves, is_tensor, spec)
        if key is None:
            return self._eager(loc, scale, args, kwargs, "unhashable non-tensor args")
        if key in self._graphs:
            graph = self._graphs[key]
            if graph is None:
                return self.compute(loc, scale, args, kwargs)
            with _eager_random_numbers() if self.compile else contextlib.nullcontext():
                return (*graph(loc, scale, *tensors), [], [])
        if len(self._graphs) >= MAX_GRAPHS:
            reason = f"more than {MAX_GRAPHS} argument signatures"
            return self._eager(loc, scale, args, kwargs, reason)
        return self._build(key, loc, scale, args, kwargs, leaves, is_tensor, spec, tensors)

    def _build(self, key, loc, scale, args, kwargs, leaves, is_tensor, spec, tensors):
        before = _rng_state(loc.device)
        eager = self.compute(loc, scale, args, kwargs)
        after = _rng_state(loc.device)
        if eager[-1]:
            self._graphs[key] = None
            reason = "the model's pyro.param sites are learned (optim=), which the graph cannot do"
            return self._eager_result(eager, reason)

        def traced(loc, scale, *tensor_args):
            it = iter(tensor_args)
            full = [next(it) if t else leaf for leaf, t in zip(leaves, is_tensor)]
            a, kw = tree_unflatten(full, spec)
            return self.compute(loc, scale, a, kw)[:-2]

        try:
            _set_rng_state(loc.device, before)
            with _sample_validation_disabled():
                graph = make_fx(traced)(loc, scale, *tensors)
            if self.compile:
                graph = torch.compile(graph, dynamic=False)
            _set_rng_state(loc.device, before)
            with _eager_random_numbers():
                replay = graph(loc, scale, *tensors)
            reason = _mismatch(eager[:-2], replay)
        except Exception as error:  # noqa: BLE001 - any tracing failure means: stay eager
            graph, reason = None, f"tracing failed ({type(error).__name__}: {error})"
        _set_rng_state(loc.device, after)
        self._graphs[key] = None if reason else graph
        if reason:
            return self._eager_result(eager, reason)
        logger.info("fast path: traced the step (compiled: %s)", self.compile)
        return eager

    def _eager(self, loc, scale, args, kwargs, reason: str) -> tuple:
        return self._eager_result(self.compute(loc, scale, args, kwargs), reason)

    def _eager_result(self, result: tuple, reason: str) -> tuple:
        if self.required:
            raise RuntimeError(
                f"fast_path=True but the traced fast path cannot be used: {reason}. Pass "
                "fast_path=False to run the eager path."
            )
        logger.info("fast path not used: %s; running the eager path", reason)
        return result


def _signature(loc, leaves, is_tensor, spec):
    parts = [(tuple(loc.shape), loc.dtype, loc.device), repr(spec)]
    for leaf, t in zip(leaves, is_tensor):
        parts.append((tuple(leaf.shape), leaf.dtype, leaf.device) if t else leaf)
    key = tuple(parts)
    try:
        hash(key)
    except TypeError:
        return None
    return key


def _mismatch(eager: tuple, replay: tuple) -> str:
    """Empty if the graph reproduces the eager step (up to float reassociation)."""
    for a, b in zip(eager, replay):
        if a.dtype == torch.bool:
            same = bool((a == b).all())
        else:
            atol = 1e-6 * (1.0 + float(a.abs().max())) if a.numel() else 0.0
            same = a.shape == b.shape and torch.allclose(a, b, rtol=1e-5, atol=atol)
        if not same:
            return "the traced graph does not reproduce the eager step (a dynamic model?)"
    return ""


@contextlib.contextmanager
def _eager_random_numbers():
    """Compiled graphs draw from eager's generator (``fallback_random``), so they match it."""
    try:
        import torch._inductor.config as inductor_config
    except ImportError:  # pragma: no cover - inductor ships with torch >= 2.0
        yield
        return
    with inductor_config.patch(fallback_random=True):
        yield


@contextlib.contextmanager
def _sample_validation_disabled():
    """Support checks call ``.all()`` on tensors, which a graph cannot record; the eager check
    of each new graph runs them."""
    original = torch.distributions.Distribution._validate_sample
    torch.distributions.Distribution._validate_sample = lambda self, value: None
    try:
        with pyro.validation_enabled(False):
            yield
    finally:
        torch.distributions.Distribution._validate_sample = original


def _rng_state(device: torch.device):
    cpu = torch.get_rng_state()
    return (cpu, torch.cuda.get_rng_state(device)) if device.type == "cuda" else (cpu, None)


def _set_rng_state(device: torch.device, state) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)
