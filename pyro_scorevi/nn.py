"""Turn an existing ``torch.nn.Module`` into a Bayesian Pyro model.

Two pieces, both built on Pyro's own :func:`pyro.nn.module.to_pyro_module_` and
:class:`~pyro.nn.PyroSample`:

* :func:`bayesianize_` converts a network (an MLP, a ResNet, a vision transformer, anything
  built from ``nn.Module`` s) **in place** into a :class:`~pyro.nn.PyroModule` whose chosen
  parameters are latent sample sites with a chosen prior. The other parameters stay ordinary
  ``nn.Parameter`` s: deterministic weights that ``ScoreProximalSVI`` holds fixed unless it is
  given ``optim=`` (``pyro.infer.SVI`` fits them with its optimiser, as always).
* :class:`BayesianClassifier` wraps such a network into a classification model
  ``forward(x, y=None)`` with a correctly subsampled likelihood: the mini-batch indices are
  drawn by ``pyro.plate("data", N, subsample_size=B)``, the network runs *outside* the plate
  (so its weights are global latents, not one copy per data point) and only the likelihood
  sits inside it (scaled by :math:`N/B`, which keeps the scores unbiased).

Example:
    >>> import pyro, torch
    >>> from pyro.infer.autoguide import AutoNormal
    >>> from pyro_scorevi import ScoreProximalSVI
    >>> from pyro_scorevi.nn import BayesianClassifier, bayesianize_, bayesian_names
    >>> pyro.clear_param_store(); pyro.set_rng_seed(0)
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    >>> net = bayesianize_(net, prior=1.0, exclude="0.bias")
    >>> bayesian_names(net)
    ['0.weight', '2.weight', '2.bias']
    >>> model = BayesianClassifier(net, batch_size=16)
    >>> x, y = torch.randn(100, 4), torch.randint(3, (100,))
    >>> svi = ScoreProximalSVI(model, AutoNormal(model))
    >>> loss = svi.step(x, y)
    >>> sorted(pyro.get_param_store().keys())[:2]
    ['AutoNormal.locs.net.0.weight', 'AutoNormal.locs.net.2.bias']

Devices and dtypes: call ``module.to(device, dtype)`` *before* :func:`bayesianize_`; each prior
is built on the device and in the dtype of the parameter it replaces.
"""

from __future__ import annotations

import fnmatch
import functools
import logging
import numbers
import weakref
from collections.abc import Callable, Iterable
from typing import Union

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions.torch_distribution import TorchDistributionMixin
from pyro.infer.autoguide.initialization import init_to_feasible
from pyro.nn import PyroModule, PyroSample
from pyro.nn.module import to_pyro_module_

__all__ = [
    "bayesianize_",
    "bayesian_names",
    "init_to_network",
    "BayesianClassifier",
    "Prior",
    "Selector",
]

logger = logging.getLogger(__name__)

# Each prior that bayesianize_ builds -> the value of the parameter it replaced. Keyed by the
# distribution object itself (the ``fn`` of its sample site), so the lookup does not depend on
# the site's name, which gains a prefix once the module becomes a submodule.
_NETWORK_VALUES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

#: A prior: a scale ``sigma > 0`` (i.i.d. ``Normal(0, sigma)``), a univariate distribution
#: expanded to each parameter's shape, or ``prior(name, param) -> Distribution``.
Prior = Union[float, dist.Distribution, Callable[[str, torch.Tensor], dist.Distribution]]

#: Which parameters: an fnmatch pattern on the dotted parameter name (``"blocks.*.mlp.*"``), an
#: ``nn.Module`` subclass (every parameter owned by such a layer), a list mixing both, or
#: ``select(name, param) -> bool``.
Selector = Union[str, type, Iterable[Union[str, type]], Callable[[str, torch.Tensor], bool]]


def bayesianize_(
    module: torch.nn.Module,
    prior: Prior = 1.0,
    *,
    include: Selector | None = None,
    exclude: Selector | None = None,
) -> PyroModule:
    """Makes the chosen parameters of ``module`` latent :class:`~pyro.nn.PyroSample` sites.

    The module is converted in place with :func:`pyro.nn.module.to_pyro_module_` (its class
    becomes ``PyroModule[cls]``, its forward is unchanged), then each selected parameter
    ``name`` is replaced by ``PyroSample(prior)``: inside a Pyro model every forward pass
    samples (or, under a guide, replays) one value of it per call of the root module, at the
    site ``name`` (prefixed by the attribute path once the module is a submodule of another
    ``PyroModule``, e.g. ``"net.0.weight"`` in :class:`BayesianClassifier`).

    A parameter is selected when it matches ``include`` (default: every parameter) and not
    ``exclude``. Unselected parameters stay ``nn.Parameter`` s: Pyro records them as
    ``pyro.param`` sites of the model, which ``ScoreProximalSVI`` holds fixed unless given
    ``optim=`` (a warning says so once).

    Args:
        module: the network; move it to its device and dtype first.
        prior: ``sigma > 0`` for i.i.d. :math:`\\mathcal N(0, \\sigma^2)` weights (default
            ``1.0``); a distribution with ``batch_shape == event_shape == ()``, expanded to each
            parameter's shape (e.g. ``dist.Laplace(0., 0.1)``); or a callable
            ``prior(name, param)`` returning a distribution whose ``batch_shape + event_shape``
            is ``param.shape`` (made one event with ``to_event``) or a univariate one (expanded).
            ``name`` is the dotted parameter name, ``param`` the current value (for its shape,
            dtype, device, or fan-in scaled priors).
        include: the parameters to make Bayesian (see :data:`Selector`); ``None`` means all.
        exclude: parameters to keep deterministic, applied after ``include``.

    Returns:
        ``module`` itself, now a ``PyroModule``.

    Raises:
        TypeError: ``module`` is not an ``nn.Module``, or a selector or prior has a bad type.
        ValueError: a pattern or layer type matches no parameter, nothing is selected, a
            selected parameter is shared (tied weights), or a prior's shape does not fit.
    """
    if not isinstance(module, torch.nn.Module):
        raise TypeError(
            f"module must be a torch.nn.Module (got {type(module).__name__}); pass the network "
            "itself, e.g. bayesianize_(torch.nn.Linear(4, 2))."
        )
    owners = _parameter_owners(module)
    if not owners:
        raise ValueError(
            f"module has no nn.Parameter left to make Bayesian (got {type(module).__name__}, "
            f"Bayesian sites already: {bayesian_names(module)})."
        )
    keep = _select("include", include, owners, default=True)
    drop = _select("exclude", exclude, owners, default=False)
    chosen = [name for name in owners if keep[name] and not drop[name]]
    if not chosen:
        raise ValueError(
            f"include={include!r} and exclude={exclude!r} select no parameter of "
            f"{type(module).__name__} (its parameters: {_preview(owners)}); loosen them."
        )
    shared = _shared_parameters(module)
    for name in chosen:
        if name in shared:
            raise ValueError(
                f"parameter {name!r} is shared with {shared[name]} (tied weights); a PyroSample "
                f"per attribute would untie them. Exclude it with exclude=[{name!r}] or untie "
                "the weights before bayesianize_."
            )
    priors = {name: _make_prior(prior, name, owners[name][2]) for name in chosen}
    for name in chosen:
        # The replaced tensor itself, not a copy: no memory beyond the network's own weights.
        _NETWORK_VALUES[priors[name]] = owners[name][2].detach()
    to_pyro_module_(module)
    owners = _parameter_owners(module)  # same names; the owners are PyroModules now
    for name in chosen:
        owner, attr, param = owners[name]
        setattr(owner, attr, PyroSample(priors[name]))
    total = sum(p.numel() for _, _, p in owners.values())
    latent = sum(owners[n][2].numel() for n in chosen)
    logger.info(
        "bayesianize_: %d of %d parameter tensors (%d of %d scalars) are now latent sites",
        len(chosen),
        len(owners),
        latent,
        total,
    )
    return module


def init_to_network(site: dict | None = None, fallback: Callable | None = init_to_feasible):
    """Autoguide initialisation at the network's own weights (``init_loc_fn=init_to_network``).

    A latent site made by :func:`bayesianize_` starts at the value its parameter had before the
    conversion (pretrained weights, or the layer's own initialisation: ones for ``LayerNorm``
    gains, fan-in scaled ``Linear`` weights), instead of the prior's median (zero), which would
    start every weight of a layer at the same value. Other sites go to ``fallback``.

    Example:
        >>> import pyro, torch
        >>> from pyro.infer.autoguide import AutoNormal
        >>> from pyro_scorevi.nn import bayesianize_, init_to_network
        >>> pyro.clear_param_store()
        >>> net = torch.nn.LayerNorm(3)
        >>> guide = AutoNormal(bayesianize_(net), init_loc_fn=init_to_network)
        >>> guide(torch.randn(2, 3))["weight"].shape
        torch.Size([3])
        >>> pyro.param("AutoNormal.locs.weight").tolist()
        [1.0, 1.0, 1.0]
    """
    if site is None:
        return functools.partial(init_to_network, fallback=fallback)
    value = _NETWORK_VALUES.get(site["fn"])
    if value is not None and value.shape == site["fn"].shape():
        return value.clone()  # the guide may update its init tensor in place
    if fallback is None:
        raise ValueError(
            f"site {site['name']!r} was not made by bayesianize_ and fallback=None; pass "
            "fallback=pyro.infer.autoguide.init_to_feasible (the default)."
        )
    return fallback(site)


def bayesian_names(module: torch.nn.Module) -> list[str]:
    """Dotted names, relative to ``module``, of its :class:`~pyro.nn.PyroSample` attributes,
    in the order of ``module.named_modules()`` (the site names when ``module`` is the root)."""
    names = []
    for prefix, sub in module.named_modules():
        for attr in getattr(sub, "_pyro_samples", {}):
            names.append(f"{prefix}.{attr}" if prefix else attr)
    return names


class BayesianClassifier(PyroModule):
    """A classification model :math:`y_i \\sim \\mathrm{Categorical}(\\mathrm{softmax}
    f_\\theta(x_i))` around a (Bayesian) network :math:`f_\\theta`.

    Three ways to feed data, all with an unbiased :math:`N/B`-scaled likelihood:

    * ``x`` is the whole training set and ``batch_size = B``: each call draws ``B`` indices
      (``pyro.plate("data", N, subsample_size=B)``);
    * ``x`` is the whole training set and ``forward(..., subsample=idx)`` passes the indices
      (e.g. this process's share of a data-parallel mini-batch);
    * ``x`` is a mini-batch that the caller drew (a ``DataLoader``) and ``num_data = N`` is the
      size of the training set.

    Without any of these the likelihood covers all of ``x``; so does a prediction
    (``y=None``, as in :class:`pyro.infer.Predictive` on test inputs), whatever ``batch_size``.
    The network always runs outside the plate on ``x[idx]``, so its weights are global latents.
    Build one ``BayesianClassifier`` per network and use it for training and prediction alike:
    Pyro does not let a ``PyroModule`` that has run be adopted by a second parent.

    Args:
        net: a module mapping inputs ``(B, ...)`` to logits ``(B, C)``, usually made Bayesian
            with :func:`bayesianize_` first (a plain ``nn.Module`` is converted to a
            ``PyroModule`` with all parameters deterministic).
        num_data: :math:`N`, the training-set size when ``x`` is a mini-batch; ``None`` means
            ``len(x)``.
        batch_size: :math:`B`, indices drawn per training call (``y`` given) from a full ``x``;
            ``None``: no drawing.

    Returns (``forward``): the logits of the mini-batch, ``(B, C)``. The observation site is
    ``"obs"``, the plate ``"data"``.
    """

    def __init__(
        self, net: torch.nn.Module, *, num_data: int | None = None, batch_size: int | None = None
    ):
        if not isinstance(net, torch.nn.Module):
            raise TypeError(
                f"net must be a torch.nn.Module mapping inputs to logits (got "
                f"{type(net).__name__})."
            )
        for name, value in (("num_data", num_data), ("batch_size", batch_size)):
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1
            ):
                raise ValueError(f"{name} must be None or an int >= 1 (got {name} = {value!r}).")
        super().__init__()
        if not isinstance(net, PyroModule):
            to_pyro_module_(net)
        self.net = net
        self.num_data = None if num_data is None else int(num_data)
        self.batch_size = None if batch_size is None else int(batch_size)

    def forward(
        self,
        x: torch.Tensor,
        y: torch.Tensor | None = None,
        *,
        subsample: torch.Tensor | None = None,
    ) -> torch.Tensor:
        size = x.shape[0]
        num_data = size if self.num_data is None else self.num_data
        if y is not None and y.shape[0] != size:
            raise ValueError(
                f"y must have one label per row of x (got x.shape[0] = {size}, y.shape[0] = "
                f"{y.shape[0]})."
            )
        # batch_size draws training mini-batches only: a prediction (y=None) covers all of x.
        batch_size = None if y is None else self.batch_size
        whole = subsample is None and batch_size is None  # the likelihood covers all of x
        if num_data != size:  # x is a mini-batch of a training set of num_data points
            if not whole:
                raise ValueError(
                    f"x holds {size} rows but num_data = {num_data}: x is read as a mini-batch, "
                    "which cannot be subsampled again; drop subsample= / batch_size, or pass "
                    "the whole training set as x."
                )
            subsample = torch.arange(size, device=x.device)  # scale N / B, no reindexing
        plate = pyro.plate(
            "data",
            num_data,
            subsample_size=None if subsample is not None else batch_size,
            subsample=subsample,
            device=x.device,
        )
        with plate as idx:  # draws (or takes) the indices; nothing is sampled inside
            pass
        logits = self.net(x if whole else x[idx])
        with plate:
            pyro.sample(
                "obs",
                dist.Categorical(logits=logits),
                obs=None if y is None else (y if whole else y[idx]),
            )
        return logits


# ----------------------------------------------------------------------------- helpers


def _parameter_owners(
    module: torch.nn.Module,
) -> dict[str, tuple[torch.nn.Module, str, torch.Tensor]]:
    """Dotted name -> (owning module, attribute, parameter), first owner of a shared one."""
    owners = {}
    for prefix, sub in module.named_modules():
        for attr, param in sub._parameters.items():
            if param is None:
                continue
            name = f"{prefix}.{attr}" if prefix else attr
            owners[name] = (sub, attr, param)
    return owners


def _shared_parameters(module: torch.nn.Module) -> dict[str, list[str]]:
    """Parameter name -> the other names of the same tensor, for tied parameters only."""
    by_id: dict[int, list[str]] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(param), []).append(name)
    shared = {}
    for names in by_id.values():
        if len(names) > 1:
            for name in names:
                shared[name] = [n for n in names if n != name]
    return shared


def _select(arg: str, selector, owners, default: bool) -> dict[str, bool]:
    if selector is None:
        return {name: default for name in owners}
    if callable(selector) and not isinstance(selector, type):
        return {name: bool(selector(name, p)) for name, (_, _, p) in owners.items()}
    items = [selector] if isinstance(selector, (str, type)) else list(selector)
    chosen = {name: False for name in owners}
    for item in items:
        if isinstance(item, str):
            hits = [n for n in owners if fnmatch.fnmatchcase(n, item)]
        elif isinstance(item, type) and issubclass(item, torch.nn.Module):
            hits = [n for n, (m, _, _) in owners.items() if isinstance(m, item)]
        else:
            raise TypeError(
                f"{arg} must be None, a callable (name, param) -> bool, an fnmatch pattern, an "
                f"nn.Module subclass, or a list of patterns / subclasses (got "
                f"{type(item).__name__} {item!r} in {arg}={selector!r})."
            )
        if not hits:
            what = item if isinstance(item, str) else item.__name__
            raise ValueError(
                f"{arg} entry {what!r} matches no parameter (parameters: {_preview(owners)}); "
                "patterns match the dotted names of module.named_parameters() with fnmatch."
            )
        for name in hits:
            chosen[name] = True
    return chosen


def _make_prior(prior, name: str, param: torch.Tensor) -> dist.Distribution:
    shape = param.shape
    if isinstance(prior, numbers.Real) and not isinstance(prior, bool):
        if not prior > 0:
            raise ValueError(
                f"prior must satisfy prior > 0 when it is a Normal scale (got prior = {prior!r})"
                "; e.g. prior=1.0 for Normal(0, 1) weights."
            )
        zero = torch.zeros((), dtype=param.dtype, device=param.device)
        base = dist.Normal(zero, zero + float(prior))
    elif isinstance(prior, torch.distributions.Distribution):
        base = prior
    elif callable(prior):
        base = prior(name, param.detach())
        if not isinstance(base, torch.distributions.Distribution):
            raise TypeError(
                f"prior({name!r}, param) must return a pyro.distributions distribution (got "
                f"{type(base).__name__})."
            )
    else:
        raise TypeError(
            f"prior must be a positive float, a distribution or a callable (name, param) -> "
            f"distribution (got {type(prior).__name__} {prior!r})."
        )
    if not isinstance(base, TorchDistributionMixin):
        raise TypeError(
            f"the prior of {name!r} must be a pyro.distributions distribution, which has "
            f".expand/.to_event (got {type(base).__module__}.{type(base).__name__}); use "
            "pyro.distributions instead of torch.distributions."
        )
    full = tuple(base.batch_shape + base.event_shape)
    if full == ():
        return base.expand(shape).to_event(len(shape))
    if full == tuple(shape):  # expand: a fresh object per parameter, even for a shared prior
        return base.expand(base.batch_shape).to_event(len(base.batch_shape))
    raise ValueError(
        f"the prior of {name!r} has batch_shape + event_shape = {full}, but the parameter has "
        f"shape {tuple(shape)}; return a univariate distribution (it is expanded) or one of "
        "that shape."
    )


def _preview(owners, limit: int = 8) -> str:
    names = list(owners)
    more = f", ... ({len(names)} in all)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more
