"""NumPyro ScoreProximalSVI with the data sharded over 2 (host) devices equals the unsharded run.

The check runs in a subprocess, since the device count is fixed when JAX starts
(``XLA_FLAGS=--xla_force_host_platform_device_count=2``). There a Bayesian MLP is fitted twice
from the same key: once on plain arrays, once on arrays placed with
``jax.device_put(x, NamedSharding(Mesh(devices, ("batch",)), P("batch")))``, which makes XLA
(GSPMD) split every per-data-point computation between the devices and all-reduce the sums.
The data are caller-drawn mini-batches, sharded along the batch axis, fed to a jitted
``update`` (the likelihood scaled by N/B through ``numpyro.plate(..., subsample_size=B)``): the
data-parallel layout. (``run`` on a whole sharded training set with the plate drawing the
indices was also measured equal, bit for bit: after the gather of B rows the arithmetic is not
split between devices, so it checks little and is left out to keep the test short.)

Tolerance: identity tier 1e-6 in float64 (the same arithmetic; only the order of the cross-device
sums differs). The module imports neither torch nor pyro, and the subprocess checks that
nothing it ran did, so the test also holds on a leg without torch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("jax")
pytest.importorskip("numpyro")

#: One subprocess of ~30 s (two host devices, float64) shared by the module: CI runs it with the
#: slow tests, and the torch-free leg runs every test of tests/numpyro.
pytestmark = pytest.mark.slow

TOL = 1e-6  # identity tier, float64

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    import numpyro, numpyro.distributions as dist
    from jax import random
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from numpyro.infer.autoguide import AutoNormal
    from pyro_scorevi.numpyro import ScoreProximalSVI

    N, D, H, C, B, STEPS = 256, 4, 8, 3, 32, 20

    def model(x, y=None, num_data=N, batch_size=None):
        w1 = numpyro.sample("w1", dist.Normal(0.0, 1.0).expand([D, H]).to_event(2))
        w2 = numpyro.sample("w2", dist.Normal(0.0, 1.0).expand([H, C]).to_event(2))
        with numpyro.plate("data", num_data, subsample_size=batch_size or x.shape[0]):
            if x.shape[0] == num_data:  # the whole set: take the plate's indices
                x = numpyro.subsample(x, event_dim=1)
                y = None if y is None else numpyro.subsample(y, event_dim=0)
            numpyro.sample("obs", dist.Categorical(logits=jnp.tanh(x @ w1) @ w2), obs=y)

    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, D))
    y = (x @ rng.normal(size=(D, C))).argmax(-1)
    order = [rng.permutation(N)[:B] for _ in range(STEPS)]
    batches = [(x[i], y[i]) for i in order]

    devices = jax.devices()
    sharding = NamedSharding(Mesh(np.array(devices), ("batch",)), P("batch"))
    shard = lambda a: jax.device_put(jnp.asarray(a), sharding)

    def fit(put):
        svi = ScoreProximalSVI(model, AutoNormal(model), prox_weight=10.0)
        state = svi.init(random.PRNGKey(0), put(x[:B]), put(y[:B]))
        update = jax.jit(svi.update)
        losses = []
        for xb, yb in batches:
            xb, yb = put(xb), put(yb)
            state, loss = update(state, xb, yb)
            losses.append(float(loss))
        return svi.get_params(state), losses, len(xb.sharding.device_set)

    def max_diff(a, b):
        return max(float(jnp.max(jnp.abs(a[k] - b[k]))) for k in a)

    plain_params, plain_losses, plain_devices = fit(jnp.asarray)
    shard_params, shard_losses, shard_devices = fit(shard)
    print(json.dumps({
        "num_devices": len(devices),
        "dtype": str(plain_params["w1_auto_loc"].dtype),
        "minibatch_devices": [plain_devices, shard_devices],
        "minibatch_param_diff": max_diff(plain_params, shard_params),
        "minibatch_loss_diff": max(abs(a - b) for a, b in zip(plain_losses, shard_losses)),
        "moved": float(jnp.max(jnp.abs(plain_params["w1_auto_loc"]))),
        "finite": bool(np.isfinite(plain_losses).all() and np.isfinite(shard_losses).all()),
        "torch_imported": "torch" in sys.modules or "pyro" in sys.modules,
    }))
    """
)


@pytest.fixture(scope="module")
def sharded_result():
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
        "JAX_PLATFORMS": "cpu",
        "JAX_ENABLE_X64": "1",
    }
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_the_check_really_ran_on_two_devices_in_float64(sharded_result):
    assert sharded_result["num_devices"] == 2
    assert sharded_result["dtype"] == "float64"
    assert sharded_result["minibatch_devices"] == [1, 2]  # plain on one device, sharded on two
    assert sharded_result["finite"]
    assert sharded_result["moved"] > 1e-2  # the fit moved: agreement is not vacuous


def test_sharded_minibatch_updates_equal_unsharded(sharded_result):
    assert sharded_result["minibatch_param_diff"] < TOL
    assert sharded_result["minibatch_loss_diff"] < TOL


def test_no_torch_or_pyro_was_imported(sharded_result):
    assert not sharded_result["torch_imported"]
