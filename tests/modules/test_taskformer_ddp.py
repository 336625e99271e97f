"""TaskFormer on 2 gloo processes equals 1 process: the full loss and every parameter gradient (1×B vs 2×B/2),
and the evaluation (gathered gallery, padded duplicates, synced Recall@K)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tests.helpers import run_distributed
from tests.modules.test_taskformer import CAPTIONS, S, tiny


def _model():
    torch.manual_seed(0)
    # eval mode: BatchNorm uses running statistics and dropout is off, so the maths is the same on any split
    return tiny(p_text_only=0.0, p_sketch_only=0.0, classify=("image", "sketch", "text")).eval()


def _data(n, seed):
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.rand(n, 3, S, S, generator=g), "sketch": (torch.rand(n, 1, S, S, generator=g) < 0.1).float(),
            "caption": [CAPTIONS[(i * 7) % 4] + (" and a red one" if i % 3 else "") for i in range(n)],
            "labels": (torch.rand(n, 5, generator=g) < 0.4).float(), "index": torch.arange(n)}


def _take(batch, idx):
    return {k: ([v[i] for i in idx] if isinstance(v, list) else v[idx]) for k, v in batch.items()}


def _train_and_eval(rank: int | None, world: int):
    m = _model()
    train = _data(8, 1)
    local = train if rank is None else _take(train, list(range(rank * 4, rank * 4 + 4)))
    out = m.compute_losses(local)
    out["loss"].backward()
    grads = {n: p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for n, p in m.named_parameters()}
    loss = out["loss"].detach()
    if rank is not None:  # what DDP does: average the gradients (and the logged loss) over processes
        for g in grads.values():
            dist.all_reduce(g)
            g /= world
        dist.all_reduce(loss)
        loss /= world
    evalset = _data(11, 2)
    # DistributedSampler order for 11 items on 2 ranks: rank r takes r, r+2, ...; the last rank is padded with item 0
    idx = list(range(11)) if rank is None else [*range(rank, 11, 2), *([0] if rank == 1 else [])]
    with torch.no_grad():
        embs = [m.embed(_take(evalset, idx[:3])), m.embed(_take(evalset, idx[3:]))]
        results = m.retrieval_results(embs, "val")
    return loss, grads, {qt: {k: v.item() for k, v in r.items()} for qt, r in results.items()}


def _worker(rank, world):
    return _train_and_eval(rank, world)


@pytest.mark.slow
def test_two_processes_equal_one_process():
    ranks = run_distributed(_worker, world_size=2)
    loss, grads, results = _train_and_eval(None, 1)
    for r, (loss_r, grads_r, results_r) in enumerate(ranks):
        torch.testing.assert_close(loss_r, loss, msg=f"rank {r}: loss")
        for name, g in grads.items():
            # float32 sums in another order: agree to ~1e-6 of the largest entry (the loss is scaled by 100)
            torch.testing.assert_close(grads_r[name], g, rtol=1e-4, atol=1e-5 * float(g.abs().max()) + 1e-8,
                                       msg=f"rank {r}: gradient of {name}")
        assert set(results_r) == set(results) == {"text+sketch", "text", "sketch"}
        for qt in results:
            assert results_r[qt] == pytest.approx(results[qt], abs=1e-6), (r, qt)
    assert results["text+sketch"]["num_queries"] == 11
    assert any(g.abs().sum() > 0 for n, g in grads.items() if n.startswith("decoder"))
    assert any(g.abs().sum() > 0 for n, g in grads.items() if n.startswith("classifier"))
    assert grads["logit_scale"].abs().item() > 0


@pytest.mark.slow
def test_lightning_ddp_spawn_validation_equals_one_process():
    import lightning.pytorch as pl

    from lit_cascades.data.scenes import SceneRetrievalDataModule

    # 35 images on 2 processes: DistributedSampler pads one process with a repeated image
    dm = SceneRetrievalDataModule(sources=["digits"], num_train=32, num_val=35, num_test=12, image_size=S,
                                  object_size=(7, 12), batch_size=16, eval_batch_size=8)
    dm.setup()
    torch.manual_seed(0)
    m = tiny(num_classes=dm.num_classes, caption_vocab=dm.vocab.words)
    kwargs = {"accelerator": "cpu", "logger": False, "enable_checkpointing": False, "enable_progress_bar": False,
              "enable_model_summary": False}
    one = pl.Trainer(devices=1, **kwargs).validate(m, dm, verbose=False)[0]
    two = pl.Trainer(devices=2, strategy="ddp_spawn", **kwargs).validate(m, dm, verbose=False)[0]
    assert set(one) == set(two) and len(one) == 12  # 3 query types × (R@1, R@5, R@10, MRR@10)
    for key, value in one.items():
        assert two[key] == pytest.approx(value, abs=1e-6), key
