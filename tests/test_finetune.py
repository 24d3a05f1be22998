"""Bayesian fine-tuning of a pretrained network, both backends (``benchmarks/bench_finetune.py``
measures it on the comparison's networks).

The user's case: the weights of a trained network become the means of an ``AutoNormal`` guide
(Pyro: a torch network trained by torch, ``bayesianize_`` and ``init_to_network``; NumPyro: a MAP
fit and ``init_to_value``) with a tiny ``init_scale`` (1e-6: BayesDLL's convention), and
``ScoreProximalSVI(model, guide)`` fits it with nothing else set. The fit must keep what the
network learned (its training accuracy), step at every iteration (no rejected steps), and widen
its scales from the start without any becoming non-finite or zero.
"""

from __future__ import annotations

import numpy as np
import pytest

HIDDEN, CLASSES, N = 16, 3, 300


def _data():
    rng = np.random.default_rng(0)
    centres = rng.normal(scale=2.0, size=(CLASSES, 4))
    y = rng.integers(CLASSES, size=N)
    x = centres[y] + rng.normal(size=(N, 4))
    return x.astype(np.float32), y.astype(np.int64)


def _accuracy(logits, y) -> float:
    return float((np.asarray(logits).argmax(-1) == y).mean())


def test_pyro_finetune_keeps_the_pretrained_network():
    # The library's route: a network trained with plain torch, bayesianize_, init_to_network.
    import pyro
    import torch
    from pyro import poutine
    from pyro.infer.autoguide import AutoNormal

    from pyro_scorevi import ScoreProximalSVI
    from pyro_scorevi.nn import BayesianClassifier, bayesianize_, init_to_network

    x_np, y_np = _data()
    x, y = torch.as_tensor(x_np), torch.as_tensor(y_np)
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(4, HIDDEN), torch.nn.Tanh(), torch.nn.Linear(HIDDEN, CLASSES)
    )
    optimiser = torch.optim.Adam(net.parameters(), lr=0.01)
    for _ in range(600):
        idx = torch.randint(N, (64,))
        loss = torch.nn.functional.cross_entropy(net(x[idx]), y[idx])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    with torch.no_grad():
        map_accuracy = _accuracy(net(x), y_np)
    assert map_accuracy > 0.85  # the pretrained network has learned

    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    model = BayesianClassifier(bayesianize_(net, prior=1.0), batch_size=64)
    guide = AutoNormal(model, init_loc_fn=init_to_network, init_scale=1e-6)
    svi = ScoreProximalSVI(model, guide)
    losses = [svi.step(x, y) for _ in range(400)]
    assert np.isfinite(losses).all() and svi.num_rejected_steps == 0
    with torch.no_grad():
        medians = guide.median(x, y)
        scales = torch.cat([guide._get_loc_and_scale(k)[1].reshape(-1) for k in medians])
        logits = poutine.condition(model, data=medians)(x)
    assert torch.isfinite(scales).all() and (scales > 0).all()
    assert float(scales.median()) > 2e-6  # the scales widen from the start (measured: 2.3e-5)
    assert _accuracy(logits, y_np) >= map_accuracy - 0.02


def test_numpyro_finetune_keeps_the_pretrained_network():
    pytest.importorskip("numpyro")
    import jax
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as dist
    from numpyro.infer import SVI, Trace_ELBO
    from numpyro.infer.autoguide import AutoDelta, AutoNormal
    from numpyro.infer.initialization import init_to_median, init_to_value

    from pyro_scorevi.numpyro import ScoreProximalSVI

    x_np, y_np = _data()
    x, y = jnp.asarray(x_np), jnp.asarray(y_np)

    def logits(w1, b1, w2, b2):
        return jnp.tanh(x @ w1 + b1) @ w2 + b2

    def model(x, y):
        w1 = numpyro.sample("w1", dist.Normal(0.0, 1.0).expand([4, HIDDEN]).to_event(2))
        b1 = numpyro.sample("b1", dist.Normal(0.0, 1.0).expand([HIDDEN]).to_event(1))
        w2 = numpyro.sample("w2", dist.Normal(0.0, 1.0).expand([HIDDEN, CLASSES]).to_event(2))
        b2 = numpyro.sample("b2", dist.Normal(0.0, 1.0).expand([CLASSES]).to_event(1))
        with numpyro.plate("data", N, subsample_size=64) as idx:
            f = jnp.tanh(x[idx] @ w1 + b1) @ w2 + b2
            numpyro.sample("y", dist.Categorical(logits=f), obs=y[idx])

    delta = AutoDelta(model, init_loc_fn=init_to_median)
    svi = SVI(model, delta, numpyro.optim.Adam(0.01), Trace_ELBO())
    result = svi.run(jax.random.PRNGKey(0), 600, x, y, progress_bar=False)
    weights = delta.median(result.params)
    map_accuracy = _accuracy(logits(**weights), y_np)
    assert map_accuracy > 0.85

    guide = AutoNormal(model, init_loc_fn=init_to_value(values=weights), init_scale=1e-6)
    fit = ScoreProximalSVI(model, guide).run(jax.random.PRNGKey(1), 400, x, y, progress_bar=False)
    assert np.isfinite(np.asarray(fit.losses)).all() and int(fit.num_rejected_steps) == 0
    means = {k: fit.params[f"{k}_auto_loc"] for k in weights}
    scales = np.concatenate([np.ravel(fit.params[f"{k}_auto_scale"]) for k in weights])
    assert np.isfinite(scales).all() and (scales > 0).all()
    assert float(np.median(scales)) > 2e-6  # measured: 5.2e-6
    assert _accuracy(logits(**means), y_np) >= map_accuracy - 0.02
