"""Data-parallel ScoreProximalSVI (``distributed=True``): 2 gloo processes on CPU.

Each rank holds half of every global mini-batch (explicit indices through
``BayesianClassifier(..., subsample=)``, so no rank draws its own), draws the same particles
(same seed) and scales its likelihood by :math:`N/(B/2)`; the all-reduced (mean) statistics then
equal those of one process on the whole batch (scale :math:`N/B`), since the score is affine in
the per-rank likelihood sums. The check: after a few steps the fitted guide and the reported
losses of both ranks equal the single-process run's, to the identity tier 1e-6 (float64; only
the summation order differs), and the two ranks hold bit-identical guides.
"""

from __future__ import annotations

import pyro
import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp
from pyro.infer.autoguide import AutoNormal

from pyro_scorevi import ScoreProximalSVI
from pyro_scorevi.nn import BayesianClassifier, bayesianize_

pytestmark = pytest.mark.distributed

TOL = 1e-6  # identity tier: the same arithmetic up to summation order, float64
NUM_DATA, BATCH, STEPS, WORLD = 64, 16, 5, 2


def _data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(NUM_DATA, 3, generator=g, dtype=torch.float64)
    y = (x @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64) > 0).long()
    batches = [torch.randperm(NUM_DATA, generator=g)[:BATCH] for _ in range(STEPS)]
    return x, y, batches


def _fit(rank: int, world: int, fast_path: bool, store: str | None):
    """Runs STEPS steps on this rank's share of each global batch; returns (losses, params)."""
    torch.set_num_threads(1)
    x, y, batches = _data()
    pyro.clear_param_store()
    pyro.set_rng_seed(0)  # the same particles on every rank
    net = torch.nn.Sequential(
        torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)
    ).double()
    model = BayesianClassifier(bayesianize_(net))
    guide = AutoNormal(model)
    svi = ScoreProximalSVI(
        model, guide, prox_weight=5.0, distributed=world > 1, fast_path=fast_path
    )  # a small prox_weight: big moves, so that a mismatch would show
    losses = [svi.step(x, y, subsample=idx.chunk(world)[rank]) for idx in batches]
    params = {k: v.detach().clone() for k, v in pyro.get_param_store().items()}
    return losses, params


def _worker(rank: int, world: int, store: str, out: str):
    tdist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:  # both paths in one process group: one spawn (process start-up dominates the test)
        fits = {fast_path: _fit(rank, world, fast_path, store) for fast_path in (False, True)}
        torch.save(fits, f"{out}.{rank}")
    finally:
        tdist.destroy_process_group()


def test_two_ranks_with_half_batches_equal_one_process_on_the_whole_batch(tmp_path):
    out = str(tmp_path / "result")
    mp.spawn(_worker, args=(WORLD, str(tmp_path / "store"), out), nprocs=WORLD, join=True)
    ranks = [torch.load(f"{out}.{r}") for r in range(WORLD)]
    for fast_path in (False, True):  # whatever fast_path says (distributed steps run eagerly)
        single_losses, single = _fit(0, 1, fast_path, None)
        assert sorted(single) == sorted(ranks[0][fast_path][1])
        assert len(single) == 8  # 4 sites: loc + scale
        for r, fits in enumerate(ranks):
            losses, params = fits[fast_path]
            torch.testing.assert_close(
                torch.tensor(losses), torch.tensor(single_losses), rtol=0, atol=TOL
            )
            for name, value in single.items():
                torch.testing.assert_close(params[name], value, rtol=0, atol=TOL, msg=name)
                # All ranks apply the same update to the same all-reduced statistics.
                assert torch.equal(params[name], ranks[0][fast_path][1][name]), (r, name)
        # The guide moved: a vacuous pass (nothing fitted) would also "agree".
        assert (single["AutoNormal.locs.net.0.weight"].abs() > 1e-3).any()


def test_distributed_without_a_process_group_names_the_fix():
    assert not tdist.is_initialized()
    model = BayesianClassifier(bayesianize_(torch.nn.Linear(3, 2)))
    svi = ScoreProximalSVI(model, AutoNormal(model), distributed=True)
    with pytest.raises(ValueError, match="init_process_group"):
        svi.step(torch.randn(8, 3), torch.randint(2, (8,)))
