"""Valid and invalid model/guide structures, after Pyro's ``tests/infer/test_valid_models.py``.

``assert_ok`` runs a few steps and checks that every loss is finite and that every guide parameter
moved; ``assert_error`` checks that the error type and a message naming the culprit are raised.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer.autoguide import (
    AutoDelta,
    AutoDiagonalNormal,
    AutoIAFNormal,
    AutoLowRankMultivariateNormal,
    AutoMultivariateNormal,
    AutoNormal,
)
from pyro.nn import PyroModule, PyroSample
from torch import nn

from pyro_scorevi import PolynomialGrowth, ScoreProximalSVI

ALL_GUIDES = [AutoNormal, AutoDiagonalNormal, AutoMultivariateNormal, AutoLowRankMultivariateNormal]
SUPPORTED = "AutoNormal, AutoDiagonalNormal, AutoMultivariateNormal, AutoLowRankMultivariateNormal"


def _guide_params(guide) -> dict[str, torch.Tensor]:
    prefix = guide._pyro_name + "."
    store = pyro.get_param_store()
    return {k: v.detach().clone() for k, v in store.items() if k.startswith(prefix)}


def assert_ok(model, guide, *args, num_steps=3, **svi_kwargs):
    """A few steps run, every loss is finite and every guide parameter changed."""
    svi = ScoreProximalSVI(model, guide, **svi_kwargs)
    with poutine.block():
        guide(*args)  # creates the guide's parameters so that they can be compared
    before = _guide_params(guide)
    assert before, "the guide created no parameters"
    losses = [svi.step(*args) for _ in range(num_steps)]
    assert all(isinstance(loss, float) for loss in losses)
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert svi.num_rejected_steps == 0
    after = _guide_params(guide)
    assert after.keys() == before.keys()
    for name, value in before.items():
        if name.endswith("scale_tril") and value.numel() == 1:
            continue  # a 1 x 1 unit lower Cholesky factor has no free entry
        assert not torch.equal(value, after[name]), f"{name} did not change"
    return svi


def assert_error(model, guide, *args, error=Exception, match=None, **svi_kwargs):
    """Construction or the first step raises ``error`` with a message matching ``match``."""
    with pytest.raises(error, match=match):
        svi = ScoreProximalSVI(model, guide, **svi_kwargs)
        svi.step(*args)


# ---------------------------------------------------------------------------- valid structures


@pytest.mark.parametrize("Guide", ALL_GUIDES)
def test_plate(Guide):
    def model(y):
        loc = pyro.sample("loc", dist.Normal(0.0, 10.0))
        with pyro.plate("data", len(y)):
            pyro.sample("obs", dist.Normal(loc, 1.0), obs=y)

    assert_ok(model, Guide(model), torch.randn(20))


@pytest.mark.parametrize("Guide", ALL_GUIDES)
def test_nested_plates_with_plate_local_latents(Guide):
    # Latents local to a plate that is not subsampled are global latents of the step.
    def model(y):
        loc = pyro.sample("loc", dist.Normal(0.0, 10.0))
        with pyro.plate("groups", 3, dim=-2):
            group_loc = pyro.sample("group_loc", dist.Normal(loc, 1.0))
            with pyro.plate("data", 5, dim=-1):
                pyro.sample("obs", dist.Normal(group_loc, 1.0), obs=y)

    assert_ok(model, Guide(model), torch.randn(3, 5))


@pytest.mark.parametrize("Guide", ALL_GUIDES)
def test_subsampled_plate(Guide):
    def model(y):
        loc = pyro.sample("loc", dist.Normal(0.0, 10.0))
        scale = pyro.sample("scale", dist.LogNormal(0.0, 1.0))
        with pyro.plate("data", len(y), subsample_size=8) as idx:
            pyro.sample("obs", dist.Normal(loc, scale), obs=y[idx])

    assert_ok(model, Guide(model), torch.randn(100))


def test_explicit_subsample_indices():
    def model(y, idx):
        loc = pyro.sample("loc", dist.Normal(0.0, 10.0))
        with pyro.plate("data", len(y), subsample=idx):
            pyro.sample("obs", dist.Normal(loc, 1.0), obs=y[idx])

    assert_ok(model, AutoNormal(model), torch.randn(50), torch.arange(10))


CONSTRAINED = {
    "positive": lambda: dist.Gamma(2.0, 3.0),
    "unit_interval": lambda: dist.Beta(2.0, 2.0),
    "simplex": lambda: dist.Dirichlet(torch.ones(4)),
    "corr_cholesky": lambda: dist.LKJCholesky(3, concentration=2.0),
    "lower_bounded": lambda: dist.Pareto(1.5, 3.0),  # support: greater_than(1.5)
    "interval": lambda: dist.Uniform(-2.0, 5.0),
}


@pytest.mark.parametrize("Guide", ALL_GUIDES)
@pytest.mark.parametrize("support", sorted(CONSTRAINED))
def test_constrained_latent(Guide, support):
    def model():
        value = pyro.sample("z", CONSTRAINED[support]())
        pyro.sample("obs", dist.Normal(value.sum(), 1.0), obs=torch.tensor(0.5))

    svi = assert_ok(model, Guide(model))
    # The fitted guide's draws respect the constraint.
    sample = Guide.__call__(svi.guide)["z"]
    assert bool(CONSTRAINED[support]().support.check(sample).all())


@pytest.mark.parametrize("Guide", ALL_GUIDES)
def test_vector_and_matrix_shaped_latents(Guide):
    def model(y):
        w = pyro.sample("w", dist.Normal(torch.zeros(3, 2), 1.0).to_event(2))
        b = pyro.sample("b", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        with pyro.plate("data", len(y)):
            pyro.sample("obs", dist.Normal(w.sum() + b.sum(), 1.0), obs=y)

    svi = assert_ok(model, Guide(model), torch.randn(10))
    median = svi.guide.median(torch.randn(10))
    assert median["w"].shape == (3, 2) and median["b"].shape == (2,)


class _BayesianLinear(PyroModule):
    def __init__(self, deterministic_head: bool = False):
        super().__init__()
        self.layer = PyroModule[nn.Linear](3, 4)
        self.layer.weight = PyroSample(dist.Normal(0.0, 1.0).expand([4, 3]).to_event(2))
        self.layer.bias = PyroSample(dist.Normal(0.0, 1.0).expand([4]).to_event(1))
        # A layer left as nn.Parameters: the model's own pyro.param sites.
        self.head = PyroModule[nn.Linear](4, 1) if deterministic_head else None

    def forward(self, x, y=None):
        h = torch.tanh(self.layer(x))
        out = self.head(h).squeeze(-1) if self.head is not None else h.sum(-1)
        with pyro.plate("data", x.shape[0], subsample_size=16) as idx:
            pyro.sample("obs", dist.Normal(out[idx], 0.5), obs=y[idx])
        return out


@pytest.mark.parametrize("Guide", [AutoNormal, AutoDiagonalNormal])
def test_pyro_module_with_pyro_sample_priors(Guide):
    x, y = torch.randn(64, 3), torch.randn(64)
    net = _BayesianLinear()
    svi = assert_ok(net, Guide(net), x, y)
    names = {name for name, _ in svi.guide.prototype_trace.iter_stochastic_nodes()}
    assert names == {"layer.weight", "layer.bias"}


def test_pyro_module_deterministic_layer_learned_with_optim():
    x, y = torch.randn(64, 3), torch.randn(64)
    net = _BayesianLinear(deterministic_head=True)
    guide = AutoNormal(net)
    assert_ok(net, guide, x, y)  # without optim: the head is held fixed
    head_before = net.head.weight.detach().clone()
    svi = ScoreProximalSVI(net, guide, optim=pyro.optim.Adam({"lr": 0.05}))
    for _ in range(3):
        svi.step(x, y)
    assert not torch.equal(net.head.weight.detach(), head_before)


def _model_with_param(y):
    noise = pyro.param("noise", torch.tensor(1.0), constraint=dist.constraints.positive)
    loc = pyro.sample("loc", dist.Normal(0.0, 10.0))
    with pyro.plate("data", len(y)):
        pyro.sample("obs", dist.Normal(loc, noise), obs=y)


@pytest.mark.parametrize("Guide", ALL_GUIDES)
def test_model_param_is_held_fixed_without_optim(Guide, caplog):
    y = 3.0 * torch.randn(50)
    assert_ok(_model_with_param, Guide(_model_with_param), y)
    assert pyro.param("noise").item() == 1.0  # bitwise: exactly the initial value
    assert "held fixed" in caplog.text


@pytest.mark.parametrize("Guide", ALL_GUIDES)
def test_model_param_is_learned_with_optim(Guide):
    # Data with sd 3: maximising the ELBO over the noise moves it from 1 towards 3.
    y = 3.0 * torch.randn(200, generator=torch.Generator().manual_seed(0))
    guide = Guide(_model_with_param)
    svi = ScoreProximalSVI(_model_with_param, guide, optim=pyro.optim.Adam({"lr": 0.05}))
    for _ in range(40):
        svi.step(y)
    assert pyro.param("noise").item() > 1.5


# ---------------------------------------------------------------------------- invalid structures


@pytest.mark.parametrize("Guide", ALL_GUIDES)
def test_local_latent_in_subsampled_plate_is_not_implemented(Guide):
    def model(y):
        loc = pyro.sample("loc", dist.Normal(0.0, 1.0))
        with pyro.plate("data", len(y), subsample_size=10) as idx:
            z = pyro.sample("z_local", dist.Normal(loc, 1.0))
            pyro.sample("obs", dist.Normal(z, 1.0), obs=y[idx])

    # Pyro's AutoContinuous guides refuse local latents themselves; the message need not name
    # the site there, but ScoreProximalSVI's own check (AutoNormal) must.
    match = "z_local" if Guide is AutoNormal else None
    assert_error(model, Guide(model), torch.randn(100), error=NotImplementedError, match=match)


@pytest.mark.parametrize("Guide", ALL_GUIDES)
def test_discrete_latent_is_an_error_naming_the_site(Guide):
    def model():
        p = pyro.sample("p", dist.Beta(1.0, 1.0))
        coin = pyro.sample("coin", dist.Bernoulli(p))
        pyro.sample("obs", dist.Normal(coin, 1.0), obs=torch.tensor(0.0))

    assert_error(model, Guide(model), error=(ValueError, NotImplementedError), match="'coin'")


@pytest.mark.parametrize("Guide", ALL_GUIDES)
def test_model_changed_after_guide_was_built(Guide):
    extra = {"site": False}

    def model():
        pyro.sample("a", dist.Normal(0.0, 1.0))
        if extra["site"]:
            pyro.sample("b_new", dist.Normal(0.0, 1.0))

    guide = Guide(model)
    svi = ScoreProximalSVI(model, guide)
    svi.step()
    extra["site"] = True
    with pytest.raises(ValueError, match="'b_new'"):
        svi.step()


@pytest.mark.parametrize(
    "make_guide",
    [
        AutoDelta,
        lambda model: AutoIAFNormal(model, num_transforms=1),
        lambda model: lambda: pyro.sample("x", dist.Normal(0.0, 1.0)),
    ],
    ids=["AutoDelta", "AutoIAFNormal", "hand_written"],
)
def test_unsupported_guide(make_guide):
    def model():
        pyro.sample("x", dist.Normal(torch.zeros(2), 1.0).to_event(1))

    assert_error(model, make_guide(model), error=TypeError, match=SUPPORTED)


def _simple_model():
    pyro.sample("x", dist.Normal(1.0, 2.0))  # not centred at the guide's initial loc 0


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"num_particles": 0}, ValueError, "num_particles"),
        ({"num_particles": -1}, ValueError, "num_particles"),
        ({"num_particles": 1.5}, TypeError, "num_particles"),
        ({"num_particles": True}, TypeError, "num_particles"),
        ({"prox_weight": 0}, ValueError, "prox_weight"),
        ({"prox_weight": -1}, ValueError, "prox_weight"),
        ({"prox_weight": float("nan")}, ValueError, "prox_weight"),
        ({"prox_weight": "a"}, TypeError, "prox_weight"),
        ({"prox_weight": True}, TypeError, "prox_weight"),
        ({"scale_prox_weight": 0}, ValueError, "scale_prox_weight > 0"),
        ({"scale_prox_weight": float("nan")}, ValueError, "scale_prox_weight"),
        ({"scale_prox_weight": "a"}, TypeError, "scale_prox_weight"),
        ({"num_alternations": 0}, ValueError, "num_alternations"),
        ({"num_inner_steps": 1}, ValueError, "num_inner_steps"),
        ({"optim": torch.optim.Adam}, TypeError, "optim"),
        ({"optim": "adam"}, TypeError, "optim"),
        ({"inner_optim": {"lr": 0.1}}, TypeError, "inner_optim"),
        ({"antithetic": "yes"}, TypeError, "antithetic"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    assert_error(_simple_model, AutoNormal(_simple_model), error=error, match=match, **kwargs)


def test_bad_arguments_fail_at_construction():
    # Validation happens in __init__, before any model evaluation.
    with pytest.raises(ValueError, match="num_particles"):
        ScoreProximalSVI(_simple_model, AutoNormal(_simple_model), num_particles=0)
    with pytest.raises(TypeError, match=SUPPORTED):
        ScoreProximalSVI(_simple_model, AutoDelta(_simple_model))


def test_scale_schedule_that_goes_non_positive_is_an_error_naming_it():
    svi = ScoreProximalSVI(
        _simple_model, AutoNormal(_simple_model), scale_prox_weight=lambda t: 1.0 - t
    )
    svi.step()
    with pytest.raises(ValueError, match="scale_prox_weight must be positive"):
        svi.step()


def test_scale_prox_weight_is_for_diagonal_guides():
    svi = ScoreProximalSVI(
        _simple_model, AutoMultivariateNormal(_simple_model), scale_prox_weight=1e3
    )
    with pytest.raises(NotImplementedError, match="scale_prox_weight supports AutoNormal"):
        svi.step()


def test_schedule_that_goes_non_positive_is_an_error_naming_prox_weight():
    svi = ScoreProximalSVI(_simple_model, AutoNormal(_simple_model), prox_weight=lambda t: 1.0 - t)
    svi.step()
    with pytest.raises(ValueError, match="prox_weight"):
        svi.step()


def test_schedule_object_is_accepted():
    assert_ok(
        _simple_model, AutoNormal(_simple_model), prox_weight=PolynomialGrowth(10.0, 5.0, 1.0)
    )
