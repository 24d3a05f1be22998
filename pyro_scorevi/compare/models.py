"""Models of the comparison problems, written once and run by both backends.

Each network is a pure function ``forward(weights, x, ops)`` of a dict of weight arrays; ``ops`` is
:data:`TORCH` or :data:`JAX`, a small namespace of the few array functions that differ between
PyTorch and ``jax.numpy``. The Pyro model (:func:`pyro_model`) and the NumPyro model
(:func:`numpyro_model`) sample every weight from its prior as one site (a vector event), then call
the same ``forward``: the twins are the same model by construction.

Observations sit in a plate of the full size ``N`` with ``subsample_size=B``; the plate draws the
mini-batch indices, so the likelihood is scaled by ``N/B`` (an unbiased score, see
``ALGORITHM.md``), and ``batch_size=None`` gives the full-data model.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

__all__ = [
    "LatentSpec",
    "ModelSpec",
    "TORCH",
    "jax_ops",
    "mlp_spec",
    "vit_spec",
    "mlp_forward",
    "vit_forward",
    "pyro_model",
    "numpyro_model",
]


@dataclass(frozen=True)
class LatentSpec:
    """One latent site: ``name``, event ``shape``, prior ``Normal(0, prior_scale)``, or
    ``HalfNormal(prior_scale)`` when ``positive``."""

    name: str
    shape: tuple[int, ...]
    prior_scale: float = 1.0
    positive: bool = False

    @property
    def size(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class ModelSpec:
    """A model: its latent sites, a forward map and its likelihood.

    Attributes:
        latents: the latent sites, in sampling order.
        forward: ``forward(values, x, ops) -> output``; ``values`` maps site names to arrays.
        likelihood: ``"categorical"`` (output = logits), ``"bernoulli"`` (output = logit) or
            ``"normal"`` (output = mean, noise sd = the site ``noise_site``), or ``"none"``
            (no data: the target is the prior itself, used for the Gaussian problem).
        noise_site: the latent site holding the observation noise sd (``"normal"`` only).
    """

    latents: tuple[LatentSpec, ...]
    forward: Callable[[dict[str, Any], Any, Any], Any]
    likelihood: str
    noise_site: str | None = None


def _torch_ops() -> SimpleNamespace:
    import torch

    return SimpleNamespace(
        name="torch",
        tanh=torch.tanh,
        softmax=lambda x, axis: torch.softmax(x, dim=axis),
        mean=lambda x, axis, keepdims=False: x.mean(dim=axis, keepdim=keepdims),
        sqrt=torch.sqrt,
        concat=lambda xs, axis: torch.cat(xs, dim=axis),
        swapaxes=lambda x, a, b: x.transpose(a, b),
        reshape=lambda x, shape: x.reshape(shape),
    )


def _jax_ops() -> SimpleNamespace:
    import jax
    import jax.numpy as jnp

    return SimpleNamespace(
        name="jax",
        tanh=jnp.tanh,
        softmax=lambda x, axis: jax.nn.softmax(x, axis=axis),
        mean=lambda x, axis, keepdims=False: jnp.mean(x, axis=axis, keepdims=keepdims),
        sqrt=jnp.sqrt,
        concat=lambda xs, axis: jnp.concatenate(xs, axis=axis),
        swapaxes=jnp.swapaxes,
        reshape=jnp.reshape,
    )


class _LazyOps:
    """Builds the namespace on first attribute access, so importing this module imports
    neither torch nor jax."""

    def __init__(self, factory):
        self._factory = factory
        self._ns = None

    def __getattr__(self, name):
        if self._ns is None:
            self._ns = self._factory()
        return getattr(self._ns, name)


TORCH = _LazyOps(_torch_ops)
jax_ops = _LazyOps(_jax_ops)


# ---------------------------------------------------------------------------------------------
# Networks
# ---------------------------------------------------------------------------------------------


def _dense_layers(sizes: tuple[int, ...], prefix: str = "") -> tuple[LatentSpec, ...]:
    out = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        out.append(LatentSpec(f"{prefix}w{i}", (a, b)))
        out.append(LatentSpec(f"{prefix}b{i}", (b,)))
    return tuple(out)


def mlp_forward(values: dict[str, Any], x: Any, ops: Any, num_layers: int) -> Any:
    """Dense network with tanh hidden units; returns the last layer's pre-activation."""
    h = x
    for i in range(num_layers):
        h = h @ values[f"w{i}"] + values[f"b{i}"]
        if i < num_layers - 1:
            h = ops.tanh(h)
    return h


def mlp_spec(sizes: tuple[int, ...], likelihood: str, **kwargs: Any) -> ModelSpec:
    """A Bayesian MLP with ``N(0, 1)`` priors on every weight and bias (``ALGORITHM.md``)."""
    num_layers = len(sizes) - 1
    latents = _dense_layers(sizes) + tuple(kwargs.pop("extra_latents", ()))
    return ModelSpec(
        latents,
        lambda v, x, ops: mlp_forward(v, x, ops, num_layers),
        likelihood,
        **kwargs,
    )


def _layer_norm(x: Any, ops: Any) -> Any:
    # No affine parameters: the following linear layers absorb them.
    mu = ops.mean(x, -1, keepdims=True)
    var = ops.mean((x - mu) * (x - mu), -1, keepdims=True)
    return (x - mu) / ops.sqrt(var + 1e-5)


def vit_forward(values: dict[str, Any], x: Any, ops: Any, cfg: dict[str, int]) -> Any:
    """A one-block vision transformer on square images flattened to ``(N, side*side)``.

    Patches of ``patch x patch`` pixels are embedded linearly, a learned position embedding is
    added, then one pre-norm block (multi-head self-attention and a tanh MLP, both residual),
    mean pooling over tokens and a linear head.
    """
    side, patch, dim, heads = cfg["side"], cfg["patch"], cfg["dim"], cfg["heads"]
    n = x.shape[0]
    g = side // patch
    # (N, side, side) -> (N, g, patch, g, patch) -> (N, g, g, patch, patch) -> (N, T, patch^2)
    img = ops.reshape(x, (n, g, patch, g, patch))
    img = ops.swapaxes(img, 2, 3)
    tokens = ops.reshape(img, (n, g * g, patch * patch))
    h = tokens @ values["embed_w"] + values["embed_b"] + values["pos"]
    # Attention.
    z = _layer_norm(h, ops)
    qkv = z @ values["qkv_w"]  # (N, T, 3*dim)
    hd = dim // heads
    t = g * g

    def split(a):
        return ops.swapaxes(ops.reshape(a, (n, t, heads, hd)), 1, 2)  # (N, heads, T, hd)

    q, k, v = (split(qkv[..., i * dim : (i + 1) * dim]) for i in range(3))
    att = ops.softmax(q @ ops.swapaxes(k, -1, -2) / math.sqrt(hd), -1)
    o = ops.reshape(ops.swapaxes(att @ v, 1, 2), (n, t, dim))
    h = h + o @ values["proj_w"]
    # Token MLP.
    z = _layer_norm(h, ops)
    h = h + ops.tanh(z @ values["mlp_w0"] + values["mlp_b0"]) @ values["mlp_w1"]
    pooled = ops.mean(_layer_norm(h, ops), 1)
    return pooled @ values["head_w"] + values["head_b"]


def vit_spec(side: int, patch: int, dim: int, heads: int, hidden: int, classes: int) -> ModelSpec:
    """A small ViT with ``N(0, 1/fan_in)``-scaled priors (unit-variance pre-activations)."""
    t = (side // patch) ** 2
    p2 = patch * patch
    latents = (
        LatentSpec("embed_w", (p2, dim), 1 / math.sqrt(p2)),
        LatentSpec("embed_b", (dim,), 1.0),
        LatentSpec("pos", (t, dim), 1.0),
        LatentSpec("qkv_w", (dim, 3 * dim), 1 / math.sqrt(dim)),
        LatentSpec("proj_w", (dim, dim), 1 / math.sqrt(dim)),
        LatentSpec("mlp_w0", (dim, hidden), 1 / math.sqrt(dim)),
        LatentSpec("mlp_b0", (hidden,), 1.0),
        LatentSpec("mlp_w1", (hidden, dim), 1 / math.sqrt(hidden)),
        LatentSpec("head_w", (dim, classes), 1 / math.sqrt(dim)),
        LatentSpec("head_b", (classes,), 1.0),
    )
    cfg = {"side": side, "patch": patch, "dim": dim, "heads": heads}
    return ModelSpec(latents, lambda v, x, ops: vit_forward(v, x, ops, cfg), "categorical")


# ---------------------------------------------------------------------------------------------
# Pyro and NumPyro models
# ---------------------------------------------------------------------------------------------


def pyro_model(spec: ModelSpec, prior: Any = None) -> Callable[..., Any]:
    """The Pyro model of ``spec``: ``model(x, y=None, batch_size=None)``.

    ``prior`` overrides the whole prior when ``spec.likelihood == "none"``: a callable returning
    a Pyro distribution for the single latent site (e.g. a dense Gaussian).
    """
    import pyro
    import pyro.distributions as dist

    def sample_latents():
        values = {}
        for s in spec.latents:
            if s.positive:
                d = dist.HalfNormal(s.prior_scale)
            else:
                d = dist.Normal(0.0, s.prior_scale)
            values[s.name] = pyro.sample(s.name, d.expand(s.shape).to_event(len(s.shape)))
        return values

    def model(x=None, y=None, batch_size=None):
        if spec.likelihood == "none":
            (site,) = spec.latents
            return pyro.sample(site.name, prior())
        values = sample_latents()
        with pyro.plate("data", x.shape[0], subsample_size=batch_size) as idx:
            out = spec.forward(values, x[idx], TORCH)
            obs = None if y is None else y[idx]
            if spec.likelihood == "categorical":
                pyro.sample("y", dist.Categorical(logits=out), obs=obs)
            elif spec.likelihood == "bernoulli":
                pyro.sample("y", dist.Bernoulli(logits=out.squeeze(-1)), obs=obs)
            else:
                pyro.sample("y", dist.Normal(out.squeeze(-1), values[spec.noise_site]), obs=obs)
        return out

    return model


def numpyro_model(spec: ModelSpec, prior: Any = None) -> Callable[..., Any]:
    """The NumPyro twin of :func:`pyro_model` (same sites, same priors, same forward)."""
    import numpyro
    import numpyro.distributions as dist

    ops = jax_ops

    def model(x=None, y=None, batch_size=None):
        if spec.likelihood == "none":
            (site,) = spec.latents
            return numpyro.sample(site.name, prior())
        values = {}
        for s in spec.latents:
            d = dist.HalfNormal(s.prior_scale) if s.positive else dist.Normal(0.0, s.prior_scale)
            values[s.name] = numpyro.sample(s.name, d.expand(s.shape).to_event(len(s.shape)))
        with numpyro.plate("data", x.shape[0], subsample_size=batch_size) as idx:
            out = spec.forward(values, x[idx], ops)
            obs = None if y is None else y[idx]
            if spec.likelihood == "categorical":
                numpyro.sample("y", dist.Categorical(logits=out), obs=obs)
            elif spec.likelihood == "bernoulli":
                numpyro.sample("y", dist.Bernoulli(logits=out.squeeze(-1)), obs=obs)
            else:
                numpyro.sample("y", dist.Normal(out.squeeze(-1), values[spec.noise_site]), obs=obs)
        return out

    return model
