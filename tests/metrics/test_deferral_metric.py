import pytest
import torch

from lit_cascades.functional import deferral_metrics
from lit_cascades.metrics import DeferralMetrics
from lit_cascades.metrics.deferral import first_occurrences
from tests.helpers import run_distributed


def _data(n=101, seed=0):
    g = torch.Generator().manual_seed(seed)
    qs = (torch.rand(n, generator=g) < 0.7).double()
    ql = (torch.rand(n, generator=g) < 0.9).double()
    scores = (qs + torch.rand(n, generator=g)).double()
    scores[::7] = 0.5  # ties
    return scores, qs, ql


def test_batched_accumulation_equals_functional():
    scores, qs, ql = _data()
    m = DeferralMetrics(rate=0.3)
    for chunk in torch.arange(101).split(17):
        m.update(scores[chunk], qs[chunk], ql[chunk])
    got = m.compute()
    want = deferral_metrics(scores, qs, ql, rate=0.3)
    assert got.scalars == pytest.approx(want.scalars, nan_ok=True)
    torch.testing.assert_close(got.curve.quality, want.curve.quality)


def test_duplicate_ids_are_dropped():
    scores, qs, ql = _data()
    m = DeferralMetrics()
    ids = torch.arange(101)
    m.update(scores, qs, ql, ids)
    m.update(scores[:5], qs[:5], ql[:5], ids[:5])  # padding-style repeats
    assert m.compute().scalars == pytest.approx(deferral_metrics(scores, qs, ql).scalars, nan_ok=True)
    torch.testing.assert_close(first_occurrences(torch.tensor([3, 1, 3, 2, 1])), torch.tensor([1, 3, 0]))


def test_bad_updates():
    m = DeferralMetrics()
    with pytest.raises(ValueError, match="equal length"):
        m.update(torch.rand(3), torch.rand(2), torch.rand(3))
    with pytest.raises(ValueError, match="before any update"):
        m.compute()
    m.update(torch.rand(3), torch.rand(3), torch.rand(3))
    with pytest.raises(ValueError, match="every update or for none"):
        m.update(torch.rand(3), torch.rand(3), torch.rand(3), torch.arange(3))
    with pytest.raises(ValueError, match="ideal"):
        DeferralMetrics(ideal="perfect")


def _ddp_metric(rank: int, world_size: int) -> dict:
    scores, qs, ql = _data()
    ids = torch.arange(101)
    # uneven shards, the way DistributedSampler pads: rank 1 repeats example 0
    shard = torch.arange(rank, 101, world_size)
    if rank == 1:
        shard = torch.cat([shard, torch.tensor([0])])
    m = DeferralMetrics(rate=0.25)
    for part in shard.split(8):
        m.update(scores[part], qs[part], ql[part], ids[part])
    rep = m.compute()
    return {"scalars": rep.scalars, "quality": rep.curve.quality}


@pytest.mark.slow
def test_two_processes_equal_one_process():
    scores, qs, ql = _data()
    want = deferral_metrics(scores, qs, ql, rate=0.25)
    for result in run_distributed(_ddp_metric, world_size=2):
        assert result["scalars"] == pytest.approx(want.scalars, nan_ok=True)
        torch.testing.assert_close(result["quality"], want.curve.quality)
