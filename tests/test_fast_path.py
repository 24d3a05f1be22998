"""The traced fast path gives the same update as the eager path, and falls back where it must."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.autoguide import AutoDiagonalNormal, AutoNormal
from pyro.nn import PyroModule, PyroSample

from pyro_scorevi import ScoreProximalSVI


class Net(PyroModule):
    """A PyroModule network, a positive noise scale and a subsampled likelihood."""

    def __init__(self):
        super().__init__()
        self.fc = PyroModule[torch.nn.Linear](3, 4)
        self.fc.weight = PyroSample(dist.Normal(0.0, 1.0).expand([4, 3]).to_event(2))
        self.fc.bias = PyroSample(dist.Normal(0.0, 1.0).expand([4]).to_event(1))

    def forward(self, x, y):
        sigma = pyro.sample("sigma", dist.LogNormal(0.0, 1.0))
        data = pyro.plate("data", x.shape[0], subsample_size=16)
        with data as idx:
            pass
        mean = torch.tanh(self.fc(x[idx])).sum(-1)
        with data:
            pyro.sample("y", dist.Normal(mean, sigma), obs=y[idx])


def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(100, 3, generator=g)
    y = torch.tanh(
        x
        @ torch.ones(
            3,
            4,
        )
    ).sum(-1) + 0.1 * torch.randn(
        100,
        generator=g,
    )
    return x, y


def fit(guide_cls, fast_path, steps=30, **hyperparameters):
    pyro.clear_param_store()
    pyro.set_rng_seed(1)
    model = Net()
    guide = guide_cls(model)
    svi = ScoreProximalSVI(model, guide, fast_path=fast_path, **hyperparameters)
    x, y = data()
    losses = [svi.step(x, y) for _ in range(steps)]
    params = {k: v.detach().clone() for k, v in pyro.get_param_store().items()}
    return losses, params, svi


@pytest.mark.parametrize(
    "guide_cls, hyperparameters",
    [
        (AutoNormal, {}),
        (AutoDiagonalNormal, {}),
        (AutoNormal, {"prox_weight": 10.0, "scale_prox_weight": 1e3}),
    ],
)
def test_traced_step_equals_eager_step(guide_cls, hyperparameters):
    eager_losses, eager, _ = fit(guide_cls, False, **hyperparameters)
    traced_losses, traced, svi = fit(guide_cls, True, **hyperparameters)
    assert len(svi._particle_sums._graphs) == 1  # the graph was built and kept
    # Same ATen operations on the same random numbers: identical up to float reassociation
    # (identity tier).
    assert torch.allclose(torch.tensor(eager_losses), torch.tensor(traced_losses), rtol=1e-6)
    for name in eager:
        assert torch.allclose(eager[name], traced[name], rtol=1e-6, atol=1e-7), name


def test_default_step_sees_a_rebound_global():
    # SVI.step semantics: the model is called every step, so data read from a global that is
    # rebound mid-run is seen (a traced graph would keep the values it was traced with).
    g = torch.Generator().manual_seed(0)
    globals_ = {"data": torch.randn(200, generator=g)}

    def model():
        mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
        with pyro.plate("data", 200):
            pyro.sample("y", dist.Normal(mu, 1.0), obs=globals_["data"])

    pyro.clear_param_store()
    svi = ScoreProximalSVI(model, AutoNormal(model))
    for _ in range(300):
        svi.step()
    assert abs(pyro.param("AutoNormal.locs.mu").item() - globals_["data"].mean().item()) < 0.1
    globals_["data"] = globals_["data"] + 5.0
    for _ in range(1000):
        svi.step()
    # Posterior sd 1/sqrt(200) = 0.07: within 3 sds of the new mean.
    assert abs(pyro.param("AutoNormal.locs.mu").item() - globals_["data"].mean().item()) < 0.21


def model_with_param(y):
    shift = pyro.param("shift", torch.tensor(0.0))
    mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.Normal(mu + shift, 1.0), obs=y)


def test_required_fast_path_names_why_it_cannot_be_used():
    guide = AutoNormal(model_with_param)
    svi = ScoreProximalSVI(model_with_param, guide, pyro.optim.Adam({"lr": 0.01}), fast_path=True)
    with pytest.raises(RuntimeError, match="pyro.param sites"):
        svi.step(torch.ones(10))


def test_bad_fast_path_value():
    model = model_with_param
    with pytest.raises(TypeError, match="fast_path must be"):
        ScoreProximalSVI(model, AutoNormal(model), fast_path="yes")


@pytest.mark.slow
def test_compiled_step_matches_eager_step():
    # torch.compile fuses kernels, so the match is up to float rounding, not bitwise.
    eager_losses, eager, _ = fit(AutoNormal, False, steps=3)
    compiled_losses, compiled, _ = fit(AutoNormal, "compile", steps=3)
    for name in eager:
        assert torch.allclose(eager[name], compiled[name], rtol=1e-4, atol=1e-6), name


def test_fixed_model_params_are_graph_constants():
    # Without optim= the model's pyro.param sites are held fixed, so the graph can be used.
    guide = AutoNormal(model_with_param)
    svi = ScoreProximalSVI(model_with_param, guide, fast_path=True)
    y = torch.full((10,), 2.0)
    for _ in range(3):
        svi.step(y)
    assert all(g is not None for g in svi._particle_sums._graphs.values())
    assert pyro.param("shift").item() == 0.0


def test_model_without_latent_sites_is_named():
    def model(y):
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Normal(0.0, 1.0), obs=y)

    svi = ScoreProximalSVI(model, AutoNormal(model))
    with pytest.raises(ValueError, match="no latent sample sites"):
        svi.step(torch.ones(3))
